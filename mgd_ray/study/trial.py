"""One Tune trial = one Ray Train job: its MLflow run, the job, the model's artifacts.

The trial function finds or creates its run by a deterministic key (``plan.trial_job``), so a
retried trial or a resumed study writes to the same run; a run that had finished is replayed to
Tune from MLflow instead of being trained again.
"""

from __future__ import annotations

import csv
import gc
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.tune
import torch
from mlflow.tracking import MlflowClient
from ray.tune.integration.ray_train import TuneReportCallback

from mgd_ray import tracking
from mgd_ray.checkpoint import read_segmenter
from mgd_ray.config import DistillJobConfig
from mgd_ray.data.datasets import voc_palette
from mgd_ray.data.stream import load_job_data
from mgd_ray.final_eval import example_predictions, load_examples, recorded_evaluation
from mgd_ray.plots import overlay_grid, plot_confusion_matrix
from mgd_ray.study.costs import architecture_name
from mgd_ray.study.plan import Plan, TrialJob, trial_job
from mgd_ray.teacher_cache.read import check_cache
from mgd_ray.train import copy_exported_model, exported_file, latest_checkpoint, make_trainer, scaling_config


def run_trial(config: dict[str, Any], plan: Plan) -> None:
    """A Tune function trial: create/find its MLflow run, run the Train job, log artifacts, close the run.

    The trial's process holds torch, Ray, MLflow and Tune (and, when Tune reuses it, an earlier
    trial's leftovers): those are collected, and the survivors frozen out of the cyclic GC's reach
    for the trial, so the training loop's collections stop traversing them (``bench_study``
    measures what that saves).
    """
    gc.collect()
    gc.freeze()
    try:
        _run_trial(config, plan)
    finally:
        gc.unfreeze()  # the next trial's collection may reclaim what this one left


def _run_trial(config: dict[str, Any], plan: Plan) -> None:
    trial_id = ray.tune.get_context().get_trial_id() if config.get("stage") == "search" else None
    job = trial_job(plan, config, trial_id)
    client = tracking.client_for(plan.tracking_uri)
    run_id, _ = tracking.get_or_create_run(client, plan.experiment_id, job.key, job.name, job.tags, plan.parent_run_id)
    run = client.get_run(run_id)
    if run.info.status == "FINISHED" and run.data.tags.get(tracking.STATE_TAG) == "finished":
        # Finished before the driver died (Tune's snapshot may predate it): report, don't retrain.
        _report_finished(client, run, job)
        return
    _describe_run(plan, job, client, run)
    start = time.time()
    _train(plan, job, client, run_id)
    tracking.log_metrics(client, run_id, {"time/train_s": time.time() - start}, step=int(job.cfg.schedule.iterations))
    tracking.set_tags(client, run_id, {tracking.STATE_TAG: "finished"})
    client.set_terminated(run_id, "FINISHED")


def _describe_run(plan: Plan, job: TrialJob, client: MlflowClient, run: Any) -> None:
    """The run's tags (state, searched params, where the job runs, the cache's verdict), params and the
    student's cost (``run``: the run as ``_run_trial`` read it)."""
    run_id = run.info.run_id
    tags = {
        tracking.STATE_TAG: "running",
        "mgd_ray.params": json.dumps(job.params, sort_keys=True),
        "mgd_ray.ray_train": "in the trial's process (local mode)" if plan.in_trial(job.teacher) else "worker group",
    }
    if isinstance(job.cfg, DistillJobConfig) and job.cfg.teacher_cache is not None:
        status, _ = check_cache(job.cfg, world_size=plan.study.resources.workers)
        tags |= {
            "mgd_ray.teacher_cache": "hit" if status.hit else "live teachers",
            "mgd_ray.teacher_cache_reason": status.reason[:4000],
        }
    student = getattr(job.cfg, "student", None)
    architecture = architecture_name(student) if student is not None else None
    cost = plan.costs.get(architecture) if architecture is not None else None
    if cost is not None:  # the student's cost, known before it trains: the search's second objective
        tags["mgd_ray.architecture"] = architecture
        if not set(cost.metrics()) <= set(run.data.metrics):  # once, also when resumed
            tracking.log_metrics(client, run_id, cost.metrics(), step=0)
    tracking.set_tags(client, run_id, tags)
    params = {f"search.{k}": v for k, v in job.params.items()} | tracking.flatten("", job.cfg.model_dump(mode="json"))
    tracking.log_params(client, run_id, params)


def _train(plan: Plan, job: TrialJob, client: MlflowClient, run_id: str) -> None:
    """Run the job as a Ray Train job, then log its exported model and that model's artifacts."""
    in_trial = plan.in_trial(job.teacher)
    resources = plan.resources(job.teacher)
    # Ray Train takes its controller settings from this process's environment (the study's ray_train).
    os.environ.update(plan.study.ray_train.env_vars())
    if in_trial:  # as many torch threads as the trial reserved CPUs, as Ray gives a Train worker
        torch.set_num_threads(max(1, int(resources.cpus_per_worker)))
    local = job.cfg.output / "checkpoints"  # an in-trial job's own checkpoint folder
    # A restarted trial continues its Train run (same name and storage → Ray resumes from its
    # checkpoint; in the trial's process, from the checkpoint it reported to Tune).
    trainer = make_trainer(
        job.cfg,
        scaling_config(resources.workers, resources.cpus_per_worker, resources.gpus_per_worker),
        plan.root / "ray_train",
        job.key.replace("/", "-"),
        max_failures=1,
        callbacks=[] if in_trial else [TuneReportCallback()],
        mlflow_run={"uri": plan.tracking_uri, "run_id": run_id},
        in_trial=local if in_trial else None,
    )
    try:
        result = trainer.fit()
        model_path = copy_exported_model(
            result, job.cfg.output, latest_checkpoint(local) if in_trial else None, exported_file(job.cfg)
        )
        shutil.rmtree(local, ignore_errors=True)  # Tune keeps its copy of the last checkpoint
        if job.kind == "pretrain":  # backbone weights: nothing to segment or plot
            tracking.log_files(client, run_id, [model_path], Path(tracking.PRETRAIN_ARTIFACT).parent.name)
        else:
            tracking.log_files(client, run_id, [model_path], "checkpoint")
            log_model_artifacts(plan, client, run_id, model_path, job)
    except BaseException as err:
        # ASHA stopping a trial and a job that really failed both end here, and Ray does not tell
        # them apart by exception type. Leave "interrupted": a real failure fails the stage
        # (``stages.check_stage``) and the study; the report turns the others into "stopped_early".
        tracking.set_tags(client, run_id, {tracking.STATE_TAG: "interrupted", "mgd_ray.error": repr(err)[:4000]})
        client.set_terminated(run_id, "KILLED")
        # A retry resumes from Tune's copy, and a stopped trial never does: the job's own
        # checkpoint folder (a full resume state, several times the model) is left to nobody.
        shutil.rmtree(local, ignore_errors=True)
        raise


def _report_finished(client: MlflowClient, run: Any, job: TrialJob) -> None:
    """Replay a finished run's evaluations to Tune so the searcher and scheduler see its results."""
    keys = [k for k in run.data.metrics if k == "val/mIoU" or k.startswith(("loss/", "val/"))]
    history: dict[int, dict[str, float]] = {}
    for key in keys:
        for step, value in tracking.metric_history(client, run.info.run_id, key):
            history.setdefault(step, {})[key] = value
    for step in sorted(history):
        ray.tune.report(history[step] | {"step": step, "replayed": 1})


def log_model_artifacts(plan: Plan, client: MlflowClient, run_id: str, model_path: Path, job: TrialJob) -> None:
    """Confusion-matrix plot, prediction overlays (image | truth | this model | teachers), and
    ``data/images_drawn.csv``: every image the job trained on, with how often each stream drew it."""
    data = load_job_data(job.cfg.data)
    final = recorded_evaluation(model_path)
    drawn = read_segmenter(model_path)[0].drawn
    images, truths, preds = example_predictions({"model": model_path}, data)
    if not job.teacher and plan.teacher_examples is not None:
        preds |= load_examples(plan.teacher_examples)[2]
    with tempfile.TemporaryDirectory() as tmp:
        cm_png = Path(tmp) / "confusion_matrix.png"
        plot_confusion_matrix(final.confusion, final.class_names, cm_png)
        ov_png = Path(tmp) / "predictions.png"
        overlay_grid({"ground truth": truths} | preds, images, voc_palette(256), ov_png)
        tracking.log_files(client, run_id, [cm_png, ov_png], "plots")
        if drawn:
            table = Path(tmp) / "images_drawn.csv"
            streams = sorted(drawn)
            ids = sorted({i for counts in drawn.values() for i in counts})
            with table.open("w", newline="") as out:
                writer = csv.writer(out)
                writer.writerow(["id", *streams])
                writer.writerows([i, *(drawn[s].get(i, 0) for s in streams)] for i in ids)
            tracking.log_files(client, run_id, [table], "data")
    tracking.log_metrics(client, run_id, {"final/val_mIoU": final.miou}, step=int(job.cfg.schedule.iterations))
