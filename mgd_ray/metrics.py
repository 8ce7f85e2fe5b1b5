"""Segmentation metrics: a confusion matrix accumulated over a whole split, mIoU, sliding windows, a job's evaluation.

mIoU follows the convention of CPS/MGD's evaluation: IoU_c = TP / (TP + FP + FN) from a confusion
matrix summed over every pixel of the split (not averaged per image); a class with no pixel in
either the ground truth or the prediction has an undefined IoU (NaN) and is left out of the mean
(``nanmean``). A class present in the ground truth but never predicted (or vice versa) counts as 0.
Pixels labeled ``ignore_index`` are excluded.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from mgd_ray.data.datasets import IGNORE_INDEX
from mgd_ray.data.stream import pad_collate
from mgd_ray.distributed import DistEnv, unwrap


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(C, C) int64 matrix; rows are ground-truth classes, columns predicted classes."""
    valid = target != ignore_index
    t = target[valid].long()
    p = pred[valid].long()
    if t.numel() and (int(t.max()) >= num_classes or int(t.min()) < 0):
        raise ValueError(
            f"confusion_matrix: ground-truth value {int(t.max())} outside [0, {num_classes}) "
            f"and not the ignore index {ignore_index}"
        )
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).to(torch.int64)


def iou_per_class(conf: Tensor) -> Tensor:
    """IoU per class (float64) from a confusion matrix; NaN where the class never occurs."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))


def mean_iou(conf: Tensor) -> float:
    """Mean over classes of ``iou_per_class``, ignoring undefined (NaN) classes."""
    return float(torch.nanmean(iou_per_class(conf)))


def pixel_accuracy(conf: Tensor) -> float:
    """Fraction of labeled pixels predicted correctly."""
    total = conf.sum()
    return float(conf.diag().sum().double() / total) if total > 0 else math.nan


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches; ``all_reduce`` sums it over DDP ranks."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.matrix += confusion_matrix(pred, target.to(pred.device), self.num_classes, self.ignore_index).to(
            self.matrix.device
        )

    def all_reduce(self) -> None:
        """Sum over every rank of the default process group (no-op when not distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def miou(self) -> float:
        return mean_iou(self.matrix)

    def iou(self) -> list[float]:
        return iou_per_class(self.matrix).tolist()


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets covering [0, length) with windows of ``window``; the last one is flush right."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window, stride))
    starts.append(length - window)
    return starts


@torch.no_grad()
def sliding_window_logits(
    predict: Callable[[Tensor], Tensor],
    image: Tensor,
    num_classes: int,
    window: int,
    stride: int | None = None,
) -> Tensor:
    """Logits (N, C, H, W) for images larger than the training crop, window by window.

    ``predict`` maps an (N, 3, window, window) batch to logits of the same size. Images smaller than
    the window are zero-padded (bottom/right) to it, as the VOC evaluation pads to one 512 crop. The
    default stride is ceil(2/3 · window) as in the Cityscapes evaluation of CPS/MGD. Overlapping
    windows' logits are averaged; the official code sums them, which gives the same argmax since
    every class at a pixel is covered by the same windows.
    """
    stride = stride or math.ceil(window * 2 / 3)
    if stride <= 0 or stride > window:
        raise ValueError(f"sliding_window_logits: stride must be in (0, window={window}], got {stride}")
    n, _, h, w = image.shape
    ph, pw = max(h, window), max(w, window)
    padded = F.pad(image, (0, pw - w, 0, ph - h))
    out = torch.zeros(n, num_classes, ph, pw, dtype=torch.float32, device=image.device)
    count = torch.zeros(1, 1, ph, pw, dtype=torch.float32, device=image.device)
    for y in _window_starts(ph, window, stride):
        for x in _window_starts(pw, window, stride):
            crop = padded[:, :, y : y + window, x : x + window]
            out[:, :, y : y + window, x : x + window] += predict(crop).float()
            count[:, :, y : y + window, x : x + window] += 1
    return (out / count)[:, :, :h, :w]


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Dataset, num_classes: int, env: DistEnv, batch: int, window: int | None = None
) -> ConfusionMatrix:
    """Confusion matrix over a whole split (a job's val, a study's test), each rank a shard, summed across ranks."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    indices = list(range(env.rank, len(split), env.world_size))  # type: ignore[arg-type]
    loader = DataLoader(Subset(split, indices), batch_size=batch, collate_fn=pad_collate)
    cm = ConfusionMatrix(num_classes, device=env.device)
    for b in loader:
        x = b["image"].to(env.device)
        if window is None:
            logits = net(x).logits
        else:
            logits = sliding_window_logits(lambda t: net(t).logits, x, num_classes, window)
        cm.update(logits.argmax(1), b["label"].to(env.device))
    cm.all_reduce()
    net.train(was_training)
    return cm


def eval_metrics(cm: ConfusionMatrix, class_names: list[str], prefix: str = "val") -> dict[str, float]:
    """``{prefix}/mIoU`` and ``{prefix}/IoU/<class>`` of a split's confusion matrix."""
    out = {f"{prefix}/mIoU": cm.miou()}
    for name, iou in zip(class_names, cm.iou(), strict=True):
        out[f"{prefix}/IoU/{name}"] = iou
    return out
