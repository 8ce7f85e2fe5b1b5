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
from mgd_ray.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TeacherJobConfig,
)
from mgd_ray.distributed import dist_env, global_batch, unwrap, wrap_model
from mgd_ray.jobs.common import (
    Batch,
    FitSpec,
    Reporter,
    build_model,
    fit,
    load_job_data,
    mixed_pseudo_labels,
)
from mgd_ray.models.deeplab import DeepLabV3Plus


class CPSPair(nn.Module):
    """Two networks of one architecture with different initialisations; forward picks a branch."""

    def __init__(self, cfg: ModelConfig, num_classes: int, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.branch1 = build_model(cfg, num_classes)
        torch.manual_seed(seed + 1)
        self.branch2 = build_model(cfg, num_classes)

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
    pair: nn.Module, b: Batch, cps_weight: float, ohem: bool = False, over: losses.BatchReduction | None = None
) -> dict[str, Tensor]:
    with torch.no_grad():
        pl_1 = mixed_pseudo_labels(pair(b.u0, 1).logits, pair(b.u1, 1).logits, b.m)
        pl_2 = mixed_pseudo_labels(pair(b.u0, 2).logits, pair(b.u1, 2).logits, b.m)
    sup = losses.ohem_cross_entropy if ohem else losses.supervised_loss
    x_mix = b.x_mix
    return {
        "sup/branch1": sup(pair(b.x_l, 1).logits, b.y, over=over),
        "sup/branch2": sup(pair(b.x_l, 2).logits, b.y, over=over),
        "cps": cps_weight
        * (
            losses.pixel_consistency_loss(pair(x_mix, 1).logits, pl_2, over=over)
            + losses.pixel_consistency_loss(pair(x_mix, 2).logits, pl_1, over=over)
        ),
    }


def run_cps_pair(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    optim: OptimConfig,
    schedule: ScheduleConfig,
    cps_weight: float,
    ohem: bool,
    role: str,
    report: Reporter,
    checkpoint_root: Path,
    resume: dict[str, Any] | None,
    cps_rampup: float = 0.0,
) -> dict[str, float]:
    env = dist_env()
    data = load_job_data(data_cfg)
    pair = wrap_model(CPSPair(model_cfg, data.num_classes, schedule.seed), env)
    net = unwrap(pair)
    over = global_batch(env)

    def export(metrics: dict[str, float]) -> tuple[DeepLabV3Plus, ModelConfig, str]:
        best = 1 if metrics["val/branch1/mIoU"] >= metrics["val/branch2/mIoU"] else 2
        return (net.branch1 if best == 1 else net.branch2), model_cfg, f"{role}:branch{best}"

    spec = FitSpec(
        name=role,
        module=pair,
        step=lambda b, step: cps_terms(pair, b, cps_weight * rampup(step, schedule.iterations, cps_rampup), ohem, over),
        evaluated=lambda: {"branch1": net.branch1, "branch2": net.branch2},
        export=export,
    )
    return fit(spec, data, data_cfg, optim, schedule, env, report, checkpoint_root, resume)


def run_teacher(cfg: TeacherJobConfig, report: Reporter, checkpoint_root: Path, resume: dict[str, Any] | None = None) -> dict[str, float]:
    return run_cps_pair(
        cfg.model, cfg.data, cfg.optim, cfg.schedule, cfg.cps_weight, cfg.ohem, "teacher", report, checkpoint_root, resume,
        cfg.cps_rampup,
    )
