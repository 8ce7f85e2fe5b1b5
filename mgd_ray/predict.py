"""Use a trained segmenter on images: find its checkpoint, rebuild it, write colour masks and overlays.

A checkpoint (``mgd_ray.segmenter/1``, see ``checkpoint.segmenter_record``) carries the
architecture, classes, normalisation, training crop and palette, so a file path, an MLflow run id or
a ``models:/name/version`` URI is all a user has to give. Inputs are checked before anything is
written, and outputs go to a staging folder that is renamed into place only when every image is done.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from mgd_ray.checkpoint import CHECKPOINT_FORMAT, MODEL_FILE, CheckpointError, SegmenterRecord, read_segmenter, rebuild
from mgd_ray.data.datasets import DatasetError, image_files, load_image
from mgd_ray.data.transforms import normalise_uint8
from mgd_ray.metrics import sliding_window_logits
from mgd_ray.models.deeplab import DeepLabV3Plus
from mgd_ray.plots import overlay
from mgd_ray.tracking import CHECKPOINT_ARTIFACT, client_for

# Where a run keeps its self-describing checkpoint: a training run, or a study's parent run, which
# holds the registered best student's checkpoint (the registered model holds it too: serving.py).
RUN_ARTIFACTS = (CHECKPOINT_ARTIFACT, f"best_student_checkpoint/{MODEL_FILE}", f"model/{MODEL_FILE}")
Window = int | Literal["auto"] | None


class ImageError(ValueError):
    """An input image or output path problem; the message names the file."""


@dataclass(kw_only=True)
class Segmenter(SegmenterRecord):
    """A network rebuilt from a checkpoint, with its record: what is needed to run it and colour its output."""

    model: DeepLabV3Plus

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> str:
        data = f" ({self.dataset})" if self.dataset else ""
        return (
            f"{self.role} {self.model_cfg.backbone} (output stride {self.model_cfg.output_stride}), "
            f"{self.num_classes} classes{data}, crop {self.crop_size}, from {self.path}"
        )

    def metadata(self) -> dict[str, Any]:
        """The record's description without the weights (written beside exported models)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "role": self.role,
            "model": self.model_cfg.model_dump(mode="json"),
            "class_names": self.class_names,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_size": self.crop_size,
            "palette": [list(c) for c in self.palette],
            "dataset": self.dataset,
            "input": "float32 (N, 3, H, W) RGB scaled to [0, 1], then (x - mean) / std",
            "output": "float32 (N, num_classes, H, W) logits at the input resolution",
        }

    def normalise(self, images: Sequence[np.ndarray]) -> Tensor:
        """Same-size H×W×3 uint8 images → normalised (N, 3, H, W) float batch on the model's device."""
        return normalise_uint8(torch.from_numpy(np.stack(images)).to(self.device), self.mean, self.std)


# ---------------------------------------------------------------------------- finding and loading a model
def resolve_model(ref: str | Path, tracking_uri: str | None = None, dest: Path | None = None) -> Path:
    """A local checkpoint file for ``ref``: a file, a folder holding ``model.pt``, an MLflow run id, or a
    ``models:/name/version`` (``models:/name@alias``) or ``runs:/id/path`` URI, downloaded into ``dest``.

    A registered model is searched for a ``model.pt`` (the served model keeps its checkpoint among its
    artifacts); one without resolves to the checkpoint logged by the run it came from.
    """
    text = str(ref)
    path = Path(text)
    if path.is_dir() and (path / MODEL_FILE).is_file():
        return path / MODEL_FILE
    if path.is_file():
        return path
    is_uri = text.startswith(("models:/", "runs:/"))
    if not is_uri and (os.sep in text or text.endswith(".pt")):
        raise CheckpointError(f"{text}: no such checkpoint file (nor a folder holding {MODEL_FILE}); check the path")
    store = tracking_uri.removeprefix("sqlite:///") if tracking_uri and tracking_uri.startswith("sqlite:///") else None
    if tracking_uri is None or (store is not None and not Path(store).is_file()):
        raise CheckpointError(
            f"{text}: not a checkpoint file, and there is no MLflow store {tracking_uri or ''} to look it up in; "
            "give a checkpoint path, or the tracking URI of the study's store (--tracking-uri)"
        )
    dest = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="mgd_ray_model_"))
    if not is_uri:
        return _run_checkpoint(text, tracking_uri, dest)
    version = _model_version(text, tracking_uri) if text.startswith("models:/") else None
    location = text
    try:
        if version is not None:  # the registry's storage location: models:/ alone would use the default registry
            location = client_for(tracking_uri).get_model_version_download_uri(version.name, version.version)
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dest), tracking_uri=tracking_uri)
        )
    except (MlflowException, OSError) as err:
        raise CheckpointError(f"{text}: cannot download {location} from MLflow at {tracking_uri} ({err})") from err
    found = _checkpoint_in(local)
    if found is not None:
        return found
    if version is not None and version.run_id:
        return _run_checkpoint(version.run_id, tracking_uri, dest, via=text)
    raise CheckpointError(f"{text}: downloaded to {local} but it holds no {MODEL_FILE}; point at the checkpoint")


def _checkpoint_in(local: Path) -> Path | None:
    if local.is_file():
        return local if local.suffix == ".pt" else None
    found = sorted(local.rglob(MODEL_FILE))
    return found[0] if found else None


def _model_version(uri: str, tracking_uri: str) -> ModelVersion:
    """The registered version ``models:/name/version`` or ``models:/name@alias`` names."""
    rest = uri.removeprefix("models:/")
    client = client_for(tracking_uri)
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        name, number = rest.rsplit("/", 1)
        return client.get_model_version(name, number)
    except (MlflowException, ValueError) as err:
        raise CheckpointError(
            f"{uri}: no such registered model version in MLflow at {tracking_uri} ({err}); "
            "write models:/name/version or models:/name@alias, with --tracking-uri of its store"
        ) from err


def _run_checkpoint(run_id: str, tracking_uri: str, dest: Path, via: str | None = None) -> Path:
    errors = []
    for artifact in RUN_ARTIFACTS:
        try:
            return Path(
                mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=artifact, dst_path=str(dest), tracking_uri=tracking_uri
                )
            )
        except (MlflowException, OSError) as err:
            errors.append(f"{artifact}: {str(err).splitlines()[0]}")
    what = f"{via} (run {run_id})" if via else run_id
    raise CheckpointError(
        f"{what}: not a checkpoint file, and MLflow at {tracking_uri} has no run {run_id} with "
        f"{' or '.join(RUN_ARTIFACTS)} ({'; '.join(errors)}); give a checkpoint path, the run id of a "
        "trained model or models:/name/version, and --tracking-uri of the store that holds it"
    )


def load_checkpoint(
    path: Path,
    *,
    allow_teacher: bool = True,
    expect_classes: Sequence[str] | None = None,
    device: torch.device | str | None = None,
) -> Segmenter:
    """Rebuild the network of a segmenter checkpoint in eval mode on ``device`` (CUDA when present).

    Refuses a teacher unless ``allow_teacher``, and a class list other than ``expect_classes``.
    """
    record, weights = read_segmenter(path)
    cfg = record.model_cfg
    if record.is_teacher and not allow_teacher:
        raise CheckpointError(
            f"{path}: holds a teacher ({record.role}, {cfg.backbone}) where a student is expected; use the student "
            "checkpoint (a study's best student or `mgd-ray train student` output), or allow a teacher "
            "explicitly (--allow-teacher)"
        )
    if expect_classes is not None and list(expect_classes) != record.class_names:
        raise CheckpointError(
            f"{path}: predicts classes {record.class_names} but {list(expect_classes)} are expected; "
            "use a checkpoint trained on this class list"
        )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return Segmenter(**vars(record), model=rebuild(record, weights).to(device).eval())


# ---------------------------------------------------------------------------- inference
def window_size(seg: Segmenter, window: Window, height: int, width: int) -> int | None:
    """The sliding window for an image: ``auto`` = the training crop when the image exceeds it."""
    size = seg.crop_size if window == "auto" else window
    if size is None or max(height, width) <= size:
        return None
    return size


@torch.inference_mode()
def predict_batch(seg: Segmenter, images: Sequence[np.ndarray], window: Window = "auto") -> np.ndarray:
    """Class ids (N, H, W) uint8 for same-size H×W×3 uint8 images, by sliding window when larger than it."""
    x = seg.normalise(images)
    size = window_size(seg, window, *x.shape[-2:])
    if size is None:
        logits = seg.model(x).logits
    else:
        logits = sliding_window_logits(lambda t: seg.model(t).logits, x, seg.num_classes, size)
    return logits.argmax(1).to(torch.uint8).cpu().numpy()


def _batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped by image size (a batch holds one size), in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(size, []).append(i)
    for indices in groups.values():
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]


def predict_labels(
    seg: Segmenter, images: Sequence[np.ndarray], window: Window = "auto", batch_size: int = 4
) -> list[np.ndarray]:
    """One H×W class-id map per H×W×3 uint8 image (any sizes), in order."""
    out: list[np.ndarray] = [np.empty(0)] * len(images)
    for batch in _batches([im.shape[:2] for im in images], batch_size):
        for i, labels in zip(batch, predict_batch(seg, [images[i] for i in batch], window), strict=True):
            out[i] = labels
    return out


# ---------------------------------------------------------------------------- files
def collect_images(inputs: Sequence[Path]) -> list[Path]:
    """Image files named directly or found (jpg/jpeg/png, sorted) at the top of the named folders."""
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += image_files(item)
        elif item.is_file():
            found.append(item)
        else:
            raise ImageError(f"{item}: no such image file or folder")
    if not found:
        raise ImageError(f"no images (.jpg/.jpeg/.png) in {', '.join(map(str, inputs))}")
    return found


def read_image(path: Path) -> np.ndarray:
    """H×W×3 uint8; an unreadable file raises ImageError naming it."""
    try:
        return load_image(path)
    except DatasetError as err:
        raise ImageError(f"{path}: cannot read image ({err.__cause__}); fix the file or leave it out") from err


def output_names(images: Sequence[Path]) -> list[tuple[str, str]]:
    """(mask, overlay) file names per image: ``<stem>.png`` and ``<stem>_overlay.png``; stems must differ."""
    seen: dict[str, Path] = {}
    for image in images:
        if image.stem in seen:
            raise ImageError(
                f"{image} and {seen[image.stem]} would both write {image.stem}.png; predict them into different --out folders"
            )
        seen[image.stem] = image
    return [(f"{p.stem}.png", f"{p.stem}_overlay.png") for p in images]


def mask_image(labels: np.ndarray, palette: Sequence[tuple[int, int, int]]) -> Image.Image:
    """A P-mode image: pixel values are class ids, shown in the palette's colours."""
    mask = Image.fromarray(labels.astype(np.uint8))
    colours = [c for colour in palette for c in colour][: 256 * 3]
    mask.putpalette(colours + [0] * (256 * 3 - len(colours)))  # a full palette: PIL writes 8-bit indices
    return mask


def save_mask(labels: np.ndarray, palette: Sequence[tuple[int, int, int]], path: Path) -> None:
    """``mask_image`` as a PNG file."""
    mask_image(labels, palette).save(path)


def predict_files(
    seg: Segmenter,
    inputs: Sequence[Path],
    out_dir: Path,
    *,
    window: Window = "auto",
    batch_size: int = 4,
    progress: bool = True,
) -> list[tuple[Path, Path]]:
    """Write ``<stem>.png`` (colour mask) and ``<stem>_overlay.png`` per input image into ``out_dir``.

    Every image is read once before anything is written; outputs appear only when all are done.
    Returns (mask, overlay) paths in input order.
    """
    images = collect_images(inputs)
    names = output_names(images)
    out_dir = Path(out_dir)
    targets = [(out_dir / m, out_dir / o) for m, o in names]
    inputs_resolved = {p.resolve() for p in images}
    for target in (t for pair in targets for t in pair):
        if target.resolve() in inputs_resolved:
            raise ImageError(f"{target}: is an input image and would be overwritten; choose another --out folder")
    sizes = [read_image(p).shape[:2] for p in images]
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".predict-", dir=out_dir))
    try:
        with tqdm(total=len(images), unit="img", desc="predict", disable=not progress) as bar:
            for batch in _batches(sizes, batch_size):
                arrays = [read_image(images[i]) for i in batch]
                for i, image, labels in zip(batch, arrays, predict_batch(seg, arrays, window), strict=True):
                    save_mask(labels, seg.palette, staging / names[i][0])
                    Image.fromarray(overlay(image, labels, seg.palette)).save(staging / names[i][1])
                bar.update(len(batch))
        for (mask_name, overlay_name), (mask, over) in zip(names, targets, strict=True):
            os.replace(staging / mask_name, mask)
            os.replace(staging / overlay_name, over)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    staging.rmdir()
    return targets
