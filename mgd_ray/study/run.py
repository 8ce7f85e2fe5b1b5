"""Run a study: teachers (once, reused through MLflow) → baselines → Optuna search → seed repeats →
the final evaluation on the test split, when the data has one → report.

MLflow records it all under one parent run. ``study_state.json`` under the study's storage says
which stages have finished, so ``resume=True`` reuses the parent run and continues where the
driver stopped.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from mgd_ray import tracking
from mgd_ray.config import absolute_paths
from mgd_ray.data.check import DataReport, check_data, require_clean
from mgd_ray.data.datasets import DatasetError
from mgd_ray.data.stream import with_manifest
from mgd_ray.ray_connect import connect_ray
from mgd_ray.study.config import StudyConfig
from mgd_ray.study.plan import Plan
from mgd_ray.study.report import write_report
from mgd_ray.study.results import best_trial_params
from mgd_ray.study.stages import (
    pending_baselines,
    stage_baselines,
    stage_cache,
    stage_pretrain,
    stage_repeats,
    stage_search,
    stage_teachers,
    stage_test,
    write_teacher_examples,
)

log = logging.getLogger("mgd_ray.study")
STATE_FILE = "study_state.json"


@dataclass
class StudyState:
    """``study_state.json``: the parent run, the instance folder, and what each finished stage left."""

    path: Path
    values: dict[str, Any]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.values, indent=2))

    def done(self, stage: str) -> bool:
        return bool(self.values["stages"].get(stage))

    def finish(self, stage: str) -> None:
        self.values["stages"][stage] = True
        self.save()


def run_study(study: StudyConfig, source: Path | None = None, resume: bool = False, base: Path | None = None) -> Path:
    """Run (or resume) a whole study on the Ray cluster ``connect_ray`` finds; returns the report file."""
    plan, state, data_report = _open(study, resume, base or Path.cwd())
    client = tracking.client_for(plan.tracking_uri)
    _log_study(plan, client, source, data_report)
    connect_ray()
    try:
        report = _run_stages(plan, state, client, resume, tested=data_report.images["test"] > 0)
    except BaseException:
        tracking.set_tags(client, plan.parent_run_id, {tracking.STATE_TAG: "interrupted"})
        raise
    _finish(plan, state, client)
    return report


def pretrain_study(study: StudyConfig, source: Path | None = None, base: Path | None = None) -> dict[str, Any]:
    """``mgd-ray pretrain``: only the study's pretrain stage (its ``pretrained: builtin`` backbones),
    found in MLflow or trained; a later ``mgd-ray run`` of the study finds them there."""
    plan, state, data_report = _open(study, False, base or Path.cwd())
    client = tracking.client_for(plan.tracking_uri)
    _log_study(plan, client, source, data_report)
    connect_ray()
    tracking.set_tags(client, plan.parent_run_id, {"mgd_ray.only": "pretrain"})
    try:
        state.values["pretrained"] = stage_pretrain(plan, False)
    except BaseException:
        tracking.set_tags(client, plan.parent_run_id, {tracking.STATE_TAG: "interrupted"})
        raise
    _finish(plan, state, client)
    return state.values["pretrained"]


def _finish(plan: Plan, state: StudyState, client: MlflowClient) -> None:
    state.values["done"] = True
    state.save()
    tracking.set_tags(client, plan.parent_run_id, {tracking.STATE_TAG: "finished"})
    client.set_terminated(plan.parent_run_id, "FINISHED")


def _open(study: StudyConfig, resume: bool, base: Path) -> tuple[Plan, StudyState, DataReport]:
    """The plan with absolute paths and its parent run (the last unfinished run's when resuming, else
    a new one), once every file of the data has passed ``check_data``."""
    uri = tracking.resolve_tracking_uri(study.mlflow.tracking_uri, base)
    tracking.require_reachable(uri)  # before the data check and Ray: a wrong URI costs seconds, not minutes
    storage = Path(study.storage_path)
    storage = storage if storage.is_absolute() else (base / storage).resolve()
    study = with_manifest(study.model_copy(update={"data": absolute_paths(study.data, base)}))
    data_report = require_clean(check_data(study.data))
    print(data_report.text(), flush=True)
    if not data_report.images["unlabeled"]:
        raise DatasetError(
            f"{data_report.manifest}: every training image keeps its label, and the teachers (CPS) and MGD learn from "
            "unlabeled images; choose a partition (data.partition: 1/8, data.labeled: N) or add unlabeled images "
            "(images without masks, data.unlabeled)"
        )
    client = tracking.client_for(uri)
    experiment_id = tracking.ensure_experiment(client, study.experiment)
    state = StudyState(storage / study.name / STATE_FILE, {})
    if resume and state.path.is_file():
        state.values = json.loads(state.path.read_text())
    elif resume:
        log.warning("no earlier run of study %s under %s: starting it afresh", study.name, storage)
    if not state.values or state.values.get("done"):
        instance = time.strftime("%Y%m%d-%H%M%S")
        parent_id, _ = tracking.get_or_create_run(
            client,
            experiment_id,
            f"study/{study.name}/{instance}",
            f"study {study.name}",
            {tracking.STUDY_TAG: study.name, tracking.KIND_TAG: "study"},
        )
        state.values = {"parent_run_id": parent_id, "instance": instance, "stages": {}}
    plan = Plan(
        study, storage / study.name / state.values["instance"], uri, experiment_id, state.values["parent_run_id"]
    )
    plan.root.mkdir(parents=True, exist_ok=True)
    state.save()
    return plan, state, data_report


def _log_study(plan: Plan, client: MlflowClient, source: Path | None, data_report: DataReport) -> None:
    """The parent run: running, the study's params, the study file, the resolved study and the data check."""
    study = plan.study
    tracking.set_tags(client, plan.parent_run_id, {tracking.STATE_TAG: "running"})
    tracking.log_params(client, plan.parent_run_id, tracking.flatten("", study.model_dump(mode="json")))
    if source is not None:
        tracking.log_files(client, plan.parent_run_id, [source], "study")
    resolved = plan.root / "resolved_study.json"
    resolved.write_text(study.model_dump_json(indent=2))
    tracking.log_files(client, plan.parent_run_id, [resolved], "study")
    checked = plan.root / "data_check.txt"
    checked.write_text(data_report.text() + "\n")
    # The manifest names every image of every role: a run can be traced to the exact images it used.
    tracking.log_files(client, plan.parent_run_id, [checked, data_report.manifest], "data")


def _run_stages(plan: Plan, state: StudyState, client: MlflowClient, resume: bool, tested: bool) -> Path:
    """The stages in order, each skipped when a resumed study had finished it; returns the report.

    ``tested``: the data has test images (the data check counted them), read once by ``stage_test``.
    """
    study = plan.study
    state.values["pretrained"] = stage_pretrain(plan, resume)
    state.save()
    state.values["teachers"] = stage_teachers(plan, resume)
    state.save()
    plan.teacher_examples = write_teacher_examples(plan)
    baselines = [] if state.done("baselines") else pending_baselines(plan)
    resources = study.resources
    beside = min(len(baselines), study.searcher.max_concurrent) * resources.workers * resources.cpus_per_worker
    wait_for_cache = stage_cache(plan, leave_cpus=beside)  # builds while the baselines run
    if not state.done("baselines"):
        stage_baselines(plan, resume, baselines)
        state.finish("baselines")
    state.values["teacher_cache"] = wait_for_cache()
    state.save()
    cache_info = {f"teacher_cache.{k}": str(v) for k, v in state.values["teacher_cache"].items() if k != "pool_sizes"}
    tracking.set_tags(client, plan.parent_run_id, cache_info)
    if not state.done("search"):
        stage_search(plan, resume)
        state.finish("search")
    best = best_trial_params(plan)
    if not state.done("repeats"):
        stage_repeats(plan, best, resume)
        state.finish("repeats")
    if tested and not state.done("test"):
        stage_test(plan, state.values["teachers"], best)
        state.finish("test")
    return write_report(plan, state.values)
