"""MGD student distillation: the per-step computation of the official train.py (method notes).

Per step: labeled (x_l, y), unlabeled u0, u1 and a CutMix mask m, x_mix = u0·(1−m) + u1·m.
Frozen teachers give pseudo labels (pixel level, Eq. 2), GAP'd logits on x_mix (image level,
Eq. 3–4) and decoder features on x_mix (region level, Eq. 5–6); the student minimises Eq. 7.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mgd_ray import losses
from mgd_ray.config import DistillJobConfig
from mgd_ray.distributed import dist_env, global_batch, wrap_model
from mgd_ray.jobs.common import (
    Batch,
    FitSpec,
    Reporter,
    build_model,
    fit,
    load_job_data,
    load_segmenter,
    mixed_pseudo_labels,
)
from mgd_ray.models.deeplab import SegmenterOutput
from mgd_ray.teacher_cache import open_cache


@dataclass
class TeacherSignals:
    """What one teacher contributes to a step; fields no loss uses stay None."""

    pl_l: Tensor | None = None  # hard labels on x_l
    pl_mix: Tensor | None = None  # hard labels for x_mix, mixed from predictions on u0 and u1
    logits_mix: Tensor | None = None  # logits on x_mix (image level)
    feats_mix: Tensor | None = None  # decoder features on x_mix (region level)


def teacher_signals(teacher: nn.Module, b: Batch, pixel: bool, image: bool, region: bool, batched: bool) -> TeacherSignals:
    """Run a frozen teacher on exactly the inputs whose outputs some loss uses.

    Teachers run under ``inference_mode``; the signals are cloned out of it because a loss may
    save them for its backward pass, which inference tensors forbid. ``batched`` runs one forward over the concatenated inputs, which is exact for an eval-mode
    teacher; a train-mode teacher (the official code's) normalises each input with its own batch
    statistics, so it gets one forward per input as in the official code.
    """
    with torch.inference_mode():
        s = _teacher_signals(teacher, b, pixel, image, region, batched)
    return TeacherSignals(*(None if t is None else t.clone() for t in (s.pl_l, s.pl_mix, s.logits_mix, s.feats_mix)))


def _teacher_signals(teacher: nn.Module, b: Batch, pixel: bool, image: bool, region: bool, batched: bool) -> TeacherSignals:
    inputs: dict[str, Tensor] = {}
    if pixel:
        inputs |= {"u0": b.u0, "u1": b.u1, "x_l": b.x_l}
    if image or region:
        inputs["x_mix"] = b.x_mix
    if not inputs:
        return TeacherSignals()
    if batched:
        out = teacher(torch.cat(list(inputs.values())))
        sizes = [t.shape[0] for t in inputs.values()]
        logits = dict(zip(inputs, out.logits.split(sizes), strict=True))
        feats = dict(zip(inputs, out.features.split(sizes), strict=True))
    else:
        outs = {k: teacher(v) for k, v in inputs.items()}
        logits = {k: o.logits for k, o in outs.items()}
        feats = {k: o.features for k, o in outs.items()}
    s = TeacherSignals()
    if pixel:
        s.pl_l = logits["x_l"].argmax(dim=1)
        s.pl_mix = mixed_pseudo_labels(logits["u0"], logits["u1"], b.m)
    if image:
        s.logits_mix = logits["x_mix"]
    if region:
        s.feats_mix = feats["x_mix"]
    return s


def distill_terms(
    student: nn.Module,
    signals: dict[str, TeacherSignals],
    b: Batch,
    cfg: DistillJobConfig,
    over: losses.BatchReduction | None = None,
) -> dict[str, Tensor]:
    """The weighted terms of Eq. 7 for one step, one line per term; ``over``: see ``mgd_ray.losses``."""
    lc = cfg.losses
    out_l = student(b.x_l)
    out_mix = student(b.x_mix)
    terms: dict[str, Tensor] = {}
    if lc.supervised:
        sup = losses.ohem_cross_entropy if lc.ohem else losses.supervised_loss
        terms["sup"] = sup(out_l.logits, b.y, over=over)  # Eq. 1
    pixel = lc.pixel_teachers if lc.pixel_teachers is not None else tuple(cfg.teachers)
    for name in pixel:
        if lc.pixel_labeled:
            terms[f"pixel_l/{name}"] = losses.pixel_consistency_loss(out_l.logits, signals[name].pl_l, over=over)  # Eq. 2, labeled
        if lc.pixel_unlabeled:
            terms[f"pixel_u/{name}"] = losses.pixel_consistency_loss(out_mix.logits, signals[name].pl_mix, over=over)  # Eq. 2, unlabeled
    for name in lc.image_teachers:
        terms[f"image/{name}"] = lc.lambda_1 * losses.image_level_loss(
            out_mix.logits, signals[name].logits_mix, lc.image_reduction, over=over
        )  # Eq. 3-4
    for name in lc.region_teachers:
        terms[f"region/{name}"] = lc.lambda_2 * losses.region_level_loss(
            out_mix.features, signals[name].feats_mix, lc.pool_size
        )  # Eq. 5-6
    if not terms:
        raise ValueError("losses: every loss term is switched off; enable at least one")
    return terms


class FrozenTeacher(nn.Module):
    """A teacher run the fast way the config allows, returning float32 outputs either way.

    ``channels_last`` stores weights and inputs NHWC (what cuDNN's tensor-core kernels want; exact
    up to float rounding); ``bf16`` runs the forward under autocast (about 2× on tensor cores;
    pseudo labels and signals change slightly, so it is opt-in and part of the teacher-cache key).
    """

    def __init__(self, net: nn.Module, precision: str = "fp32", channels_last: bool = False):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.precision = precision
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> SegmenterOutput:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.net(x)
        return SegmenterOutput(*(t.float().contiguous() for t in out))


def load_teachers(cfg: DistillJobConfig, num_classes: int, device: torch.device) -> dict[str, nn.Module]:
    """Frozen teachers in the configured mode (eval by default; the official code keeps train mode)."""
    teachers = {}
    for name, ref in cfg.teachers.items():
        t = load_segmenter(ref.checkpoint, ref.model, num_classes, what=f"teacher {name}").to(device)
        t.requires_grad_(False)
        if cfg.teacher_precision != "fp32" or cfg.teacher_channels_last:
            t = FrozenTeacher(t, cfg.teacher_precision, cfg.teacher_channels_last)
        teachers[name] = t.train(cfg.teacher_mode == "train")
    return teachers


def run_distill(cfg: DistillJobConfig, report: Reporter, checkpoint_root: Path, resume: dict[str, Any] | None = None) -> dict[str, float]:
    env = dist_env()
    torch.manual_seed(cfg.schedule.seed)
    data = load_job_data(cfg.data)
    loaded: dict[str, nn.Module] = {}

    def teachers() -> dict[str, nn.Module]:
        """Loaded at the first step the cache does not serve, so never when it serves them all.

        Built under a forked RNG: the student's initialisation and the data stream do not depend
        on whether (or when) the teachers were built.
        """
        if not loaded:
            with torch.random.fork_rng(devices=[]):
                loaded.update(load_teachers(cfg, data.num_classes, env.device))
        return loaded

    student = wrap_model(build_model(cfg.student, data.num_classes), env)
    lc = cfg.losses
    pixel = set(lc.pixel_teachers if lc.pixel_teachers is not None else cfg.teachers)
    pixel_on = lc.pixel_labeled or lc.pixel_unlabeled
    over = global_batch(env)
    cache, cache_status = None, None
    if cfg.teacher_cache is not None:
        cache, cache_status = open_cache(cfg, data, env, int(resume["step"]) if resume is not None else 0)
        if env.is_main:
            text = cache_status.reason if cache_status.hit else f"running the teachers: {cache_status.reason}"
            print(f"[student] {text}", flush=True)
    served = {"hits": 0, "steps": 0}

    def step(b: Batch, k: int) -> dict[str, Tensor]:
        signals = cache.signals(k - 1, lc.pool_size) if cache is not None else None  # fit steps count from 1
        served["steps"] += 1
        if signals is not None:
            served["hits"] += 1
        else:
            signals = {
                name: teacher_signals(
                    t,
                    b,
                    pixel=pixel_on and name in pixel,
                    image=name in lc.image_teachers,
                    region=name in lc.region_teachers,
                    batched=cfg.teacher_mode == "eval",
                )
                for name, t in teachers().items()
            }
        return distill_terms(student, signals, b, cfg, over)

    def cache_metrics() -> dict[str, float]:
        """cache/hit: the cache's key matched this job; cache/hit_rate: share of steps since the last evaluation it served."""
        rate = served["hits"] / max(served["steps"], 1)
        served["hits"] = served["steps"] = 0
        return {"cache/hit": float(cache_status is not None and cache_status.hit), "cache/hit_rate": rate}

    spec = FitSpec(
        name="student",
        module=student,
        step=step,
        evaluated=lambda: {"": student},
        export=lambda _: (student, cfg.student, "student"),
        extra_metrics=cache_metrics if cfg.teacher_cache is not None else None,
    )
    return fit(spec, data, cfg.data, cfg.optim, cfg.schedule, env, report, checkpoint_root, resume)
