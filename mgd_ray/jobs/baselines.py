"""The baselines of the paper's Table 1 on the same loop as MGD: Sup-only, MT, CPS, KD, CWD."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mgd_ray import losses
from mgd_ray.config import BaselineJobConfig
from mgd_ray.distributed import dist_env, global_batch, unwrap, wrap_model
from mgd_ray.jobs.common import (
    Batch,
    FitSpec,
    Reporter,
    build_model,
    fit,
    load_job_data,
    load_segmenter,
)
from mgd_ray.jobs.cps import run_cps_pair


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Mean Teacher: θ' ← d·θ' + (1−d)·θ for parameters; buffers (BN statistics) are copied."""
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
            pe.mul_(decay).add_(p, alpha=1 - decay)
        for be, b in zip(ema.buffers(), model.buffers(), strict=True):
            be.copy_(b)


def run_baseline(cfg: BaselineJobConfig, report: Reporter, checkpoint_root: Path, resume: dict[str, Any] | None = None) -> dict[str, float]:
    if cfg.method == "cps":
        return run_cps_pair(
            cfg.student, cfg.data, cfg.optim, cfg.schedule, cfg.consistency_weight, False, "baseline/cps",
            report, checkpoint_root, resume,
        )
    env = dist_env()
    torch.manual_seed(cfg.schedule.seed)
    data = load_job_data(cfg.data)
    student = wrap_model(build_model(cfg.student, data.num_classes), env)
    w = cfg.consistency_weight
    over = global_batch(env)

    def sup(b: Batch) -> tuple[Any, dict[str, Tensor]]:
        out_l = student(b.x_l)
        return out_l, {"sup": losses.supervised_loss(out_l.logits, b.y, over=over)}  # Eq. 1

    extra: dict[str, Any] = {}
    if cfg.method == "supervised":

        def step(b: Batch, _: int) -> dict[str, Tensor]:
            return sup(b)[1]

    elif cfg.method == "mean_teacher":
        ema = copy.deepcopy(unwrap(student)).requires_grad_(False)

        def step(b: Batch, _: int) -> dict[str, Tensor]:
            _, terms = sup(b)
            with torch.no_grad():
                target = ema(b.u0).logits * (1 - b.m) + ema(b.u1).logits * b.m
            terms["mean_teacher"] = w * losses.mean_teacher_loss(student(b.x_mix).logits, target)
            return terms

        def after(step_no: int) -> None:
            # The usual ramp: early on the teacher follows the student closely.
            ema_update(ema, unwrap(student), min(1 - 1 / (step_no + 1), cfg.ema_decay))

        extra = {
            "after_step": after,
            "extra_state": lambda: {"ema": ema.state_dict()},
            "load_extra_state": lambda s: ema.load_state_dict(s["ema"]),
        }
    else:  # kd, cwd: distil logits of one frozen teacher on labeled and CutMix-ed unlabeled images
        assert cfg.teacher is not None
        teacher = load_segmenter(cfg.teacher.checkpoint, cfg.teacher.model, data.num_classes).to(env.device).eval()
        teacher.requires_grad_(False)
        distil = losses.kd_loss if cfg.method == "kd" else losses.cwd_loss

        def step(b: Batch, _: int) -> dict[str, Tensor]:
            out_l, terms = sup(b)
            x_mix = b.x_mix
            with torch.no_grad():
                t_l, t_mix = teacher(torch.cat([b.x_l, x_mix])).logits.split([b.x_l.shape[0], x_mix.shape[0]])
            terms[cfg.method] = w * (
                distil(out_l.logits, t_l, cfg.temperature) + distil(student(x_mix).logits, t_mix, cfg.temperature)
            )
            return terms

    spec = FitSpec(
        name=f"baseline/{cfg.method}",
        module=student,
        step=step,
        evaluated=lambda: {"": student},
        export=lambda _: (student, cfg.student, f"baseline/{cfg.method}"),
        unlabeled=cfg.method != "supervised",
        **extra,
    )
    return fit(spec, data, cfg.data, cfg.optim, cfg.schedule, env, report, checkpoint_root, resume)
