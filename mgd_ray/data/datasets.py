"""Reading VOC, Cityscapes and plain-folder segmentation data into samples, and a manifest-backed Dataset.

Every problem (missing file, unknown id, path outside the root, duplicate, corrupt file, label out of
range) raises `DatasetError` naming the file, and the list line where there is one: a sample is never
silently skipped, because a silently shrunken labeled set changes the experiment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MASK_MODES = ("L", "P")
SUBSETS = ("labeled", "unlabeled", "val", "test")
Subset = Literal["labeled", "unlabeled", "val", "test"]
PairTransform = Callable[[tv_tensors.Image, tv_tensors.Mask | None], tuple[torch.Tensor, torch.Tensor | None]]

# Data tables: one entry after another, as the datasets list them.
# fmt: off
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
# fmt: on


def voc_palette(n: int = 256) -> tuple[tuple[int, int, int], ...]:
    """The PASCAL VOC colour map (bit-interleaved class index), also used for the built-in masks."""
    colours = []
    for index in range(n):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


VOC_PALETTE = voc_palette(len(VOC_CLASSES))


class DatasetError(ValueError):
    """A dataset, list or manifest problem; the message names the file (and line) and the fix."""


@dataclass(frozen=True)
class Sample:
    """One image and its label mask (None when the dataset has no label for it)."""

    id: str
    image: Path
    label: Path | None


def inside_root(real_root: Path, path: Path, where: str) -> Path:
    """Return `path` made absolute, refusing one that resolves (through '..' or symlinks) outside root.

    `real_root` is the root already resolved, so a list of thousands of paths resolves it once.
    """
    resolved = path.resolve()
    if not resolved.is_relative_to(real_root):
        raise DatasetError(
            f"{where}: {path} resolves to {resolved}, outside the dataset root {real_root}; "
            "list paths must stay inside the root (no '..', no symlinks leading out): "
            "copy or bind-mount the data under the root instead"
        )
    return path.absolute()


def _require_file(path: Path, what: str, where: str, fix: str) -> None:
    if not path.is_file():
        raise DatasetError(f"{where}: {what} {path} does not exist; {fix}")


def _check_unique(names: Sequence[str], where: str) -> None:
    """`names` are the lines of the file `where`, numbered from 1."""
    first_line: dict[str, int] = {}
    for line, name in enumerate(names, start=1):
        if name in first_line:
            raise DatasetError(
                f"{where} line {line}: {name!r} already appears on line {first_line[name]}; remove the duplicate"
            )
        first_line[name] = line


def voc_label_dir(root: Path) -> Path:
    """SegmentationClassAug (the SBD train_aug labels); SegmentationClass only when Aug is absent."""
    aug, plain = root / "SegmentationClassAug", root / "SegmentationClass"
    if aug.is_dir() or not plain.is_dir():
        return aug
    return plain


def voc_samples(root: Path, ids: Sequence[str], list_name: str) -> list[Sample]:
    """Samples for VOC ids in the train_aug layout (JPEGImages/<id>.jpg + <label dir>/<id>.png).

    `list_name` names the id list in errors; ids are numbered from 1 as lines of that list.
    """
    root = Path(root)
    if not (root / "JPEGImages").is_dir():
        raise DatasetError(
            f"{root}: no JPEGImages/ folder; pass the VOC2012 root that holds JPEGImages/ and "
            "SegmentationClassAug/ (e.g. .../VOCdevkit/VOC2012)"
        )
    label_dir = voc_label_dir(root)
    real_root = root.resolve()
    _check_unique(ids, list_name)
    samples = []
    for line, sample_id in enumerate(ids, start=1):
        where = f"{list_name} line {line}"
        image = inside_root(real_root, root / "JPEGImages" / f"{sample_id}.jpg", where)
        label = inside_root(real_root, label_dir / f"{sample_id}.png", where)
        _require_file(
            image,
            f"image of id {sample_id!r}",
            where,
            "the id is not in this dataset: check the root or restore the image",
        )
        _require_file(
            label,
            f"label of id {sample_id!r}",
            where,
            f"install the SBD train_aug labels into {label_dir} or restore the file",
        )
        samples.append(Sample(sample_id, image, label))
    return samples


def read_id_list(path: Path) -> list[str]:
    """One id per line; CRLF endings, surrounding blanks and a missing final newline are tolerated."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read id list ({err}); check the path") from err
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    ids = []
    for line_number, line in enumerate(lines, start=1):
        sample_id = line.strip()
        if not sample_id or len(sample_id.split()) != 1:
            raise DatasetError(f"{path} line {line_number}: expected one id, got {line!r}; fix the line")
        ids.append(sample_id)
    return ids


def read_pair_list(list_file: Path) -> list[tuple[int, str, str]]:
    """(line number, image path, label path) per non-blank line of a tab-separated two-column list."""
    try:
        lines = Path(list_file).read_text().splitlines()
    except OSError as err:
        raise DatasetError(f"{list_file}: cannot read list ({err}); check the path") from err
    pairs = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.strip().split("\t")]
        if len(fields) != 2 or not all(fields):
            raise DatasetError(
                f"{list_file} line {line_number}: expected '<image path><TAB><label path>', got {line!r}; fix the line"
            )
        pairs.append((line_number, fields[0], fields[1]))
    return pairs


def cityscapes_samples(root: Path, list_file: Path | str) -> list[Sample]:
    """Samples from a CPS-style Cityscapes list: `/images/.../x.png<TAB>/segmentation/.../x_gtFine.png`.

    Paths are relative to root (a leading '/' too); the id is the image file stem.
    """
    root, list_file = Path(root), Path(list_file)
    real_root = root.resolve()
    samples: list[Sample] = []
    first_line: dict[str, int] = {}
    for line_number, image_path, label_path in read_pair_list(list_file):
        where = f"{list_file} line {line_number}"
        image = inside_root(real_root, root / image_path.lstrip("/"), where)
        label = inside_root(real_root, root / label_path.lstrip("/"), where)
        if image.stem in first_line:
            raise DatasetError(
                f"{where}: id {image.stem!r} already listed on line {first_line[image.stem]}; remove the duplicate"
            )
        first_line[image.stem] = line_number
        _require_file(image, "image", where, "check the dataset root or restore the file")
        _require_file(label, "label", where, "check the dataset root or restore the file (19-train-id PNGs)")
        samples.append(Sample(image.stem, image, label))
    return samples


def read_class_names(path: Path) -> list[str]:
    """One class name per line, class 0 first; blank lines in the middle are an error."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read class list ({err}); create it, one name per line") from err
    while lines and not lines[-1].strip():
        lines.pop()
    for line_number, name in enumerate(lines, start=1):
        if not name.strip():
            raise DatasetError(f"{path} line {line_number}: empty class name; name every class")
    if len(lines) < 2:
        raise DatasetError(f"{path}: needs at least 2 classes (background + one), found {len(lines)}")
    _check_unique([n.strip() for n in lines], str(path))
    return [n.strip() for n in lines]


def folder_samples(
    root: Path,
    images_dir: str = "images",
    labels_dir: str = "labels",
    classes_file: str = "classes.txt",
) -> tuple[list[Sample], list[str]]:
    """Every image in root/images_dir (jpg/jpeg/png) with its same-stem PNG mask, plus the class names.

    An image without a mask is unlabeled (``label`` None); a mask without an image is an error, as
    are two images with one id: nothing is skipped.
    """
    root = Path(root)
    image_root, label_root = root / images_dir, root / labels_dir
    for folder in (image_root, label_root):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: folder missing; a folder dataset needs {images_dir}/ and {labels_dir}/")
    class_names = read_class_names(root / classes_file)
    masks = {p.stem: p for p in label_root.iterdir() if p.suffix.lower() == ".png"}
    images: dict[str, Path] = {}
    for image in image_files(image_root):
        if image.stem in images:
            raise DatasetError(f"{image} and {images[image.stem]}: two images with id {image.stem!r}; keep one of them")
        images[image.stem] = image
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise DatasetError(
            f"{label_root}: masks without an image: {', '.join(orphans[:5])}"
            f"{' ...' if len(orphans) > 5 else ''}; add the images or remove the masks"
        )
    if not images:
        raise DatasetError(f"{image_root}: no images (.jpg/.jpeg/.png) found")
    real_root = root.resolve()
    samples = []
    for sample_id, image in images.items():
        label = masks.get(sample_id)
        where = str(image)
        samples.append(
            Sample(
                sample_id,
                inside_root(real_root, image, where),
                None if label is None else inside_root(real_root, label, where),
            )
        )
    return samples, class_names


def image_files(folder: Path) -> list[Path]:
    """The images (jpg/jpeg/png) at the top of ``folder``, sorted."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image(path: Path) -> np.ndarray:
    """RGB uint8 array H×W×3; a corrupt or unreadable file raises DatasetError naming it."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(
            f"{path}: cannot read image ({err}); replace the file or remove its id from the dataset"
        ) from err


def load_mask(path: Path, num_classes: int) -> np.ndarray:
    """Class-id mask H×W uint8 from an L- or P-mode PNG (P indices are the ids), values checked."""
    try:
        with Image.open(path) as image:
            if image.mode not in MASK_MODES:
                raise DatasetError(
                    f"{path}: mask has PIL mode {image.mode!r}; save masks as single-channel 8-bit PNGs "
                    "(mode L or P) whose pixel values are class ids"
                )
            mask = np.array(image)
    except DatasetError:
        raise
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(
            f"{path}: cannot read mask ({err}); replace the file or remove its id from the dataset"
        ) from err
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        values = np.unique(mask[bad]).tolist()
        raise DatasetError(
            f"{path}: mask values {values} outside the allowed range 0..{num_classes - 1} "
            f"(or {IGNORE_INDEX} = ignore); map them to class ids or {IGNORE_INDEX}, "
            "or fix num_classes / the class list"
        )
    return mask


class SegmentationDataset(Dataset):
    """The rows of one manifest subset as `{"image", "label" (labeled/val only), "id"}` items.

    Without a transform the image is only converted to float in [0, 1]. Unlabeled rows never load a
    label, whatever the files on disk hold.
    """

    def __init__(
        self,
        manifest: pa.Table,
        subset: Subset,
        num_classes: int,
        transform: PairTransform | None = None,
    ) -> None:
        if subset not in SUBSETS:
            raise DatasetError(f"subset {subset!r} is not one of {SUBSETS}")
        rows = manifest.filter(pc.equal(manifest["subset"], subset))
        if rows.num_rows == 0:
            raise DatasetError(f"the manifest has no {subset!r} rows; rebuild it with a partition that has some")
        self.subset = subset
        self.num_classes = num_classes
        self.transform = transform
        self.ids: list[str] = rows["id"].to_pylist()
        self.images: list[str] = rows["image_path"].to_pylist()
        self.labels: list[str | None] = (
            [None] * rows.num_rows if subset == "unlabeled" else rows["label_path"].to_pylist()
        )

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        image_path, label_path = self.images[index], self.labels[index]
        image = tv_tensors.Image(torch.from_numpy(load_image(Path(image_path))).permute(2, 0, 1))
        mask = None
        if label_path is not None:
            array = load_mask(Path(label_path), self.num_classes)
            if array.shape != tuple(image.shape[-2:]):
                raise DatasetError(
                    f"{label_path}: mask is {array.shape[1]}×{array.shape[0]} but its image {image_path} is "
                    f"{image.shape[-1]}×{image.shape[-2]} (W×H); masks must match their image's size"
                )
            mask = tv_tensors.Mask(torch.from_numpy(array))
        if self.transform is None:
            image_out = F.to_dtype(image, torch.float32, scale=True).as_subclass(torch.Tensor)
            mask_out = None if mask is None else mask.as_subclass(torch.Tensor).long()
        else:
            image_out, mask_out = self.transform(image, mask)
        item: dict[str, torch.Tensor | str] = {"image": image_out, "id": self.ids[index]}
        if mask_out is not None:
            item["label"] = mask_out
        return item
