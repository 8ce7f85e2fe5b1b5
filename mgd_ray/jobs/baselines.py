"""The baselines of the paper's Table 1 on the same loop as MGD: Sup-only, MT, CPS, KD, CWD.

Each method is a ``*_terms`` function of one step, as ``cps_terms`` and ``distill_terms`` are;
``run_baseline`` builds the student (and the EMA or frozen teacher a method needs) and dispatches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mgd_ray import losses
from mgd_ray.config import BaselineJobConfig, TeacherJobConfig
from mgd_ray.data.stream import Batch, load_job_data
from mgd_ray.data.transforms import cutmix
from mgd_ray.distributed import dist_env, global_batch, unwrap, wrap_model
from mgd_ray.jobs.cps import run_cps_pair
from mgd_ray.jobs.loop import FitSpec, JobContext, Reporter, fit
from mgd_ray.models.deeplab import build_segmenter
from mgd_ray.teachers import load_teacher

LogitDistillation = Callable[[Tensor, Tensor, float], Tensor]


def supervised_terms(
    student: nn.Module, b: Batch, batch_reduction: losses.BatchReduction | None = None
) -> dict[str, Tensor]:
    """Sup-only: the supervised CE on the labeled batch."""
    return {"sup": losses.supervised_loss(student(b.x_l).logits, b.y, batch_reduction=batch_reduction)}  # Eq. 1


def mean_teacher_terms(
    student: nn.Module, ema: nn.Module, b: Batch, weight: float, batch_reduction: losses.BatchReduction | None = None
) -> dict[str, Tensor]:
    """Mean Teacher: CE, and the student on x_mix against the EMA's predictions on u0, u1 mixed by m."""
    terms = supervised_terms(student, b, batch_reduction)
    with torch.no_grad():
        target = cutmix(ema(b.u0).logits, ema(b.u1).logits, b.m)
    terms["mean_teacher"] = weight * losses.mean_teacher_loss(student(b.x_mix).logits, target)
    return terms


def logit_distillation_terms(
    name: str,
    distil: LogitDistillation,
    student: nn.Module,
    teacher: nn.Module,
    b: Batch,
    weight: float,
    temperature: float,
    batch_reduction: losses.BatchReduction | None = None,
    on_unlabeled: bool = False,
) -> dict[str, Tensor]:
    """CE, and ``distil`` of one frozen teacher's logits on x_l, and on x_mix with ``on_unlabeled``.

    The paper's KD and CWD distil on the labeled data only: "these approaches are designed for
    labeled data and fail to take the data characteristic of unlabeled data into account" (Sec. 1;
    Sec. 3.3). ``on_unlabeled`` gives them MGD's CutMix-ed unlabeled images too: a stronger
    baseline than the paper's, which isolates what MGD adds beyond its data.
    """
    out_l = student(b.x_l)
    inputs = [b.x_l, b.x_mix] if on_unlabeled else [b.x_l]
    with torch.no_grad():  # one teacher forward for both batches
        targets = teacher(torch.cat(inputs)).logits.split([x.shape[0] for x in inputs])
    distilled = distil(out_l.logits, targets[0], temperature)
    if on_unlabeled:
        distilled = distilled + distil(student(inputs[1]).logits, targets[1], temperature)
    return {
        "sup": losses.supervised_loss(out_l.logits, b.y, batch_reduction=batch_reduction),  # Eq. 1
        name: weight * distilled,
    }


# KD (Hinton et al.): the pixel-wise KL to the teacher's softened class distribution.
kd_terms = partial(logit_distillation_terms, "kd", losses.kd_loss)
# CWD (Shu et al.): the KL to the teacher's distribution over locations, channel by channel.
cwd_terms = partial(logit_distillation_terms, "cwd", losses.cwd_loss)


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Mean Teacher: θ' ← d·θ' + (1−d)·θ for parameters; buffers (BN statistics) are copied."""
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
            pe.mul_(decay).add_(p, alpha=1 - decay)
        for be, b in zip(ema.buffers(), model.buffers(), strict=True):
            be.copy_(b)


def run_baseline(
    cfg: BaselineJobConfig, report: Reporter, checkpoint_root: Path, resume: dict[str, Any] | None = None
) -> dict[str, float]:
    if cfg.method == "cps":
        pair = TeacherJobConfig(
            data=cfg.data,
            model=cfg.student,
            optim=cfg.optim,
            schedule=cfg.schedule,
            cps_weight=cfg.consistency_weight,
            output=cfg.output,
        )
        return run_cps_pair(pair, "baseline/cps", report, checkpoint_root, resume)
    env = dist_env()
    torch.manual_seed(cfg.schedule.seed)
    data = load_job_data(cfg.data)
    student = wrap_model(build_segmenter(cfg.student, data.num_classes), env)
    weight, batch_reduction = cfg.consistency_weight, global_batch(env, cfg.optim.step_rule)
    hooks: dict[str, Any] = {}  # FitSpec's after_step and extra state, for Mean Teacher's EMA
    if cfg.method == "supervised":
        step = lambda b, _: supervised_terms(student, b, batch_reduction)
    elif cfg.method == "mean_teacher":
        ema = copy.deepcopy(unwrap(student)).requires_grad_(False)
        step = lambda b, _: mean_teacher_terms(student, ema, b, weight, batch_reduction)
        hooks = {
            # The usual ramp: early on the teacher follows the student closely.
            "after_step": lambda k: ema_update(ema, unwrap(student), min(1 - 1 / (k + 1), cfg.ema_decay)),
            "extra_state": lambda: {"ema": ema.state_dict()},
            "load_extra_state": lambda s: ema.load_state_dict(s["ema"]),
        }
    else:  # kd, cwd: distil logits of one frozen teacher on labeled (and, if asked, CutMix-ed unlabeled) images
        assert cfg.teacher is not None
        teacher = load_teacher(cfg.teacher, data.num_classes, env.device)
        terms = kd_terms if cfg.method == "kd" else cwd_terms
        step = lambda b, _: terms(student, teacher, b, weight, cfg.temperature, batch_reduction, cfg.draws_unlabeled)
    spec = FitSpec(
        name=f"baseline/{cfg.method}",
        module=student,
        step=step,
        evaluated=lambda: {"": student},
        export=lambda _: (student, cfg.student, f"baseline/{cfg.method}"),
        unlabeled=cfg.draws_unlabeled,
        **hooks,
    )
    return fit(spec, JobContext(data, cfg.data, cfg.optim, cfg.schedule, env, report, checkpoint_root), resume)
