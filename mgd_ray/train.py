"""Ray Train wrapper: every job runs as a ``TorchTrainer`` (PyTorch DDP: gloo on CPU, NCCL on GPU).

Ray Train V2 semantics (the default in Ray 2.60): each worker calls ``ray.train.report`` at every
evaluation, rank 0 attaching the checkpoint; a restarted worker group resumes from
``ray.train.get_checkpoint()``; ``FailureConfig(max_failures)`` bounds the restarts. A driver that
runs the same ``name`` and ``storage_path`` again resumes the run where it stopped.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.tune
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    Result,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from mgd_ray.checkpoint import HISTORY_FILE, MODEL_FILE, load_state
from mgd_ray.config import JobConfig, absolute_paths, parse_job_config
from mgd_ray.data.check import check_data, require_clean
from mgd_ray.data.stream import with_manifest
from mgd_ray.distributed import bf16_units, dist_env
from mgd_ray.jobs.baselines import run_baseline
from mgd_ray.jobs.cps import run_teacher
from mgd_ray.jobs.distill import run_distill
from mgd_ray.jobs.pretrain import BACKBONE_FILE, run_pretrain
from mgd_ray.ray_connect import connect_ray
from mgd_ray.tracking import client_for, log_metrics, logged_steps, set_tags

JOBS = {"teacher": run_teacher, "student": run_distill, "baseline": run_baseline, "pretrain": run_pretrain}


def train_loop_per_worker(payload: dict[str, Any]) -> dict[str, float]:
    """Rebuild the typed config on the worker, resume from Ray's latest checkpoint, run the job.

    In a job that runs in a Tune trial's own process (``in_trial``: Ray Train's local mode), Ray
    Train neither persists checkpoints nor calls its callbacks, and its ``ray.train`` calls refuse
    to run inside a Tune function; so the job (one process, rank 0) reports every evaluation and
    its checkpoint to Tune, resumes from Tune's checkpoint, and keeps only its latest checkpoint
    under ``checkpoint_root`` for ``latest_checkpoint``.
    """
    cfg = parse_job_config(payload["kind"], payload["config"])
    in_trial = bool(payload.get("in_trial"))
    resume = None
    checkpoint = ray.tune.get_checkpoint() if in_trial else ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_state(Path(d))
    rank = 0 if in_trial else ray.train.get_context().get_world_rank()
    mlflow_run = payload.get("mlflow")  # {"uri", "run_id"}: rank 0 logs every evaluation to this run
    client = client_for(mlflow_run["uri"]) if mlflow_run is not None and rank == 0 else None
    # A restarted worker group resumes from the last checkpoint Ray registered, which can be older
    # than the last evaluation rank 0 logged (a worker killed between logging and the checkpoint's
    # registration): the resumed job evaluates that step again, to the same values, and MLflow
    # already has it. So the run's history keeps each evaluation step once.
    logged = logged_steps(client, mlflow_run["run_id"]) if client is not None else set()
    if client is not None:  # what arithmetic this run's steps used, and what computed it
        device = dist_env().device
        set_tags(
            client,
            mlflow_run["run_id"],
            {
                "mgd_ray.precision": cfg.optim.precision,
                "mgd_ray.device": str(device),
                "mgd_ray.bf16_units": bf16_units(device),
            },
        )

    def report(metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        if client is not None and int(metrics["step"]) not in logged:
            log_metrics(client, mlflow_run["run_id"], metrics, step=int(metrics["step"]))
        if not in_trial:
            ckpt = Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
            ray.train.report(metrics, checkpoint=ckpt, delete_local_checkpoint_after_upload=ckpt is not None)
            return
        ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(str(ckpt_dir)))  # Tune copies it
        for old in ckpt_dir.parent.iterdir():
            if old != ckpt_dir:
                shutil.rmtree(old, ignore_errors=True)

    if in_trial:
        root = Path(payload["checkpoint_root"])
        shutil.rmtree(root, ignore_errors=True)  # a killed run's leftovers: it resumes from Tune's copy
        root.mkdir(parents=True)
        if checkpoint is not None and resume is not None:
            # Tune's copy stays this job's latest checkpoint until the job saves a newer one: a trial
            # killed after its last step (while logging artifacts) resumes with nothing left to train.
            checkpoint.to_directory(str(root / f"step_{int(resume['step']):08d}"))
        return JOBS[cfg.kind](cfg, report, root, resume)
    root = Path(tempfile.mkdtemp(prefix="mgd_ray_ckpt_"))
    try:
        return JOBS[cfg.kind](cfg, report, root, resume)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class JobResult:
    """A finished job: last metrics, every evaluation's metrics, the exported model file, Ray's ``Result``."""

    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    model_path: Path
    result: Result


def job_history(result: Result) -> list[dict[str, Any]]:
    """Every evaluation's metrics, in step order, across restarts (from the last checkpoint)."""
    if result.checkpoint is None:
        return []
    with result.checkpoint.as_directory() as d:
        return json.loads((Path(d) / HISTORY_FILE).read_text())


def make_trainer(
    cfg: JobConfig,
    scaling: ScalingConfig,
    storage: Path,
    name: str,
    max_failures: int = 0,
    callbacks: list[Any] | None = None,
    mlflow_run: dict[str, str] | None = None,
    in_trial: Path | None = None,
) -> TorchTrainer:
    """The ``TorchTrainer`` of one job; ``cfg`` must already carry absolute paths and its manifest.

    ``in_trial`` (a checkpoint directory): run the job in this process, a Tune trial's, with Ray
    Train's local mode (``num_workers=0``) instead of ``scaling``'s worker group.
    """
    payload: dict[str, Any] = {"kind": cfg.kind, "config": cfg.model_dump(mode="json")}
    if in_trial is not None:
        payload |= {"in_trial": True, "checkpoint_root": str(in_trial)}
        scaling = ScalingConfig(num_workers=0)
    if mlflow_run is not None:
        payload["mlflow"] = mlflow_run
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        scaling_config=scaling,
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=callbacks or [],
        ),
    )


def scaling_config(workers: int, cpus_per_worker: float, gpus_per_worker: float = 0.0) -> ScalingConfig:
    """``workers`` DDP workers, each reserving its CPUs and (fractional) GPUs: NCCL with GPUs, else gloo."""
    per_worker = {"CPU": cpus_per_worker} | ({"GPU": gpus_per_worker} if gpus_per_worker else {})
    return ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=per_worker)


def latest_checkpoint(root: Path) -> Checkpoint | None:
    """The last checkpoint a job run in its trial's process left under its ``checkpoint_root``."""
    steps = sorted(root.glob("step_*")) if root.is_dir() else []
    return Checkpoint.from_directory(str(steps[-1])) if steps else None


def exported_file(cfg: JobConfig) -> str:
    """What a job exports: a pretraining its backbone's weights, every other job a segmenter."""
    return BACKBONE_FILE if cfg.kind == "pretrain" else MODEL_FILE


def copy_exported_model(
    result: Result, output: Path, checkpoint: Checkpoint | None = None, name: str = MODEL_FILE
) -> Path:
    """Copy the exported file (``model.pt``, or ``name``, of the last checkpoint) to ``output``.

    ``checkpoint`` overrides ``result.checkpoint`` (a job run in its trial's process reports its
    checkpoints to Tune, not to Ray Train: see ``latest_checkpoint``).
    """
    checkpoint = checkpoint or result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"job finished without a checkpoint; see the logs under {result.path}")
    output.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as d:
        shutil.copyfile(Path(d) / name, output / name)
    return output / name


def run_job(
    cfg: JobConfig,
    scaling: ScalingConfig,
    storage_path: Path | str = "mgd_ray_runs/ray",
    name: str | None = None,
    max_failures: int = 0,
) -> JobResult:
    """Run one job on the Ray cluster ``connect_ray`` finds (a local one by default).

    Relative paths of the config are resolved against the driver's working directory before the
    config travels to the workers, and every data file is checked (``check_data``) before any
    worker starts. The exported model (``model.pt`` of the last checkpoint) is
    copied to ``cfg.output``.
    """
    cfg = absolute_paths(cfg, Path.cwd())
    if cfg.kind != "pretrain":  # a pretraining reads the generated corpus, not a dataset
        cfg = with_manifest(cfg)
        print(require_clean(check_data(cfg.data)).text(), flush=True)
    storage = Path(storage_path).resolve()
    name = name or f"{cfg.kind}-{cfg.output.name}"
    connect_ray()  # before Trainer.fit's own ray.init, which would wait on a dead recorded cluster
    trainer = make_trainer(cfg, scaling, storage, name, max_failures)
    result = trainer.fit()
    model_path = copy_exported_model(result, cfg.output, name=exported_file(cfg))
    return JobResult(
        metrics=dict(result.metrics or {}), history=job_history(result), model_path=model_path, result=result
    )
