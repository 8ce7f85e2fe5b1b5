import math

import numpy as np
import pytest
from PIL import Image

from mgd_ray.plots import (
    colourise,
    normalise_rows,
    overlay,
    overlay_grid,
    pareto_front,
    plot_confusion_matrix,
    plot_miou_vs_cost,
)


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        return im.size


def test_pareto_front_keeps_points_nothing_beats_sorted_by_cost():
    points = [(1.0, 0.5), (2.0, 0.6), (1.5, 0.55), (2.0, 0.4), (3.0, 0.6), (0.5, 0.3), (4.0, math.nan), (1.5, 0.52)]
    # (2, .4) and (1.5, .52) lose to cheaper-and-better points, (3, .6) to (2, .6) at equal mIoU; NaN is out.
    assert pareto_front(points) == [5, 0, 2, 1]


def test_pareto_front_identical_points_both_stay_and_single_point():
    assert pareto_front([(1.0, 0.5), (1.0, 0.5), (1.0, 0.4)]) == [0, 1]
    assert pareto_front([(7.0, 0.1)]) == [0]
    assert pareto_front([]) == []


def test_normalise_rows_divides_by_row_sums_and_keeps_empty_rows_zero():
    cm = np.array([[2, 2, 0], [0, 0, 0], [1, 0, 3]])
    np.testing.assert_allclose(normalise_rows(cm), [[0.5, 0.5, 0], [0, 0, 0], [0.25, 0, 0.75]])


def test_colourise_and_overlay_blend_values():
    palette = [(0, 0, 0), (200, 0, 0), (0, 100, 0)]
    labels = np.array([[0, 1], [255, 2]], dtype=np.uint8)
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    np.testing.assert_array_equal(colourise(labels, palette)[0, 1], [200, 0, 0])
    np.testing.assert_array_equal(colourise(labels, palette)[1, 0], [0, 0, 0])
    out = overlay(image, labels, palette, alpha=0.5)
    np.testing.assert_array_equal(out[0, 0], [50, 50, 50])
    np.testing.assert_array_equal(out[0, 1], [150, 50, 50])
    np.testing.assert_array_equal(out[1, 0], [100, 100, 100])  # ignored: the image alone
    np.testing.assert_array_equal(out[1, 1], [50, 100, 50])


def test_plot_miou_vs_cost_writes_png_and_skips_rows_without_the_cost(tmp_path):
    rows = [
        {"name": "trial 0", "kind": "trial", "miou": 0.41, "gflops": 20.0, "latency_ms": 12.0},
        {"name": "trial 1", "kind": "trial", "miou": 0.45, "gflops": 20.0},
        {"name": "Sup-only", "kind": "baseline", "miou": 0.35, "gflops": 20.0, "latency_ms": 11.0},
        {"name": "T_D", "kind": "teacher", "miou": 0.55, "gflops": 300.0, "latency_ms": 90.0},
    ]
    flops = plot_miou_vs_cost(rows, tmp_path / "fig1.png")
    latency = plot_miou_vs_cost(rows, tmp_path / "sub" / "fig1_latency.png", cost_key="latency_ms")
    assert _png_size(flops) == _png_size(latency) == (900, 600)
    with pytest.raises(ValueError, match="params_m"):
        plot_miou_vs_cost(rows, tmp_path / "none.png", cost_key="params_m")
    assert not (tmp_path / "none.png").exists()


def test_plot_confusion_matrix_grows_with_classes_and_checks_names(tmp_path):
    small = plot_confusion_matrix(np.eye(3) * 5, ["a", "b", "c"], tmp_path / "cm3.png")
    big = plot_confusion_matrix(np.ones((12, 12)), [f"class{i}" for i in range(12)], tmp_path / "cm12.png")
    (w3, h3), (w12, h12) = _png_size(small), _png_size(big)
    assert w12 > w3 and h12 > h3
    with pytest.raises(ValueError, match="2 class names"):
        plot_confusion_matrix(np.eye(3), ["a", "b"], tmp_path / "bad.png")


def test_overlay_grid_page_is_one_row_per_image_one_column_per_source(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 24, 3), dtype=np.uint8) for _ in range(2)]
    maps = [rng.integers(0, 3, (16, 24), dtype=np.uint8) for _ in range(2)]
    palette = [(0, 0, 0), (255, 0, 0), (0, 255, 0)]
    wide = overlay_grid({"ground truth": maps, "student": maps}, images, palette, tmp_path / "wide.png")
    tall = overlay_grid({"ground truth": maps * 2}, images * 2, palette, tmp_path / "tall.png")
    assert _png_size(wide) == (600, 400)  # 3 columns (image, ground truth, student) × 2 rows of 200 px
    assert _png_size(tall) == (400, 800)
    with pytest.raises(ValueError, match="'student' has 1 label maps for 2 images"):
        overlay_grid({"student": maps[:1]}, images, palette, tmp_path / "bad.png")
