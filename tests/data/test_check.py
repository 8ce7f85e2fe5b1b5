"""The data check: every bad file named in one report before training, pixel counts, the verdict cache."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mgd_ray.cli import main
from mgd_ray.data.check import CACHE_FILE, check_data, check_manifest, require_clean
from mgd_ray.data.datasets import DatasetError, Sample
from mgd_ray.data.partitions import build_manifest, write_manifest

CLASSES = ["background", "cat", "dog"]
META = {"dataset": "folder", "root": "", "num_classes": 3, "class_names": CLASSES, "partition": "given"}
META |= {"fraction": 0.5, "seed": 0}


def _mask(value: int, shape=(6, 8)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[:2] = value
    mask[-1, :3] = 255
    return mask


@pytest.fixture
def dataset(tmp_path, files):
    """Three good labeled images, one unlabeled, two val; then one of each problem the check finds."""
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    good = {"a": _mask(1), "b": _mask(2), "c": _mask(1), "v1": _mask(1), "v2": _mask(1)}
    for name, mask in good.items():
        files.image(root / "images" / f"{name}.png", rng.integers(0, 256, (6, 8, 3)))
        files.mask(root / "labels" / f"{name}.png", mask)
    files.image(root / "images" / "u.jpg", rng.integers(0, 256, (6, 8, 3)))
    samples = {n: Sample(n, root / "images" / f"{n}.png", root / "labels" / f"{n}.png") for n in good}
    samples["u"] = Sample("u", root / "images" / "u.jpg", None)
    return root, samples


def manifest(root: Path, samples: dict, train: list[str], labeled: list[str], val: list[str]) -> tuple:
    table = build_manifest(
        [samples[i] for i in train], [samples[i] for i in val], labeled, [i for i in train if i not in labeled], META
    )
    path = write_manifest(table, root / "manifest.parquet")
    return table, path


def test_a_clean_dataset_passes_with_its_pixels_per_role(dataset):
    root, samples = dataset
    table, path = manifest(root, samples, ["a", "b", "c", "u"], ["a", "b", "c"], ["v1", "v2"])
    report = check_manifest(table, path, 3, CLASSES)
    assert report.ok and report.read == 6
    assert report.images == {"labeled": 3, "unlabeled": 1, "val": 2, "test": 0}
    # Each mask: 16 pixels of its class (2 rows of 8), 3 ignored, 29 background.
    assert report.pixels["labeled"] == [3 * 29, 2 * 16, 16] and report.pixels["val"] == [2 * 29, 2 * 16, 0]
    assert report.warnings == ["class 'dog' has no pixel in val: its IoU is undefined and left out of the mean"]
    text = report.text()
    assert "labeled 3, unlabeled 1, val 2 images" in text and "dog" in text and "problem" not in text
    assert require_clean(report) is report


def test_every_problem_is_named_in_one_report(dataset, files):
    root, samples = dataset
    data = (root / "images" / "a.png").read_bytes()
    (root / "images" / "a.png").write_bytes(data[: len(data) // 2])  # truncated
    files.mask(root / "labels" / "b.png", _mask(2, shape=(8, 6)))  # transposed: 6×8 instead of 8×6
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "labels" / "c.png")  # an RGB mask
    files.mask(root / "labels" / "v1.png", _mask(7))  # class 7 of 3
    os.symlink(root / "images" / "u.jpg", root / "images" / "u2.jpg")  # one image under two ids
    samples["u2"] = Sample("u2", root / "images" / "u2.jpg", None)
    table, path = manifest(root, samples, ["a", "b", "c", "u", "u2"], ["a", "b", "c"], ["v1", "v2"])
    report = check_manifest(table, path, 3, CLASSES)
    assert not report.ok and len(report.problems) == 5
    expected = [
        f"{root / 'images' / 'u.jpg'}: one image file under 'u' (unlabeled), 'u2' (unlabeled)",
        f"{root / 'images' / 'a.png'}: cannot decode image",
        f"{root / 'labels' / 'b.png'}: mask is 6×8 but its image {root / 'images' / 'b.png'} is 8×6 (W×H)",
        f"{root / 'labels' / 'c.png'}: mask has PIL mode 'RGB'",
        f"{root / 'labels' / 'v1.png'}: mask values [7] outside the allowed range 0..2",
    ]
    for problem, start in zip(report.problems, expected, strict=True):
        assert problem.startswith(start), (problem, start)
    assert "replace the file" in report.problems[1] and "fix num_classes" in report.problems[4]
    with pytest.raises(DatasetError, match="5 problem\\(s\\); nothing trains until they are fixed") as err:
        require_clean(report)
    assert all(p in str(err.value) for p in report.problems)


def test_the_cache_rereads_only_changed_files(dataset, files):
    root, samples = dataset
    table, path = manifest(root, samples, ["a", "b", "c", "u"], ["a", "b", "c"], ["v1", "v2"])
    cache = root / CACHE_FILE
    assert check_manifest(table, path, 3, CLASSES, cache).read == 6
    again = check_manifest(table, path, 3, CLASSES, cache)
    assert again.read == 0 and again.ok and again.pixels["labeled"] == [3 * 29, 2 * 16, 16]
    files.mask(root / "labels" / "b.png", _mask(1))  # b is now a cat: a new size or mtime, read again
    os.utime(root / "labels" / "b.png", ns=(1, 1))
    changed = check_manifest(table, path, 3, CLASSES, cache)
    assert changed.read == 1 and changed.pixels["labeled"] == [3 * 29, 3 * 16, 0]
    assert check_manifest(table, path, 4, CLASSES + ["bird"], cache).read == 6  # another class count: all again


def test_check_data_of_a_study_and_the_cli(tmp_path, tiny_data_cfg, dataset, capsys):
    from mgd_ray.config import DataConfig

    report = check_data(DataConfig.model_validate(tiny_data_cfg))
    assert report.ok and report.images["labeled"] == 4 and report.images["val"] == 4
    assert (Path(tiny_data_cfg["root"]) / CACHE_FILE).is_file()
    root, samples = dataset
    (root / "labels" / "v2.png").write_bytes(b"not a png")
    _, path = manifest(root, samples, ["a", "b", "c", "u"], ["a", "b", "c"], ["v1", "v2"])
    study = tmp_path / "study.yaml"
    study.write_text(
        f"name: s\ndata: {{dataset: folder, root: {root}, manifest: {path}}}\nteachers: {{T_D: {{model: {{backbone: resnet18}}}}, T_W: {{model: {{backbone: resnet18}}}}}}\n"
    )
    assert main(["data", "check", str(study)]) == 1
    out = capsys.readouterr().out
    assert f"{root / 'labels' / 'v2.png'}: cannot read mask" in out and "1 problem(s)" in out


def test_jobs_and_studies_refuse_bad_data_before_any_training(tmp_path, dataset, monkeypatch):
    import ray

    from mgd_ray import train
    from mgd_ray.config import parse_job_config
    from mgd_ray.study.config import parse_study
    from mgd_ray.study.run import run_study

    root, samples = dataset
    files_bytes = (root / "images" / "c.png").read_bytes()
    (root / "images" / "c.png").write_bytes(files_bytes[:20])
    _, path = manifest(root, samples, ["a", "b", "c", "u"], ["a", "b", "c"], ["v1", "v2"])
    data = {"dataset": "folder", "root": str(root), "manifest": str(path)}

    def no_training(*args, **kwargs):
        raise AssertionError("a trainer was built although the data check failed")

    monkeypatch.setattr(train, "make_trainer", no_training)
    cfg = parse_job_config("baseline", {"data": data, "output": str(tmp_path / "out")})
    with pytest.raises(DatasetError, match=r"c\.png: cannot decode image"):
        train.run_job(cfg, train.scaling_config(1, 1.0))
    teachers = {name: {"model": {"backbone": "resnet18"}} for name in ("T_D", "T_W")}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study = parse_study({"name": "bad", "data": data, "teachers": teachers, "mlflow": {"tracking_uri": uri}})
    with pytest.raises(DatasetError, match=r"1 problem\(s\); nothing trains"):
        run_study(study, base=tmp_path)
    assert not (tmp_path / "mlflow.db").exists() and not ray.is_initialized()  # found before MLflow and Ray
