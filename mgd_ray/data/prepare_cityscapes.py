"""Cityscapes from the official zips: train ids, the CPS layout the shipped lists name, verify, manifest.

Input: `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` as downloaded (after login) from
https://www.cityscapes-dataset.com/downloads/, or the folders they extract to. Output, next to them:
`images/{train,val}/<city>_<seq>_<frame>.png` and `segmentation/{train,val}/<...>_gtFine.png` whose
pixels are the 19 train ids (255 = ignore). The test split is left out: its labels are not public.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mgd_ray.data import partitions
from mgd_ray.data.datasets import (
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    DatasetError,
    read_pair_list,
)
from mgd_ray.data.prepare_voc import (
    Prepared,
    atomic_path,
    save_palette_png,
    subset_counts,
    verify_lists,
)

DOWNLOAD_PAGE = "https://www.cityscapes-dataset.com/downloads/"
IMAGES_ZIP, LABELS_ZIP = "leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"
SPLITS = ("train", "val")
CITYSCAPES_EXPECTED = {"train.txt": 2_975, "val.txt": 500}

# (name, label id, train id), from cityscapesScripts `cityscapesscripts/helpers/labels.py`
# (https://github.com/mcordts/cityscapesScripts, MIT). Train id 255 or -1 means ignored in training
# and evaluation; label id -1 (license plate) is never drawn into the label-id PNGs.
# fmt: off
CITYSCAPES_LABELS = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
    ("license plate", -1, -1),
)
# fmt: on
IMAGE_MEMBER = re.compile(r"leftImg8bit/(train|val)/[^/]+/([^/]+)_leftImg8bit\.png")
LABEL_MEMBER = re.compile(r"gtFine/(train|val)/[^/]+/([^/]+)_gtFine_labelIds\.png")


def train_id_lut() -> tuple[np.ndarray, np.ndarray]:
    """(lookup table label id → train id, which uint8 values are label ids at all); -1 is stored as 255."""
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    known = np.zeros(256, bool)
    for _, label_id, train_id in CITYSCAPES_LABELS:
        lut[label_id % 256] = IGNORE_INDEX if train_id < 0 else train_id
        known[label_id % 256] = True
    return lut, known


def to_train_ids(label_ids: np.ndarray, where: str) -> np.ndarray:
    """Map a label-id mask to train ids; a value that is no Cityscapes label id is an error naming `where`."""
    lut, known = train_id_lut()
    bad = ~known[label_ids]
    if bad.any():
        raise DatasetError(
            f"{where}: values {np.unique(label_ids[bad]).tolist()} are not Cityscapes label ids (0..33); "
            "this is not a *_gtFine_labelIds.png file: download gtFine_trainvaltest.zip again"
        )
    return lut[label_ids]


@contextmanager
def _source(root: Path, archive: str, folder: str) -> Iterator[tuple[list[str], Callable[[str], bytes]]]:
    """(member names, reader of a member's bytes) of the zip in root, or else of the folder it extracts to."""
    path = root / archive
    if path.is_file():
        try:
            with zipfile.ZipFile(path) as zf:
                yield zf.namelist(), zf.read
        except zipfile.BadZipFile as err:
            raise DatasetError(f"{path}: not a readable zip ({err}); download it again from {DOWNLOAD_PAGE}") from err
    elif (root / folder).is_dir():
        names = [p.relative_to(root).as_posix() for p in sorted((root / folder).rglob("*.png"))]
        yield names, lambda name: (root / name).read_bytes()
    else:
        raise DatasetError(
            f"{path}: not found (nor the folder {root / folder} it extracts to); download {archive} from "
            f"{DOWNLOAD_PAGE} (free account) into {root}"
        )


def convert(root: Path, *, progress: bool = True) -> tuple[int, int]:
    """Write images/ and segmentation/ (train ids) for train and val from the two zips; returns the counts.

    Files already written are kept, so an interrupted run resumes.
    """
    palette = list(CITYSCAPES_PALETTE) + [(0, 0, 0)] * (256 - len(CITYSCAPES_PALETTE))
    with _source(root, IMAGES_ZIP, "leftImg8bit") as (names, read_member):
        images = [(m, n) for n in names if (m := IMAGE_MEMBER.fullmatch(n))]
        for match, name in tqdm(images, desc="images", unit="image", disable=not progress):
            target = root / "images" / match[1] / f"{match[2]}.png"
            if not target.is_file():
                with atomic_path(target) as temporary:
                    temporary.write_bytes(read_member(name))
    with _source(root, LABELS_ZIP, "gtFine") as (names, read_member):
        labels = [(m, n) for n in names if (m := LABEL_MEMBER.fullmatch(n))]
        for match, name in tqdm(labels, desc="labels → train ids", unit="label", disable=not progress):
            target = root / "segmentation" / match[1] / f"{match[2]}_gtFine.png"
            if not target.is_file():
                where = f"{root / LABELS_ZIP}:{name}"
                save_palette_png(to_train_ids(_read_label_ids(read_member(name), where), where), target, palette)
    return len(images), len(labels)


def _read_label_ids(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode != "L":
                raise DatasetError(f"{where}: PIL mode {image.mode!r}, expected an 8-bit label-id PNG (mode L)")
            return np.array(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{where}: cannot read the PNG ({err}); download gtFine_trainvaltest.zip again") from err


def _cityscapes_entries(root: Path) -> dict[str, list[tuple[str, list[Path]]]]:
    """Every shipped list of the train/val splits → [(id, [image, label])]; test.txt is left out."""
    lists = sorted(p for p in (partitions.SPLITS_DIR / "cityscapes").glob("*.txt") if p.name != "test.txt")
    return {
        path.name: [
            (Path(image).stem, [root / image.lstrip("/"), root / label.lstrip("/")])
            for _, image, label in read_pair_list(path)
        ]
        for path in lists
    }


def prepare_cityscapes(
    root: Path,
    fraction: str | float = "1/16",
    *,
    expected: dict[str, int] = CITYSCAPES_EXPECTED,
    progress: bool = True,
) -> Prepared:
    """Convert the zips in `root` into the CPS layout there, verify every shipped list, write the manifest.

    Without zips (or their folders) an existing images/ + segmentation/ layout is verified as it is.
    """
    root = Path(root).absolute()
    sources = [root / IMAGES_ZIP, root / LABELS_ZIP, root / "leftImg8bit", root / "gtFine"]
    if (root / "images").is_dir() and not any(p.exists() for p in sources):
        step = "images/ and segmentation/ used as found (no zips in the root)"
    else:
        num_images, num_labels = convert(root, progress=progress)
        step = f"images/ and segmentation/ written from {num_images:,} images and {num_labels:,} label-id maps"
    verified = verify_lists(
        _cityscapes_entries(root),
        expected,
        f"the zips in {root} lack these files: download them again from {DOWNLOAD_PAGE}",
    )
    table = partitions.cityscapes_manifest(root, fraction)
    name, _ = partitions.parse_fraction(fraction)
    manifest = partitions.write_manifest(table, root / f"manifest_cityscapes_classic_{name}.parquet")
    return Prepared(
        dataset="Cityscapes (gtFine, 19 train ids)",
        data_root=root,
        manifest=manifest,
        verified=verified,
        subsets=subset_counts(table),
        data_config=f"{{dataset: cityscapes, root: {root}, partition: {name.replace('-', '/')}}}",
        steps=[step],
    )
