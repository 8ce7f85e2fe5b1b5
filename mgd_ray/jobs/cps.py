"""CPS pretraining (Chen et al., CVPR 2021): two branches of one architecture supervise each other.

Loss = CE(l, y) + CE(r, y) + w·(CE(l(x_mix), ŷ_r) + CE(r(x_mix), ŷ_l)), where ŷ is the argmax of
each branch's predictions on u0 and u1 mixed with the CutMix mask (method notes). The better
branch by val mIoU becomes the frozen teacher. The same job is the "CPS on the student" baseline.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mgd_ray import losses
from mgd_ray.config import ModelConfig, TeacherJobConfig
from mgd_ray.data.stream import Batch, load_job_data
from mgd_ray.distributed import dist_env, global_batch, unwrap, wrap_model
from mgd_ray.jobs.loop import FitSpec, JobContext, Reporter, fit
from mgd_ray.models.deeplab import DeepLabV3Plus, build_segmenter


class CPSPair(nn.Module):
    """Two networks of one architecture with different initialisations; forward picks a branch."""

    def __init__(self, cfg: ModelConfig, num_classes: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.branch1 = build_segmenter(cfg, num_classes)
        torch.manual_seed(seed + 1)
        self.branch2 = build_segmenter(cfg, num_classes)

    def forward(self, x: Tensor, branch: int):
        return (self.branch1 if branch == 1 else self.branch2)(x)


def rampup(step: int, iterations: int, fraction: float) -> float:
    """Sigmoid ramp-up exp(−5(1 − t)²), t = step / (fraction · iterations) capped at 1 (Laine & Aila, 2017).

    From scratch (no ImageNet weights) both branches' pseudo labels are noise for the first steps,
    and a full-weight CPS term then teaches each branch the other's noise; the ramp lets the
    supervised term shape them first. ``fraction = 0`` is the paper's constant weight.
    """
    if fraction <= 0:
        return 1.0
    t = min(1.0, step / (fraction * iterations))
    return math.exp(-5.0 * (1.0 - t) ** 2)


def cps_terms(
    pair: nn.Module,
    b: Batch,
    cps_weight: float,
    ohem: bool = False,
    batch_reduction: losses.BatchReduction | None = None,
) -> dict[str, Tensor]:
    """Both branches' supervised CE and the weighted CPS term on x_mix, whose pseudo labels each
    branch makes from its own predictions on u0 and u1 mixed by m (as the official code does)."""
    with torch.no_grad():
        pl_1 = losses.mixed_pseudo_labels(pair(b.u0, 1).logits, pair(b.u1, 1).logits, b.m)
        pl_2 = losses.mixed_pseudo_labels(pair(b.u0, 2).logits, pair(b.u1, 2).logits, b.m)
    supervised = losses.ohem_supervised_loss if ohem else losses.supervised_loss
    x_mix = b.x_mix
    return {
        "sup/branch1": supervised(pair(b.x_l, 1).logits, b.y, batch_reduction=batch_reduction),
        "sup/branch2": supervised(pair(b.x_l, 2).logits, b.y, batch_reduction=batch_reduction),
        "cps": cps_weight
        * losses.cps_loss(pair(x_mix, 1).logits, pair(x_mix, 2).logits, pl_1, pl_2, batch_reduction=batch_reduction),
    }


def run_cps_pair(
    cfg: TeacherJobConfig, role: str, report: Reporter, checkpoint_root: Path, resume: dict[str, Any] | None
) -> dict[str, float]:
    """Train a CPS pair; export the better branch (by val mIoU) as ``role``."""
    env = dist_env()
    data = load_job_data(cfg.data)
    pair = wrap_model(CPSPair(cfg.model, data.num_classes, cfg.schedule.seed), env)
    net = unwrap(pair)
    batch_reduction = global_batch(env, cfg.optim.step_rule)

    def step(b: Batch, k: int) -> dict[str, Tensor]:
        weight = cfg.cps_weight * rampup(k, cfg.schedule.iterations, cfg.cps_rampup)
        return cps_terms(pair, b, weight, cfg.ohem, batch_reduction)

    def export(metrics: dict[str, float]) -> tuple[DeepLabV3Plus, ModelConfig, str]:
        best = 1 if metrics["val/branch1/mIoU"] >= metrics["val/branch2/mIoU"] else 2
        return (net.branch1 if best == 1 else net.branch2), cfg.model, f"{role}:branch{best}"

    spec = FitSpec(
        name=role,
        module=pair,
        step=step,
        evaluated=lambda: {"branch1": net.branch1, "branch2": net.branch2},
        export=export,
    )
    return fit(spec, JobContext(data, cfg.data, cfg.optim, cfg.schedule, env, report, checkpoint_root), resume)


def run_teacher(
    cfg: TeacherJobConfig, report: Reporter, checkpoint_root: Path, resume: dict[str, Any] | None = None
) -> dict[str, float]:
    return run_cps_pair(cfg, "teacher", report, checkpoint_root, resume)
