"""`prepare_cityscapes` on tiny copies of the official zips (real member layout), and its command line."""

from __future__ import annotations

import functools
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mgd_ray.cli import main
from mgd_ray.data import partitions, prepare_cityscapes
from mgd_ray.data.datasets import DatasetError
from mgd_ray.data.prepare_cityscapes import to_train_ids

TRAIN = {"aachen_000000_000019": "aachen", "bremen_000001_000019": "bremen", "jena_000078_000019": "jena"}
VAL = {"frankfurt_000000_000294": "frankfurt", "lindau_000000_000019": "lindau"}
TEST = {"berlin_000000_000019": "berlin"}
EXPECTED = {"train.txt": 3, "val.txt": 2}
# label id → train id of the 19 evaluated classes, in the order of the benchmark's class table
EVALUATED = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
LABEL_IDS = np.array([[0, 7, 26, 33, 1, 24], [9, 26, 26, 8, 23, 4]], np.uint8)  # 0/1/4/9 are void classes
TRAIN_IDS = np.array([[255, 0, 13, 18, 255, 11], [255, 13, 13, 1, 10, 255]], np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def photo(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (2, 6, 3), dtype=np.uint8)


def write_zips(root: Path, drop: str | None = None) -> Path:
    """leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip with the members the official ones have."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {"train": TRAIN, "val": VAL, "test": TEST}
    with (
        zipfile.ZipFile(root / "leftImg8bit_trainvaltest.zip", "w") as images,
        zipfile.ZipFile(root / "gtFine_trainvaltest.zip", "w") as labels,
    ):
        images.writestr("README", "Cityscapes")
        images.writestr("license.txt", "see website")
        labels.writestr("README", "Cityscapes")
        for seed, (split, stem, city) in enumerate((s, n, c) for s, names in splits.items() for n, c in names.items()):
            if stem != drop:
                images.writestr(f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", png_bytes(photo(seed)))
            base = f"gtFine/{split}/{city}/{stem}_gtFine"
            labels.writestr(f"{base}_labelIds.png", png_bytes(LABEL_IDS))
            labels.writestr(f"{base}_color.png", png_bytes(photo(seed + 50)))
            labels.writestr(f"{base}_instanceIds.png", png_bytes(LABEL_IDS.astype(np.uint16) * 1000))
            labels.writestr(f"{base}_polygons.json", "{}")
    return root


def pair(split: str, stem: str) -> str:
    return f"/images/{split}/{stem}.png\t/segmentation/{split}/{stem}_gtFine.png\n"


@pytest.fixture
def tiny_lists(tmp_path: Path, monkeypatch) -> Path:
    """Shipped-list stand-ins for the tiny zips (the real lists name 2,975 + 500 images)."""
    lists = tmp_path / "splits" / "cityscapes"
    lists.mkdir(parents=True)
    train = [pair("train", s) for s in TRAIN]
    files = {
        "train.txt": train,
        "val.txt": [pair("val", s) for s in VAL],
        "test.txt": [pair("test", s) for s in TEST],
        "train_aug_labeled_1-16.txt": train[:1],
        "train_aug_unlabeled_1-16.txt": train[1:],
    }
    for name, lines in files.items():
        (lists / name).write_text("".join(lines))
    monkeypatch.setattr(partitions, "SPLITS_DIR", lists.parent)
    return lists


@pytest.fixture
def zips(tmp_path: Path, tiny_lists: Path) -> Path:
    return write_zips(tmp_path / "city")


def test_the_lookup_table_keeps_the_19_evaluated_classes():
    label_ids = np.arange(34, dtype=np.uint8)
    expected = np.full(34, 255, np.uint8)
    expected[list(EVALUATED)] = np.arange(19)
    np.testing.assert_array_equal(to_train_ids(label_ids, "t"), expected)
    assert to_train_ids(np.array([255], np.uint8), "t")[0] == 255  # label id -1 (license plate) as uint8


def test_values_that_are_no_label_ids_are_refused():
    with pytest.raises(DatasetError, match=r"x\.png: values \[34, 200\] are not Cityscapes label ids"):
        to_train_ids(np.array([[7, 34], [200, 26]], np.uint8), "x.png")


def test_prepare_writes_the_cps_layout_with_train_ids(zips):
    result = prepare_cityscapes.prepare_cityscapes(zips, "1/16", expected=EXPECTED, progress=False)
    image = zips / "images/train/bremen_000001_000019.png"
    with zipfile.ZipFile(zips / "leftImg8bit_trainvaltest.zip") as zf:
        assert image.read_bytes() == zf.read("leftImg8bit/train/bremen/bremen_000001_000019_leftImg8bit.png")
    with Image.open(zips / "segmentation/val/lindau_000000_000019_gtFine.png") as label:
        assert label.mode == "P"
        np.testing.assert_array_equal(np.array(label), TRAIN_IDS)  # e.g. label id 26 (car) → 13, 0 → 255
        assert label.getpalette()[13 * 3 : 13 * 3 + 3] == [0, 0, 142]  # car's colour
    assert not (zips / "images/test").exists()
    assert sorted(p.name for p in (zips / "segmentation/train").iterdir()) == sorted(f"{s}_gtFine.png" for s in TRAIN)

    assert result.verified == {
        "train.txt": 3,
        "val.txt": 2,
        "train_aug_labeled_1-16.txt": 1,
        "train_aug_unlabeled_1-16.txt": 2,
    }
    assert result.subsets == {"labeled": 1, "unlabeled": 2, "val": 2}
    assert result.manifest == zips / "manifest_cityscapes_classic_1-16.parquet"
    rows = {r["id"]: r for r in pq.read_table(result.manifest).to_pylist()}
    assert rows["aachen_000000_000019"]["label_path"] == str(
        zips / "segmentation/train/aachen_000000_000019_gtFine.png"
    )
    assert "train.txt 3, val.txt 2" in result.summary()


def test_prepare_from_extracted_folders_and_then_without_the_zips(zips):
    for name in ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"):
        with zipfile.ZipFile(zips / name) as zf:
            zf.extractall(zips)
        (zips / name).unlink()
    prepare_cityscapes.prepare_cityscapes(zips, expected=EXPECTED, progress=False)
    with Image.open(zips / "segmentation/train/jena_000078_000019_gtFine.png") as label:
        np.testing.assert_array_equal(np.array(label), TRAIN_IDS)
    shutil.rmtree(zips / "leftImg8bit")
    shutil.rmtree(zips / "gtFine")
    result = prepare_cityscapes.prepare_cityscapes(zips, "1/16", expected=EXPECTED, progress=False)
    assert "used as found" in result.summary()


def test_missing_zip_names_the_file_and_where_to_get_it(tmp_path, tiny_lists):
    with pytest.raises(
        DatasetError, match=r"leftImg8bit_trainvaltest\.zip: not found.*cityscapes-dataset\.com/downloads"
    ):
        prepare_cityscapes.prepare_cityscapes(tmp_path, expected=EXPECTED, progress=False)


def test_a_damaged_zip(tmp_path, tiny_lists):
    (tmp_path / "leftImg8bit_trainvaltest.zip").write_bytes(b"PK not really")
    with pytest.raises(DatasetError, match=r"leftImg8bit_trainvaltest\.zip: not a readable zip.*download it again"):
        prepare_cityscapes.prepare_cityscapes(tmp_path, expected=EXPECTED, progress=False)


def test_an_image_missing_from_the_zip_is_reported_by_id(tmp_path, tiny_lists):
    root = write_zips(tmp_path / "city", drop="lindau_000000_000019")
    with pytest.raises(
        DatasetError, match=r"val\.txt: 1 of the expected 2 samples present.*first missing: lindau_000000_000019"
    ):
        prepare_cityscapes.prepare_cityscapes(root, expected=EXPECTED, progress=False)


def test_the_real_counts_are_the_default(zips):
    with pytest.raises(DatasetError, match=r"train\.txt: 3 of the expected 2,975 samples present"):
        prepare_cityscapes.prepare_cityscapes(zips, progress=False)


def test_cli_prepare_cityscapes(zips, monkeypatch, capsys):
    monkeypatch.setattr(
        prepare_cityscapes,
        "prepare_cityscapes",
        functools.partial(prepare_cityscapes.prepare_cityscapes, expected=EXPECTED),
    )
    assert main(["data", "prepare", "cityscapes", "--root", str(zips), "--fraction", "1/16"]) == 0
    out = capsys.readouterr().out
    assert "labeled 1, unlabeled 2, val 2" in out and "dataset: cityscapes" in out


def test_cli_refuses_download_for_cityscapes(zips, capsys):
    assert main(["data", "prepare", "cityscapes", "--root", str(zips), "--download"]) == 2
    assert "Cityscapes needs a login" in capsys.readouterr().err
