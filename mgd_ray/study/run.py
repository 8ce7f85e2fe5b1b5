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
from mgd_ray.config import absolute_paths, absolute_sqlite_url
from mgd_ray.data.check import DataReport, check_data, require_clean
from mgd_ray.data.datasets import DatasetError
from mgd_ray.data.stream import with_manifest
from mgd_ray.ray_connect import connect_ray
from mgd_ray.study.config import StudyConfig
from mgd_ray.study.costs import (
    allowed,
    architectures,
    costs_to_json,
    counted_costs,
    reference_models,
    with_latency,
)
from mgd_ray.study.plan import Plan
from mgd_ray.study.records import load_record
from mgd_ray.study.report import write_report
from mgd_ray.study.results import best_trial_params
from mgd_ray.study.search import open_storage, shown_url, warm_start_points
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
from mgd_ray.study.table import table_cells, write_table

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
    _student_costs(plan, client, len(data_report.class_names))
    try:
        report = _run_stages(plan, state, client, resume, tested=data_report.images["test"] > 0)
    except BaseException:
        tracking.set_tags(client, plan.parent_run_id, {tracking.STATE_TAG: "interrupted"})
        raise
    _finish(plan, state, client)
    return report


def run_table(study: StudyConfig, source: Path | None = None, resume: bool = False, base: Path | None = None) -> Path:
    """A table study (``data.partitions``): each partition's study in turn, then the table of them,
    logged to a ``table`` run of the study's experiment; returns ``table.md``.

    With ``--resume`` a cell that finished is read back, not run again, and the interrupted one
    continues; without it every cell is a new run (teachers and pretrainings are still reused).
    """
    base = base or Path.cwd()
    cells = table_cells(study)
    for cell in cells:  # every partition's data is checked before the first cell trains
        checked_data(cell, base)
    run_ids = {}
    for partition, cell in zip(study.data.partitions, cells, strict=True):
        finished = _finished_instance(cell, base) if resume else None
        if finished is None:
            run_study(cell, source=source, resume=resume, base=base)
            finished = _finished_instance(cell, base)
        else:
            log.info("table %s: cell %s finished earlier (run %s); not run again", study.name, cell.name, finished)
        run_ids[partition] = finished
    uri = tracking.resolve_tracking_uri(study.mlflow.tracking_uri, base)
    client = tracking.client_for(uri)
    records = {p: load_record(client, uri, run_id) for p, run_id in run_ids.items()}
    storage = Path(study.storage_path)
    out = (storage if storage.is_absolute() else base / storage) / study.name / "table"
    text, files = write_table(study, records, out)
    experiment_id = tracking.ensure_experiment(client, study.experiment)
    key = f"table/{study.name}/" + "+".join(run_ids[p] for p in study.data.partitions)
    tags = {tracking.STUDY_TAG: study.name, tracking.KIND_TAG: "table"}
    table_run, _ = tracking.get_or_create_run(client, experiment_id, key, f"table {study.name}", tags)
    tracking.set_tags(client, table_run, {"mgd_ray.cells": json.dumps(run_ids)})
    tracking.log_files(client, table_run, [*files, *([source] if source else [])], "table")
    client.set_terminated(table_run, "FINISHED")
    print(text)
    return files[0]


def _finished_instance(study: StudyConfig, base: Path) -> str | None:
    """The parent run id of the study's last run if it finished (its ``study_state.json`` says done)."""
    storage = Path(study.storage_path)
    path = (storage if storage.is_absolute() else base / storage).resolve() / study.name / STATE_FILE
    if not path.is_file():
        return None
    values = json.loads(path.read_text())
    return values["parent_run_id"] if values.get("done") else None


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


def _student_costs(plan: Plan, client: MlflowClient, num_classes: int) -> None:
    """Each student architecture's latency when the study asks for it (a Ray task on the named
    device, or the cache), then the searcher's limits again; logged to the parent run as ``costs.json``.
    The baselines' student and the teachers get the same measures, for the accuracy–cost figure."""
    study = plan.study
    refs = reference_models(study)
    plan.reference_costs = counted_costs(refs, num_classes, study.data.crop_size)
    if study.searcher.measures_latency:
        models = architectures(study) | refs
        measured, where = with_latency(
            study, models, plan.costs | plan.reference_costs, num_classes, plan.root.parents[1]
        )
        plan.costs = {name: measured[name] for name in plan.costs}
        plan.reference_costs = {name: measured[name] for name in refs}
        tracking.set_tags(client, plan.parent_run_id, {"mgd_ray.latency_measured_on": where})
    plan.students, excluded = allowed(study, plan.costs)
    if excluded:
        log.info("search: students over the searcher's limits, never trained: %s", excluded)
        tracking.set_tags(client, plan.parent_run_id, {"mgd_ray.students_excluded": json.dumps(excluded)[:5000]})
    path = plan.root / "costs.json"
    costs = {"students": costs_to_json(plan.costs), "others": costs_to_json(plan.reference_costs)}
    path.write_text(json.dumps(costs | {"searched": plan.students, "excluded": excluded}, indent=1))
    tracking.log_files(client, plan.parent_run_id, [path], "study")


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
    if study.searcher.storage:  # likewise the Optuna storage, made absolute like the tracking URI
        searcher = study.searcher.model_copy(update={"storage": absolute_sqlite_url(study.searcher.storage, base)})
        open_storage(searcher.storage)
        study = study.model_copy(update={"searcher": searcher})
    storage = Path(study.storage_path)
    storage = storage if storage.is_absolute() else (base / storage).resolve()
    study, data_report = checked_data(study, base)
    print(data_report.text(), flush=True)
    costs = counted_costs(architectures(study), len(data_report.class_names), study.data.crop_size)
    students, _ = allowed(study, costs)  # a student over max_gflops / max_params_m: before Ray
    client = tracking.client_for(uri)
    warm_start, warm_start_runs = resolve_warm_start(study, client, uri)  # an unknown or unfit study: before Ray
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
    plan.warm_start, plan.warm_start_runs = warm_start, warm_start_runs
    plan.costs, plan.students = costs, students
    plan.root.mkdir(parents=True, exist_ok=True)
    state.save()
    return plan, state, data_report


def checked_data(study: StudyConfig, base: Path) -> tuple[StudyConfig, DataReport]:
    """The study with absolute data paths and its manifest, once every file has passed ``check_data``
    and some training images are unlabeled (the teachers' CPS and MGD learn from them)."""
    study = with_manifest(study.model_copy(update={"data": absolute_paths(study.data, base)}))
    data_report = require_clean(check_data(study.data))
    if not data_report.images["unlabeled"]:
        raise DatasetError(
            f"{data_report.manifest}: every training image keeps its label, and the teachers (CPS) and MGD learn from "
            "unlabeled images; choose a partition (data.partition: 1/8, data.labeled: N) or add unlabeled images "
            "(images without masks, data.unlabeled)"
        )
    return study, data_report


def resolve_warm_start(
    study: StudyConfig, client: MlflowClient, uri: str
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``searcher.warm_start``: the earlier studies' best finished trials as points of this search."""
    earlier, runs = [], {}
    for ref in study.searcher.warm_start:
        record = load_record(client, uri, ref)
        best = [r["params"] for r in record.results.trials if r["state"] == "finished" and r["miou"] is not None]
        earlier.append((record.study, best))
        runs[ref] = record.run_id
    return (warm_start_points(study, earlier) if earlier else []), runs


def _log_study(plan: Plan, client: MlflowClient, source: Path | None, data_report: DataReport) -> None:
    """The parent run: running, the study's params, the study file, the resolved study and the data check."""
    study = plan.study
    tracking.set_tags(client, plan.parent_run_id, {tracking.STATE_TAG: "running"})
    if study.searcher.storage:
        storage_tags = {
            "mgd_ray.optuna_storage": shown_url(study.searcher.storage),
            "mgd_ray.optuna_study": plan.optuna_study,
        }
        tracking.set_tags(client, plan.parent_run_id, storage_tags)
    dumped = study.model_dump(mode="json")
    if study.searcher.storage:  # a database password stays out of MLflow
        dumped["searcher"]["storage"] = shown_url(study.searcher.storage)
    if plan.warm_start:
        tracking.set_tags(client, plan.parent_run_id, {"mgd_ray.warm_start": json.dumps(plan.warm_start_runs)})
    tracking.log_params(client, plan.parent_run_id, tracking.flatten("", dumped))
    if source is not None:
        tracking.log_files(client, plan.parent_run_id, [source], "study")
    resolved = plan.root / "resolved_study.json"
    resolved.write_text(json.dumps(dumped, indent=2))
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
