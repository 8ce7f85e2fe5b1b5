"""MGD student distillation: the per-step computation of the official train.py (method notes).

Per step: labeled (x_l, y), unlabeled u0, u1 and a CutMix mask m, x_mix = u0·(1−m) + u1·m.
Frozen teachers give pseudo labels (pixel level, Eq. 2), GAP'd logits on x_mix (image level,
Eq. 3–4) and decoder features on x_mix (region level, Eq. 5–6); the student minimises Eq. 7.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mgd_ray import losses
from mgd_ray.config import DistillJobConfig
from mgd_ray.data.stream import Batch, load_job_data
from mgd_ray.distributed import dist_env, global_batch, global_batchnorm, wrap_model
from mgd_ray.jobs.loop import FitSpec, JobContext, Reporter, fit
from mgd_ray.models.deeplab import build_segmenter
from mgd_ray.teacher_cache.read import open_cache
from mgd_ray.teachers import TeacherSignals, load_teachers, step_signals, teacher_roles


def distill_terms(
    student: nn.Module,
    signals: dict[str, TeacherSignals],
    b: Batch,
    cfg: DistillJobConfig,
    batch_reduction: losses.BatchReduction | None = None,
) -> dict[str, Tensor]:
    """The weighted terms of Eq. 7 for one step, one line per term; ``batch_reduction``: see ``mgd_ray.losses``.

    Eq. 7: L = L_S(x_l, y) + Σ_T [L_P(x_l, T) + L_P(x_mix, T)] + λ1·L_I(x_mix, T_D) + λ2·L_R(x_mix, T_W),
    with each teacher T in the role ``teacher_roles`` gives it; a switched-off term is left out.
    """
    lc = cfg.losses
    roles = teacher_roles(cfg)
    out_l = student(b.x_l)
    out_mix = student(b.x_mix)
    terms: dict[str, Tensor] = {}
    if lc.supervised:
        supervised = losses.ohem_supervised_loss if lc.ohem else losses.supervised_loss
        terms["sup"] = supervised(out_l.logits, b.y, batch_reduction=batch_reduction)  # Eq. 1: L_S
    for name in roles.pixel:
        s = signals[name]
        if name in roles.pixel_labeled:  # Eq. 2: L_P on x_l
            terms[f"pixel_l/{name}"] = losses.pixel_consistency_loss(
                out_l.logits, s.pl_l, batch_reduction=batch_reduction
            )
        if name in roles.pixel_unlabeled:  # Eq. 2: L_P on x_mix
            terms[f"pixel_u/{name}"] = losses.pixel_consistency_loss(
                out_mix.logits, s.pl_mix, batch_reduction=batch_reduction
            )
    for name in roles.image:  # Eq. 3-4: λ1·L_I
        terms[f"image/{name}"] = lc.lambda_1 * losses.image_level_loss(
            out_mix.logits, signals[name].logits_mix, lc.image_reduction, batch_reduction=batch_reduction
        )
    for name in roles.region:  # Eq. 5-6: λ2·L_R
        terms[f"region/{name}"] = lc.lambda_2 * losses.region_level_loss(
            out_mix.features, signals[name].feats_mix, lc.pool_size
        )
    if not terms:
        raise ValueError("losses: every loss term is switched off; enable at least one")
    return terms


def run_distill(
    cfg: DistillJobConfig, report: Reporter, checkpoint_root: Path, resume: dict[str, Any] | None = None
) -> dict[str, float]:
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
            if cfg.teacher_mode == "train":  # batch statistics of the global batch, as the official SyncBatchNorm
                loaded.update({name: global_batchnorm(t, env) for name, t in loaded.items()})
        return loaded

    student = wrap_model(build_segmenter(cfg.student, data.num_classes), env)
    roles = teacher_roles(cfg)
    batch_reduction = global_batch(env, cfg.optim.step_rule)
    cache, cache_status = None, None
    if cfg.teacher_cache is not None:
        cache, cache_status = open_cache(cfg, data, env, int(resume["step"]) if resume is not None else 0)
        if env.is_main:
            text = cache_status.reason if cache_status.hit else f"running the teachers: {cache_status.reason}"
            print(f"[student] {text}", flush=True)
    served = {"hits": 0, "steps": 0}

    def step(b: Batch, k: int) -> dict[str, Tensor]:
        signals = cache.signals(k - 1, cfg.losses.pool_size) if cache is not None else None  # fit steps count from 1
        served["steps"] += 1
        if signals is not None:
            served["hits"] += 1
        else:
            signals = step_signals(teachers(), b, roles, batched=cfg.teacher_mode == "eval")
        return distill_terms(student, signals, b, cfg, batch_reduction)

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
    return fit(spec, JobContext(data, cfg.data, cfg.optim, cfg.schedule, env, report, checkpoint_root), resume)
