import colorsys
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgd_ray.data.builtin import (
    BUILTIN_CLASSES,
    HUE_JITTER,
    OFF_HUE,
    SceneObject,
    _sample_scene,
    class_hue,
    generate_builtin,
    render_scene,
)
from mgd_ray.data.datasets import DatasetError, folder_samples

SMALL = {"num_train": 6, "num_val": 3, "size": 48}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, None]:
    root = tmp_path_factory.mktemp("builtin") / "data"
    generate_builtin(root)
    return root, None


def test_default_generation_is_complete(default_dataset):
    root, _ = default_dataset
    assert len(list((root / "images").glob("*.png"))) == 320
    assert (root / "train.txt").read_text().split() == [f"train_{i:05d}" for i in range(256)]
    assert len((root / "val.txt").read_text().split()) == 64
    assert (root / "classes.txt").read_text().splitlines() == list(BUILTIN_CLASSES)
    assert json.loads((root / "builtin.json").read_text())["num_classes"] == 6


def test_default_generation_has_every_class_often_and_valid_masks(default_dataset):
    root, _ = default_dataset
    samples, names = folder_samples(root)
    images_with = np.zeros(len(names), int)
    for sample in samples[:64]:
        with Image.open(sample.label) as mask:
            assert mask.mode == "P"
            values = np.unique(np.array(mask))
        with Image.open(sample.image) as image:
            assert image.mode == "RGB" and image.size == (96, 96)
        assert values.max() < 6
        images_with[values] += 1
    assert images_with[0] == 64
    assert (images_with[1:] >= 8).all(), images_with


def test_class_hue_is_a_strong_but_unreliable_cue():
    """About 1 - OFF_HUE of the objects carry their class hue (± HUE_JITTER); the rest any hue.

    An off-hue object still lands within the jitter band by chance with probability 2·HUE_JITTER,
    so the expected in-band share is (1 - 0.2) + 0.2 · 0.14 = 0.828. The texture's second colour
    is a darker shade of the first (same hue), so the texture never changes the hue cue.
    """
    rng = np.random.default_rng(123)
    near, total, off_hues = 0, 0, []
    for _ in range(600):
        for obj in _sample_scene(rng, 32, 6, {}):
            if obj.label == 0:
                continue
            h0 = colorsys.rgb_to_hsv(*(np.array(obj.colours[0]) / 255))[0]
            h1 = colorsys.rgb_to_hsv(*(np.array(obj.colours[1]) / 255))[0]
            assert h1 == pytest.approx(h0, abs=1e-9)
            d = abs(h0 - class_hue(obj.label))
            d = min(d, 1 - d)
            total += 1
            if d <= HUE_JITTER + 1e-9:
                near += 1
            else:
                off_hues.append(h0)
    assert total > 1000
    expected = (1 - OFF_HUE) + OFF_HUE * 2 * HUE_JITTER
    assert abs(near / total - expected) < 0.03, (near, total)
    # off-hue objects cover the colour circle: every sixth of it is used
    assert set(np.floor(np.array(off_hues) * 6).astype(int)) == set(range(6))


def test_class_hues_are_distinct():
    hues = [class_hue(c) for c in range(1, 6)]
    gaps = [min(abs(a - b), 1 - abs(a - b)) for i, a in enumerate(hues) for b in hues[i + 1 :]]
    assert hues[0] == 0.0 and min(gaps) > 2 * HUE_JITTER


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    a = tree_bytes(generate_builtin(tmp_path / "a", seed=3, **SMALL))
    b = tree_bytes(generate_builtin(tmp_path / "b", seed=3, **SMALL))
    c = tree_bytes(generate_builtin(tmp_path / "c", seed=4, **SMALL))
    assert a == b
    assert a["images/train_00000.png"] != c["images/train_00000.png"]
    assert a["labels/val_00002.png"] != c["labels/val_00002.png"]


def test_an_image_does_not_depend_on_the_number_of_images(tmp_path):
    few = generate_builtin(tmp_path / "few", seed=1, num_train=2, num_val=1, size=48)
    many = generate_builtin(tmp_path / "many", seed=1, num_train=5, num_val=4, size=48)
    for name in ("images/train_00001.png", "labels/train_00001.png", "images/val_00000.png"):
        assert (few / name).read_bytes() == (many / name).read_bytes()


def test_generation_is_idempotent_and_repairs_partial_output(tmp_path):
    root = generate_builtin(tmp_path / "d", **SMALL)
    before = tree_bytes(root)
    label = root / "labels" / "train_00001.png"
    stamp = label.stat().st_mtime_ns
    (root / "manifest_x.parquet").write_bytes(b"kept")
    generate_builtin(root, **SMALL)
    assert label.stat().st_mtime_ns == stamp
    assert (root / "manifest_x.parquet").exists()

    label.unlink()
    generate_builtin(root, **SMALL)
    after = tree_bytes(root)
    assert after == before  # regenerated whole: the stale extra file is gone, the rest identical
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no staging folders left behind


def test_other_parameters_replace_the_dataset(tmp_path):
    root = generate_builtin(tmp_path / "d", **SMALL)
    generate_builtin(root, seed=0, num_train=4, num_val=2, size=48, num_classes=4)
    assert json.loads((root / "builtin.json").read_text())["num_classes"] == 4
    assert len(list((root / "images").iterdir())) == 6
    assert (root / "classes.txt").read_text().splitlines() == list(BUILTIN_CLASSES[:4])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match="refusing to replace") as err:
        generate_builtin(tmp_path / "mine", **SMALL)
    assert str(tmp_path / "mine") in str(err.value)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("num_classes", [1, 7])
def test_rejects_unsupported_class_counts(tmp_path, num_classes):
    with pytest.raises(DatasetError, match="num_classes"):
        generate_builtin(tmp_path / "d", num_classes=num_classes, **SMALL)


def flat(kind, label, center, radius, colour, aspect=1.0, angle=0.0):
    return SceneObject(kind, label, center, radius, angle, (colour, colour), "flat", 4.0, aspect)


def test_later_objects_occlude_earlier_ones_in_image_and_label():
    background = np.full((20, 20, 3), 9.0)
    first = flat("square", 1, (8.0, 8.0), 5.0, (200.0, 0.0, 0.0))  # covers rows/cols 4.5..11.5
    second = flat("square", 2, (12.0, 12.0), 5.0, (0.0, 200.0, 0.0))  # covers 8.5..15.5
    image, label = render_scene(background, [first, second])
    assert label[10, 10] == 2 and tuple(image[10, 10]) == (0, 200, 0)  # overlap: the top one
    assert label[6, 6] == 1 and tuple(image[6, 6]) == (200, 0, 0)
    assert label[14, 14] == 2
    assert label[1, 1] == 0 and tuple(image[1, 1]) == (9, 9, 9)
    assert set(np.unique(label)) == {0, 1, 2}
    # label 0 objects (distractors) paint background labels over objects
    _, relabelled = render_scene(background, [first, second, flat("square", 0, (10.0, 10.0), 2.0, (5.0, 5.0, 5.0))])
    assert relabelled[10, 10] == 0 and relabelled[6, 6] == 1


def test_shapes_have_their_geometry():
    background = np.zeros((41, 41, 3))
    c, r = 20.0, 16.0

    def label_of(kind, aspect=1.0):
        return render_scene(background, [flat(kind, 1, (c, c), r, (1.0, 1.0, 1.0), aspect)])[1]

    disc = label_of("disc")
    assert disc[20, 20] and disc[20, 35] and disc[9, 9] and not disc[8, 8]  # 15.6 and 17.0 px off-centre
    ring = label_of("ring", aspect=0.5)
    assert not ring[20, 20] and ring[20, 33] and not ring[20, 26]
    cross = label_of("cross", aspect=0.25)
    assert cross[20, 20] and cross[20, 35] and cross[5, 20] and not cross[10, 10]
    ellipse = label_of("ellipse", aspect=0.4)
    assert ellipse[20, 34] and not ellipse[30, 20]  # long axis along x at angle 0
    triangle = label_of("triangle")  # apex up (-y), base at y = c + r/2
    assert triangle[6, 20] and triangle[27, 20] and not triangle[30, 20] and not triangle[6, 10]
    assert disc.sum() == pytest.approx(np.pi * r * r, rel=0.05)


def test_textures_use_both_colours_only_inside_the_shape():
    background = np.zeros((41, 41, 3))
    for texture in ("stripes", "checker", "dots"):
        obj = SceneObject("disc", 1, (20.0, 20.0), 15.0, 0.3, ((10.0, 20.0, 30.0), (200.0, 100.0, 50.0)), texture, 5.0)
        image, label = render_scene(background, [obj])
        colours = {tuple(px) for px in image[label == 1]}
        assert colours == {(10.0, 20.0, 30.0), (200.0, 100.0, 50.0)}, texture
        assert not image[label == 0].any()


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_items_become_extra_classes(tmp_path):
    items = np.zeros((20, 28, 28), np.uint8)
    items[:, 4:24, 6:22] = 220  # a solid 20×16 garment
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", 2051, items)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 2049, np.arange(20) % 10)
    root = generate_builtin(
        tmp_path / "d", num_train=24, num_val=2, size=64, num_classes=8, fashion_mnist=True, fashion_mnist_dir=tmp_path
    )
    assert (root / "classes.txt").read_text().splitlines() == list(BUILTIN_CLASSES) + ["tshirt_top", "trouser"]
    seen = set()
    for index in range(24):
        seen |= set(np.unique(np.array(Image.open(root / "labels" / f"train_{index:05d}.png"))).tolist())
    assert {6, 7} <= seen and max(seen) == 7


def test_fashion_mnist_missing_or_corrupt_files_are_named(tmp_path):
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz") as err:
        generate_builtin(tmp_path / "d", num_classes=8, fashion_mnist=True, fashion_mnist_dir=tmp_path, **SMALL)
    assert str(tmp_path) in str(err.value)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", 1234, np.zeros((2, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", 2049, np.zeros(2))
    with pytest.raises(DatasetError, match="magic 2051"):
        generate_builtin(tmp_path / "d", num_classes=8, fashion_mnist=True, fashion_mnist_dir=tmp_path, **SMALL)
