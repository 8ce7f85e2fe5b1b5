"""Pretraining a backbone on the built-in corpus: the stand-in for the paper's ImageNet weights.

The backbone learns the corpus's multi-label presence task (``data.corpus``) through a global
average pool and a linear layer, with binary cross-entropy. Its weights do not depend on the
output stride (dilation changes no parameter), so it trains at output stride 32, the cheapest, and
loads into a DeepLabv3+ of any stride as ``pretrained: <file>``. Every step draws its global batch
by (seed, step) and each rank takes its share, so a resumed job continues the same sequence.
The exported ``backbone.pt`` holds the state dict with its corpus, recipe and accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgd_ray.checkpoint import save_state
from mgd_ray.config import PretrainJobConfig
from mgd_ray.data.corpus import CorpusSpec, load_corpus
from mgd_ray.data.transforms import normalise_uint8
from mgd_ray.distributed import DistEnv, all_reduce_mean, differentiated, dist_env, unwrap, wrap_model
from mgd_ray.jobs.loop import Progress, Reporter, make_optimizer, restore_state, resume_state, step_precision
from mgd_ray.models.backbones import build_backbone

BACKBONE_FILE = "backbone.pt"
BACKBONE_FORMAT = "mgd_ray.backbone/1"
PAD = 4  # random translation of up to PAD pixels (reflect padding), with a horizontal flip


class PresenceClassifier(nn.Module):
    """Backbone → global average pool of its last features → one logit per presence label."""

    def __init__(self, backbone: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.high_level_channels, num_labels)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x)[1].mean(dim=(2, 3)))


def to_batch(images: np.ndarray, device: torch.device) -> Tensor:
    """uint8 N×H×W×3 → normalised N×3×H×W float, as the segmentation jobs normalise."""
    return normalise_uint8(torch.from_numpy(images).to(device))


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Per image: a horizontal flip (p = 0.5) and a translation of up to PAD pixels."""
    n, _, h, w = x.shape
    flips = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flips.view(n, 1, 1, 1).to(x.device), x.flip(-1), x)
    padded = F.pad(x, (PAD, PAD, PAD, PAD), mode="reflect")
    shifts = torch.randint(0, 2 * PAD + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts)])


def step_indices(seed: int, step: int, population: int, batch: int, env: DistEnv) -> np.ndarray:
    """This rank's share of step ``step``'s global batch (drawn without replacement by (seed, step))."""
    chosen = np.random.default_rng([seed, step]).choice(population, size=min(batch, population), replace=False)
    return chosen[env.rank :: env.world_size]


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over labels (with a positive) of the average precision of ``scores`` ranking ``targets``."""
    aps = []
    for label in range(targets.shape[1]):
        order = np.argsort(-scores[:, label], kind="stable")
        hits = targets[order, label] > 0.5
        if not hits.any():
            continue
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float(precision[hits].mean()))
    return float(np.mean(aps)) if aps else float("nan")


@torch.inference_mode()
def evaluate_presence(
    model: nn.Module, images: np.ndarray, targets: np.ndarray, device: torch.device
) -> dict[str, float]:
    """Label accuracy (threshold at logit 0), exact-match accuracy and mAP on held-out corpus images."""
    was_training = model.training
    model.eval()
    logits = torch.cat([model(to_batch(images[i : i + 256], device)) for i in range(0, len(images), 256)]).cpu()
    model.train(was_training)
    predicted = (logits > 0).numpy()
    truth = targets > 0.5
    return {
        "pretrain/label_accuracy": float((predicted == truth).mean()),
        "pretrain/exact_match": float((predicted == truth).all(axis=1).mean()),
        "pretrain/mAP": average_precision(logits.numpy(), targets),
    }


def backbone_record(model: nn.Module, cfg: PretrainJobConfig, metrics: dict[str, float]) -> dict[str, Any]:
    """The exported weights: a state dict ``pretrained: <file>`` loads, with what made it."""
    return {
        "format": BACKBONE_FORMAT,
        "backbone": cfg.model.backbone,
        "stem": cfg.model.stem,
        "corpus": cfg.corpus.model_dump(),
        "recipe": {"optim": cfg.optim.model_dump(), "schedule": cfg.schedule.model_dump()},
        "metrics": {k: float(v) for k, v in metrics.items()},
        "state_dict": unwrap(model).backbone.state_dict(),
    }


def run_pretrain(
    cfg: PretrainJobConfig, report: Reporter, checkpoint_root: Path, resume: dict[str, Any] | None = None
) -> dict[str, float]:
    """Pretrain ``cfg.model``'s backbone on the corpus; report and checkpoint every ``eval_every`` steps."""
    if resume is not None and resume.get("final"):
        return dict(resume["history"][-1]) if resume["history"] else {}
    env = dist_env()
    spec = CorpusSpec(**cfg.corpus.model_dump())
    images, targets = load_corpus(spec, cfg.cache)
    val_x, val_y = images[: spec.num_val], targets[: spec.num_val]
    train_x, train_y = images[spec.num_val :], targets[spec.num_val :]
    backbone = build_backbone(cfg.model.backbone, output_stride=32, pretrained=None, stem=cfg.model.stem)
    model = wrap_model(PresenceClassifier(backbone, len(spec.labels)), env)
    schedule = cfg.schedule
    opt, sched = make_optimizer(model, cfg.optim, schedule.iterations, env)
    start, history = restore_state(model, opt, sched, resume)
    progress = Progress(f"pretrain/{cfg.model.backbone}", schedule.iterations, start, env)
    losses: list[float] = []
    metrics: dict[str, float] = {}
    model.train()
    precision = step_precision(f"pretrain/{cfg.model.backbone}", cfg.optim, env)
    for step in range(start + 1, schedule.iterations + 1):
        chosen = step_indices(schedule.seed, step, len(train_x), schedule.batch, env)
        generator = torch.Generator().manual_seed(
            int(np.random.default_rng([schedule.seed, step, env.rank]).integers(2**62))
        )
        x = augment(to_batch(train_x[chosen], env.device), generator)
        with precision:
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), torch.from_numpy(train_y[chosen]).to(env.device))
        opt.zero_grad(set_to_none=True)
        differentiated(loss, env, cfg.optim.step_rule).backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        progress.step(step, {"bce": losses[-1]})
        if step % schedule.eval_every and step != schedule.iterations:
            continue
        metrics = {"step": step, "lr": sched.get_last_lr()[0]} | all_reduce_mean(
            {"loss/bce": float(np.mean(losses))}, env
        )
        metrics |= evaluate_presence(unwrap(model), val_x, val_y, env.device)
        losses = []
        history.append(metrics)
        ckpt_dir = None
        if env.is_main:
            ckpt_dir = checkpoint_root / f"step_{step:08d}"
            last = step == schedule.iterations  # the last state resumes nothing: history only, as fit's
            state = {"step": step, "final": True} if last else resume_state(model, opt, sched, step)
            save_state(ckpt_dir, state | {"history": history})
            torch.save(backbone_record(model, cfg, metrics), ckpt_dir / BACKBONE_FILE)
        report(metrics, ckpt_dir)
    return metrics
