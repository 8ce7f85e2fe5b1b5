"""The training loop every job shares: optimiser and schedule, progress, evaluation, checkpoints.

Jobs are plain functions of a typed config, a ``Reporter`` and an optional checkpoint to resume
from; they know nothing of Ray, so the same loop runs under Ray Train (``mgd_ray.train``), under
torchrun, or in a test. A job describes itself to ``fit`` with a ``FitSpec``: the module to
optimise, the loss terms of one step, the networks to evaluate and the one to export.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mgd_ray.checkpoint import MODEL_FILE, save_state, segmenter_record
from mgd_ray.config import DataConfig, ModelConfig, OptimConfig, ScheduleConfig
from mgd_ray.data.stream import Batch, JobData, batches
from mgd_ray.distributed import DistEnv, all_reduce_mean, bf16_units, differentiated, replica_spread, unwrap
from mgd_ray.metrics import ConfusionMatrix, eval_metrics, evaluate

# Reporter(metrics, checkpoint_dir or None): called on every rank at every evaluation.
Reporter = Callable[[dict[str, Any], Path | None], None]
StepFn = Callable[[Batch, int], dict[str, torch.Tensor]]


# furnace's group_weight (official init_func.py) exempts these layers' parameters from weight decay.
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, rule: str, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters as optimiser groups. ``official``: conv and linear weights decay;
    biases and normalisation weights and biases get weight decay 0, as furnace's ``group_weight``
    does. ``all``: one group, everything decays."""
    params = [(m, name, p) for m in model.modules() for name, p in m.named_parameters(recurse=False) if p.requires_grad]
    if rule == "all":
        return [{"params": [p for _, _, p in params], "weight_decay": weight_decay}]
    exempt = [isinstance(m, NORM_LAYERS) or name == "bias" for m, name, _ in params]
    groups = [
        {"params": [p for (_, _, p), e in zip(params, exempt, strict=True) if not e], "weight_decay": weight_decay},
        {"params": [p for (_, _, p), e in zip(params, exempt, strict=True) if e], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(
    model: nn.Module, cfg: OptimConfig, iterations: int, env: DistEnv
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD (or AdamW) + poly LR (power 0.9, no warm-up), base LR × world size as the official code
    scales it, over ``model``'s trainable parameters in ``cfg.weight_decay_groups``."""
    lr = cfg.lr * (env.world_size if cfg.scale_lr_with_world_size else 1)
    groups = param_groups(model, cfg.weight_decay_groups, cfg.weight_decay)
    # The fused kernels (CPU and CUDA) compute the same update as the per-tensor loop, within
    # floating-point tolerance, in one pass over all parameters.
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, fused=True)
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: (1 - min(step, iterations) / iterations) ** cfg.poly_power
    )
    return opt, sched


def step_precision(name: str, optim: OptimConfig, env: DistEnv) -> contextlib.AbstractContextManager[Any]:
    """The context a training step's forward runs in: bf16 autocast when ``optim.precision`` asks for it
    (weights, gradients and optimiser state stay fp32; losses run in fp32: ``losses.fp32``), said once
    on rank 0 with the device's bf16 units."""
    enabled = optim.precision == "bf16"
    if enabled and env.is_main:
        units = bf16_units(env.device)
        note = "" if units != "none" else " (this device has no bf16 units: emulated, slower than fp32)"
        print(f"[{name}] training in bf16 autocast with fp32 weights on {env.device.type}, bf16 units: {units}{note}")
    return torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=enabled)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Progress:
    """A progress line every ``every`` steps on rank 0: step, loss terms, images/s, ETA."""

    def __init__(self, name: str, total: int, start: int, env: DistEnv, lines: int = 20):
        self.name, self.total, self.start, self.env = name, total, start, env
        self.every = max(1, total // lines)
        self.t0 = time.perf_counter()

    def step(self, step: int, terms: dict[str, float]) -> None:
        if not self.env.is_main or (step % self.every and step != self.total):
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        loss_text = " ".join(f"{k}={v:.4f}" for k, v in terms.items() if math.isfinite(v))
        print(f"[{self.name}] step {step}/{self.total} {loss_text} eta {eta:.0f}s", flush=True)


class TermMeans:
    """The mean of each loss term over the steps since the last evaluation."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def pop(self) -> dict[str, float]:
        means = {k: v / self.count for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


def step_times(clock: dict[str, float]) -> dict[str, float]:
    """Mean ms per step spent drawing the batch (loading, augmenting, CutMix) and in the step itself,
    and the data's share of the two: the figure that says whether loading needs overlapping."""
    data, step = clock["time/data_ms"], clock["time/step_ms"]
    return clock | {"time/data_share": data / (data + step) if data + step > 0 else 0.0}


class DrawnImages:
    """How many times each image was drawn to train, per stream: the record of the exact images a run
    trained on (``model.pt``'s ``drawn``), over all ranks and across a resume."""

    def __init__(self, restored: dict[str, dict[str, int]] | None = None) -> None:
        self.counts: dict[str, Counter[str]] = {k: Counter(v) for k, v in (restored or {}).items()}

    def add(self, batch: Batch) -> None:
        for stream_name, ids in batch.ids.items():
            self.counts.setdefault(stream_name, Counter()).update(ids)

    def gathered(self, env: DistEnv) -> dict[str, dict[str, int]]:
        """Every rank's counts summed (a collective: every rank calls it), ids sorted."""
        parts: list[Any] = [{k: dict(v) for k, v in self.counts.items()}]
        if env.world_size > 1:
            parts = [None] * env.world_size
            dist.all_gather_object(parts, {k: dict(v) for k, v in self.counts.items()})
        total: dict[str, Counter[str]] = {}
        for part in parts:
            for k, v in part.items():
                total.setdefault(k, Counter()).update(v)
        return {k: dict(sorted(v.items())) for k, v in sorted(total.items())}


@dataclass
class FitSpec:
    """What a job hands to ``fit``: the module to optimise and how to train, evaluate and export it.

    ``step`` returns the weighted loss terms of one step (their sum is optimised);
    ``evaluated`` names the networks to evaluate; ``export`` picks, from the evaluation metrics,
    the network saved as the job's model (e.g. the better CPS branch) and its role.
    """

    name: str
    module: nn.Module
    step: StepFn
    evaluated: Callable[[], dict[str, nn.Module]]
    export: Callable[[dict[str, float]], tuple[nn.Module, ModelConfig, str]]
    unlabeled: bool = True
    after_step: Callable[[int], None] | None = None
    extra_state: Callable[[], dict[str, Any]] | None = None
    load_extra_state: Callable[[dict[str, Any]], None] | None = None
    # Extra scalar metrics (averaged over ranks) added to every evaluation's metrics, e.g. cache/hit_rate.
    extra_metrics: Callable[[], dict[str, float]] | None = None


@dataclass
class JobContext:
    """Where a job's loop runs: its data and settings, its ranks, where it reports and checkpoints."""

    data: JobData
    data_cfg: DataConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    env: DistEnv
    report: Reporter
    checkpoint_root: Path


def fit(spec: FitSpec, ctx: JobContext, resume: dict[str, Any] | None = None) -> dict[str, float]:
    """Iteration-based training with evaluation, reporting and checkpointing every ``eval_every``.

    A resumed run restores model, optimiser, scheduler, step and RNG state, and its data streams
    restart at the saved step, so it continues exactly the schedule of the interrupted run.
    """
    if resume is not None and resume.get("final"):  # killed after its last step: nothing left to train
        return dict(resume["history"][-1]) if resume["history"] else {}
    model, schedule, env = spec.module, ctx.schedule, ctx.env
    opt, sched = make_optimizer(model, ctx.optim, schedule.iterations, env)
    start, history = _restore(spec, opt, sched, resume)
    # The saved counts are all ranks' already: one rank carries them on, the others count afresh.
    drawn = DrawnImages(resume.get("drawn") if resume is not None and env.is_main else None)
    model.train()
    progress = Progress(spec.name, schedule.iterations, start, env)
    stream = batches(ctx.data, schedule, ctx.data_cfg.loader_workers, env, start, spec.unlabeled)
    means, clock = TermMeans(), TermMeans()
    metrics: dict[str, float] = {}
    precision = step_precision(spec.name, ctx.optim, env)
    for step in range(start + 1, schedule.iterations + 1):
        t0 = time.perf_counter()
        batch = next(stream)
        drawn.add(batch)
        t1 = time.perf_counter()
        with precision:
            terms = spec.step(batch, step)
        loss = torch.stack(list(terms.values())).sum()
        opt.zero_grad(set_to_none=True)
        differentiated(loss, env, ctx.optim.step_rule).backward()
        opt.step()
        sched.step()
        if spec.after_step is not None:
            spec.after_step(step)
        values = {f"loss/{k}": float(v.detach()) for k, v in terms.items()} | {"loss/total": float(loss.detach())}
        # After float(loss): on CUDA the step's kernels have run by then.
        clock.add({"time/data_ms": (t1 - t0) * 1e3, "time/step_ms": (time.perf_counter() - t1) * 1e3})
        means.add(values)
        progress.step(step, values)
        if step % schedule.eval_every and step != schedule.iterations:
            continue
        metrics = {"step": step, "lr": sched.get_last_lr()[0], "replica_spread": replica_spread(model, env)}
        metrics |= all_reduce_mean(means.pop() | step_times(clock.pop()), env)
        if spec.extra_metrics is not None:
            metrics |= all_reduce_mean(spec.extra_metrics(), env)
        evaluated = spec.evaluated()
        t0 = time.perf_counter()
        confusion = _evaluate_all(evaluated, ctx, metrics)
        # Reduced as every metric is: one value on all ranks.
        metrics |= all_reduce_mean({"time/eval_s": time.perf_counter() - t0}, env)
        history.append(metrics)
        counts = drawn.gathered(env)
        ckpt_dir = None
        if env.is_main:
            ckpt_dir = _save_checkpoint(spec, ctx, opt, sched, step, history, counts)
            _save_model(spec, ctx, ckpt_dir, metrics, evaluated, confusion, counts)
        ctx.report(metrics, ckpt_dir)
    return metrics


def resume_state(
    module: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR, step: int
) -> dict[str, Any]:
    """What a job needs to continue from ``step`` as if never stopped: weights, optimiser, schedule, RNG."""
    return {
        "step": step,
        "model": unwrap(module).state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": rng_state(),
    }


def restore_state(
    module: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    resume: dict[str, Any] | None,
) -> tuple[int, list[dict[str, float]]]:
    """``resume_state``'s contents back into the job: (its step, its history); (0, []) for a fresh job."""
    if resume is None:
        return 0, []
    unwrap(module).load_state_dict(resume["model"])
    opt.load_state_dict(resume["optimizer"])
    sched.load_state_dict(resume["scheduler"])
    set_rng_state(resume["rng"])
    return int(resume["step"]), list(resume["history"])


def _restore(
    spec: FitSpec, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR, resume: dict[str, Any] | None
) -> tuple[int, list[dict[str, float]]]:
    """Model, optimiser, scheduler, RNG and the job's own state from ``resume``: (its step, its history)."""
    restored = restore_state(spec.module, opt, sched, resume)
    if resume is not None and spec.load_extra_state is not None:
        spec.load_extra_state(resume["extra"])
    return restored


def _evaluate_all(
    evaluated: dict[str, nn.Module], ctx: JobContext, metrics: dict[str, float]
) -> dict[str, ConfusionMatrix]:
    """Evaluate each network on the val split into ``metrics`` (``val/<label>/…``, ``val/…`` unlabelled);
    with several (CPS), ``val/mIoU`` is the best one's."""
    confusion: dict[str, ConfusionMatrix] = {}
    for label, net in evaluated.items():
        prefix = f"val/{label}" if label else "val"
        confusion[label] = evaluate(
            net, ctx.data.val, ctx.data.num_classes, ctx.env, ctx.schedule.eval_batch, ctx.data_cfg.eval_window
        )
        metrics |= eval_metrics(confusion[label], ctx.data.class_names, prefix)
    if "val/mIoU" not in metrics:
        metrics["val/mIoU"] = max(v for k, v in metrics.items() if k.startswith("val/") and k.endswith("/mIoU"))
    return confusion


def _save_checkpoint(
    spec: FitSpec,
    ctx: JobContext,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LambdaLR,
    step: int,
    history: list[dict[str, float]],
    drawn: dict[str, dict[str, int]],
) -> Path:
    """The resume state at ``step`` (only the history at the last step: nothing is left to resume)."""
    ckpt_dir = ctx.checkpoint_root / f"step_{step:08d}"
    if step == ctx.schedule.iterations:
        # The last checkpoint resumes nothing: model.pt and the history are all a restarted job
        # needs, and the model + optimiser state would be most of its disk (a CPS teacher's two
        # branches with AdamW's moments are several times the exported network).
        save_state(ckpt_dir, {"step": step, "final": True, "history": history})
        return ckpt_dir
    state = resume_state(spec.module, opt, sched, step) | {
        "extra": spec.extra_state() if spec.extra_state is not None else {},
        "history": history,
        "drawn": drawn,
    }
    save_state(ckpt_dir, state)
    return ckpt_dir


def _save_model(
    spec: FitSpec,
    ctx: JobContext,
    ckpt_dir: Path,
    metrics: dict[str, float],
    evaluated: dict[str, nn.Module],
    confusion: dict[str, ConfusionMatrix],
    drawn: dict[str, dict[str, int]],
) -> None:
    """The exported network's ``model.pt``, with its val metrics and confusion matrix (all ranks' pixels)
    and the images drawn to train it."""
    chosen, model_cfg, role = spec.export(metrics)
    record = segmenter_record(chosen, model_cfg, ctx.data, ctx.data_cfg.crop_size, role)
    label = next(k for k, net in evaluated.items() if unwrap(net) is unwrap(chosen))
    record |= {"metrics": metrics, "confusion": confusion[label].matrix.cpu().tolist(), "drawn": drawn}
    torch.save(record, ckpt_dir / MODEL_FILE)
