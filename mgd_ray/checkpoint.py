"""The files a job writes: a self-describing network record (``model.pt``) and its resumable training state.

``model.pt`` (format ``mgd_ray.segmenter/1``) carries the architecture, classes, normalisation,
training crop, palette and weights, so a file path is all a later user (a distillation job, the
study's report, ``mgd-ray predict``/``export``) has to give; ``read_segmenter`` is its one reader.
A checkpoint folder also holds the training state (``state.pt``) and every evaluation so far
(``history.json``), which is all a restarted job needs to continue where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from mgd_ray.config import ModelConfig
from mgd_ray.data.datasets import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, voc_palette
from mgd_ray.data.stream import JobData
from mgd_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mgd_ray.distributed import unwrap
from mgd_ray.files import atomic_write
from mgd_ray.models.deeplab import DeepLabV3Plus, build_segmenter

CHECKPOINT_FORMAT = "mgd_ray.segmenter/1"
STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
# Every evaluation's metrics so far, in each checkpoint: Ray Train V2's ``Result.metrics_dataframe``
# holds only the checkpoints it kept (``num_to_keep``), not the whole curve.
HISTORY_FILE = "history.json"


class CheckpointError(ValueError):
    """A model reference or checkpoint that cannot be used; the message names it and the fix."""


def dataset_palette(dataset: str | None, class_names: list[str]) -> list[tuple[int, int, int]]:
    """Colour per class id: Cityscapes' palette for Cityscapes, else the VOC colour map.

    The VOC map is VOC's own and the deterministic one the built-in masks are written with; a record
    without a dataset name (written before it was stored) is recognised as Cityscapes by its classes.
    """
    if dataset == "cityscapes" or (dataset is None and tuple(class_names) == CITYSCAPES_CLASSES):
        return [tuple(c) for c in CITYSCAPES_PALETTE]
    return list(voc_palette(len(class_names)))


def segmenter_record(model: nn.Module, cfg: ModelConfig, data: JobData, crop_size: int, role: str) -> dict[str, Any]:
    """A self-describing model record: enough to rebuild, check and use the network later."""
    return {
        "format": CHECKPOINT_FORMAT,
        "role": role,
        "model": cfg.model_dump(mode="json"),
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "crop_size": crop_size,
        "dataset": data.dataset,
        "palette": [list(c) for c in dataset_palette(data.dataset, data.class_names)],
        "state_dict": unwrap(model).state_dict(),
    }


@dataclass(kw_only=True)
class SegmenterRecord:
    """What a ``model.pt`` says about its network, without the weights."""

    path: Path
    role: str  # teacher, teacher:branchN, student, baseline/<method>[:branchN]
    model_cfg: ModelConfig
    num_classes: int
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_size: int
    palette: list[tuple[int, int, int]]
    dataset: str | None
    # The val metrics and confusion matrix (all ranks' pixels) of the evaluation that exported it.
    metrics: dict[str, float] = field(default_factory=dict)
    confusion: list[list[int]] | None = None
    # How many times each image was drawn to train it, per stream (labeled, unlabeled), over all ranks.
    drawn: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def is_teacher(self) -> bool:
        return self.role.split(":")[0] == "teacher"


def read_segmenter(path: Path, what: str = "") -> tuple[SegmenterRecord, dict[str, Tensor]]:
    """The record and the weights of a segmenter checkpoint; ``what`` (e.g. "teacher T_D") prefixes errors.

    Loaded with ``weights_only=True``: a checkpoint cannot run code. Records written before palette
    and dataset were stored get the palette of their class list.
    """
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise CheckpointError(f"{name}: no such checkpoint file; check the path (or train it first)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises anything from zip, pickle or storage errors
        raise CheckpointError(f"{name}: not a readable PyTorch checkpoint ({err}); check the file") from err
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{name}: not an mgd_ray segmenter checkpoint ({CHECKPOINT_FORMAT}); use the model.pt a job or study wrote"
        )
    try:
        model_cfg = ModelConfig.model_validate(raw["model"])
    except ValidationError as err:
        raise CheckpointError(f"{name}: its model description is invalid ({err})") from err
    class_names = [str(c) for c in raw["class_names"]]
    palette = raw.get("palette") or dataset_palette(raw.get("dataset"), class_names)
    record = SegmenterRecord(
        path=path,
        role=str(raw["role"]),
        model_cfg=model_cfg,
        num_classes=int(raw["num_classes"]),
        class_names=class_names,
        mean=tuple(raw["mean"]),
        std=tuple(raw["std"]),
        crop_size=int(raw["crop_size"]),
        palette=[(int(r), int(g), int(b)) for r, g, b in palette],
        dataset=raw.get("dataset"),
        metrics=dict(raw.get("metrics", {})),
        confusion=raw.get("confusion"),
        drawn={str(k): dict(v) for k, v in raw.get("drawn", {}).items()},
    )
    return record, raw["state_dict"]


def rebuild(record: SegmenterRecord, weights: dict[str, Tensor]) -> DeepLabV3Plus:
    """The record's network with its weights (no ImageNet download: the weights replace them)."""
    model = build_segmenter(record.model_cfg, record.num_classes, pretrained=False)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(
            f"{record.path}: weights do not fit a {record.model_cfg.backbone} segmenter ({err})"
        ) from err
    return model


def load_segmenter(path: Path, expect: ModelConfig | None, num_classes: int, what: str = "teacher") -> DeepLabV3Plus:
    """Rebuild a network from a checkpoint, refusing another architecture (than ``expect``) or class count."""
    record, weights = read_segmenter(path, what)
    saved = record.model_cfg
    if expect is not None and (saved.backbone, saved.output_stride, saved.stem) != (
        expect.backbone,
        expect.output_stride,
        expect.stem,
    ):
        raise CheckpointError(
            f"{what} checkpoint {path} holds a {saved.backbone} (output stride {saved.output_stride}, stem "
            f"{saved.stem}) but the config expects {expect.backbone} (output stride {expect.output_stride}, stem "
            f"{expect.stem}); point the config at the right checkpoint or change its model"
        )
    if record.num_classes != num_classes:
        raise CheckpointError(
            f"{what} checkpoint {path} predicts {record.num_classes} classes but the dataset has {num_classes}"
        )
    return rebuild(record, weights)


# ---------------------------------------------------------------------------- training state
def save_state(directory: Path, state: dict[str, Any]) -> Path:
    """Write the training state atomically (temp file then rename) into ``directory``.

    ``state["history"]`` goes to ``HISTORY_FILE`` (JSON, readable without torch), the rest to
    ``STATE_FILE``, written last.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / HISTORY_FILE).write_text(json.dumps(state.get("history", []), indent=1))
    atomic_write(
        directory / STATE_FILE, lambda tmp: torch.save({k: v for k, v in state.items() if k != "history"}, tmp)
    )
    return directory


def load_state(directory: Path) -> dict[str, Any]:
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    history = directory / HISTORY_FILE
    return state | {"history": json.loads(history.read_text()) if history.is_file() else []}
