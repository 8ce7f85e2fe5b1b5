"""A finished model's results: its recorded val confusion matrix, example predictions, its test figures.

Runs where the job's driver runs (after Ray Train returns), so the prediction overlays come from the
exported checkpoint itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mgd_ray.checkpoint import CheckpointError, load_segmenter, read_segmenter
from mgd_ray.config import DataConfig
from mgd_ray.data.stream import JobData, load_job_data
from mgd_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mgd_ray.distributed import DistEnv
from mgd_ray.metrics import eval_metrics, evaluate, mean_iou


@dataclass
class FinalEval:
    confusion: np.ndarray  # (C, C), rows = ground truth
    miou: float
    class_names: list[str]


def load_model(path: Path, num_classes: int, what: str) -> torch.nn.Module:
    """The network of a checkpoint, whatever its architecture, in eval mode."""
    return load_segmenter(path, None, num_classes, what).eval()


def recorded_evaluation(path: Path) -> FinalEval:
    """The val confusion matrix the job computed (over all ranks) when it exported ``path``.

    The job already evaluated this network on the whole val split, in parallel on its own devices;
    evaluating it again here, in the trial's process that holds no CPU or GPU, would repeat that.
    """
    record, _ = read_segmenter(path)
    if record.confusion is None:
        raise CheckpointError(
            f"{path}: no recorded val confusion matrix (written by an older mgd_ray); evaluate it with `mgd-ray predict`"
        )
    matrix = torch.tensor(record.confusion, dtype=torch.int64)
    return FinalEval(confusion=matrix.numpy(), miou=float(mean_iou(matrix)), class_names=record.class_names)


@torch.no_grad()
def example_predictions(
    models: dict[str, Path], data: JobData, count: int = 4
) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, list[np.ndarray]]]:
    """(images as HxWx3 uint8, ground truths, {model name: predicted label maps}) on the first val images."""
    loaded = {name: load_model(p, data.num_classes, name) for name, p in models.items()}
    images, truths, preds = [], [], {name: [] for name in models}
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for i in range(min(count, len(data.val))):
        item = data.val[i]
        x = item["image"]
        images.append(((x * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())
        truths.append(item["label"].numpy())
        for name, model in loaded.items():
            preds[name].append(model(x[None]).logits.argmax(1)[0].numpy())
    return images, truths, preds


def save_examples(path: Path, models: dict[str, Path], data: JobData, count: int = 4) -> Path:
    """``example_predictions`` of fixed networks (the teachers), computed once for every run's overlay page.

    One ``.npz`` entry per image and model (val images may differ in size), so a trial loads no
    teacher to draw them.
    """
    images, truths, preds = example_predictions(models, data, count)
    arrays = {f"image/{i}": im for i, im in enumerate(images)} | {f"truth/{i}": t for i, t in enumerate(truths)}
    arrays |= {f"pred/{name}/{i}": p for name, maps in preds.items() for i, p in enumerate(maps)}
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)
    return path


def load_examples(path: Path) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, list[np.ndarray]]]:
    """What ``save_examples`` wrote, in ``example_predictions``' form."""
    with np.load(path) as z:
        entries = {k: z[k] for k in z.files}
    count = sum(k.startswith("image/") for k in entries)
    names = dict.fromkeys(k.split("/")[1] for k in entries if k.startswith("pred/"))
    return (
        [entries[f"image/{i}"] for i in range(count)],
        [entries[f"truth/{i}"] for i in range(count)],
        {name: [entries[f"pred/{name}/{i}"] for i in range(count)] for name in names},
    )


def evaluate_on_test(
    models: dict[str, Path], data_cfg: DataConfig, batch: int, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """``test/mIoU`` and ``test/IoU/<class>`` of each checkpoint on the data's test split.

    A study's final evaluation: the only code that reads the test images, once per model it reports.
    """
    data = load_job_data(data_cfg)
    if data.test is None:
        raise ValueError(f"{data.manifest}: the data has no test split to evaluate on")
    env = DistEnv(0, 1, torch.device(device))
    out = {}
    for name, path in models.items():
        net = load_model(path, data.num_classes, name).to(env.device)
        confusion = evaluate(net, data.test, data.num_classes, env, batch, data_cfg.eval_window)
        out[name] = eval_metrics(confusion, data.class_names, "test")
    return out
