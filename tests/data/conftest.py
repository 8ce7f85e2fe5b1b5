"""Tiny on-disk datasets in the real VOC, Cityscapes and folder layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path


def write_mask(path: Path, array: np.ndarray, palette: bool = False) -> Path:
    """L-mode PNG, or P-mode with a full palette whose colours are unrelated to the indices."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array.astype(np.uint8))
    if palette:
        image.putpalette([(i * 37 + c * 91) % 256 for i in range(256) for c in range(3)])
    image.save(path)
    return path


def random_image(rng: np.random.Generator, height: int = 8, width: int = 8) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_folder(root: Path, masks: dict[str, np.ndarray], class_names: list[str], palette: bool = False) -> Path:
    """images/<id>.png whose first channel is 40·mask (so alignment is checkable) + labels/<id>.png."""
    rng = np.random.default_rng(2)
    for sample_id, mask in masks.items():
        image = random_image(rng, *mask.shape)
        image[..., 0] = np.where(mask == 255, 250, mask * 40)
        write_image(root / "images" / f"{sample_id}.png", image)
        write_mask(root / "labels" / f"{sample_id}.png", mask, palette=palette)
    (root / "classes.txt").write_text("".join(f"{n}\n" for n in class_names))
    return root


class DataFiles:
    """The writers above, handed to tests as the `files` fixture so no test module imports conftest."""

    image = staticmethod(write_image)
    mask = staticmethod(write_mask)
    folder = staticmethod(make_folder)


@pytest.fixture
def files() -> type[DataFiles]:
    return DataFiles


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    """VOC layout with ids a_0..a_3: JPEGImages/*.jpg and SegmentationClassAug/*.png."""
    rng = np.random.default_rng(0)
    root = tmp_path / "VOC2012"
    for index in range(4):
        write_image(root / "JPEGImages" / f"a_{index}.jpg", random_image(rng))
        write_mask(root / "SegmentationClassAug" / f"a_{index}.png", rng.integers(0, 21, (8, 8)))
    return root


@pytest.fixture
def cityscapes_root(tmp_path: Path) -> Path:
    """CPS Cityscapes layout with two train images and a list file train_list.txt."""
    rng = np.random.default_rng(1)
    root = tmp_path / "city"
    lines = []
    for name in ("aachen_000000_000019", "bremen_000001_000019"):
        write_image(root / "images" / "train" / f"{name}.png", random_image(rng))
        write_mask(root / "segmentation" / "train" / f"{name}_gtFine.png", rng.integers(0, 19, (8, 8)))
        lines.append(f"/images/train/{name}.png\t/segmentation/train/{name}_gtFine.png\n")
    (root / "train_list.txt").write_text("".join(lines))
    return root


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    """Ten 8×8 samples s0..s9, 4 classes; every mask holds 0 and 1, class 2 only in s3, class 3 only in s7."""
    masks = {}
    for index in range(10):
        mask = np.zeros((8, 8), np.uint8)
        mask[4:, :] = 1
        if index == 3:
            mask[:2, :2] = 2
        if index == 7:
            mask[:2, 6:] = 3
            mask[7, 7] = 255
        masks[f"s{index}"] = mask
    return make_folder(tmp_path / "folder", masks, ["background", "one", "two", "three"])
