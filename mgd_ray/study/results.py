"""What a study's runs say in MLflow, read back as the report and the seed repeats need it.

MLflow is the source of truth, also after ``--resume``: each child run's kind, state, params and
val mIoU at its last evaluation (``final_miou``: the weights a job exports and the study registers
are its last step's, so that is the figure every table and ranking uses, as the paper reports
final models); ``finalize_stopped`` first marks the trials ASHA stopped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient

from mgd_ray import tracking
from mgd_ray.plots import pareto_front
from mgd_ray.study.costs import COST_KEYS, architecture_name
from mgd_ray.study.plan import Plan
from mgd_ray.study.search import METRIC


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Any]:
    """The runs of one study instance (its parent run's children), as MLflow returns them."""
    return client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=5000
    )


def _child_runs(plan: Plan) -> list[Any]:
    return child_runs(tracking.client_for(plan.tracking_uri), plan.experiment_id, plan.parent_run_id)


def finalize_stopped(plan: Plan) -> None:
    """Runs still running or interrupted after every stage succeeded were stopped early by ASHA.

    A run ASHA stopped keeps its real end: the time it was terminated, or, when its process was
    killed before it could say so, its last evaluation (every metric of an evaluation is logged in
    one batch with one timestamp); not the time of this report, which would inflate its duration
    (and every trial-seconds figure read from MLflow).
    """
    client = tracking.client_for(plan.tracking_uri)
    for run in _child_runs(plan):
        if run.data.tags.get(tracking.STATE_TAG) in ("running", "interrupted"):
            tracking.set_tags(client, run.info.run_id, {tracking.STATE_TAG: "stopped_early"})
            if run.info.end_time is None:
                stamps = [m.timestamp for m in client.get_metric_history(run.info.run_id, METRIC)]
                client.set_terminated(run.info.run_id, "KILLED", end_time=max(stamps, default=None))


def final_miou(history: list[tuple[int, float]]) -> float | None:
    """The val mIoU of a run's last evaluation (``history``: (step, value) in step order), or None."""
    values = [v for _, v in history if not math.isnan(v)]
    return values[-1] if values else None


def run_row(client: MlflowClient, run: Any) -> dict[str, Any]:
    """One child run as the report sees it: kind, state, params, final val mIoU, evaluations."""
    history = tracking.metric_history(client, run.info.run_id, METRIC)
    tags = run.data.tags
    return {
        "run_id": run.info.run_id,
        "name": tags.get("mlflow.runName", run.info.run_id),
        "kind": tags.get(tracking.KIND_TAG),
        "state": tags.get(tracking.STATE_TAG),
        "seed": tags.get("mgd_ray.seed"),
        "baseline": tags.get("mgd_ray.baseline"),
        "params": json.loads(tags.get("mgd_ray.params", "{}")),
        "miou": final_miou(history),
        "test": final_miou(tracking.metric_history(client, run.info.run_id, "test/mIoU")),
        "evals": len(history),
        "last_step": history[-1][0] if history else 0,
        "cache": tags.get("mgd_ray.teacher_cache"),
        "architecture": tags.get("mgd_ray.architecture"),
        "cost": {k.removeprefix("cost/"): v for k, v in run.data.metrics.items() if k.startswith("cost/")},
    }


def collect(plan: Plan) -> list[dict[str, Any]]:
    client = tracking.client_for(plan.tracking_uri)
    return [run_row(client, r) for r in _child_runs(plan)]


def best_trial_params(plan: Plan) -> dict[str, Any]:
    """The params of the finished search trial with the best final val mIoU (the one the repeats re-run)."""
    finalize_stopped(plan)
    trials = [r for r in collect(plan) if r["kind"] == "trial" and r["miou"] is not None and r["state"] == "finished"]
    if not trials:
        raise RuntimeError(f"study {plan.study.name}: no search trial finished with a {METRIC}")
    return max(trials, key=lambda r: r["miou"])["params"]


@dataclass
class StudyResults:
    """What the study's child runs in MLflow say, gathered once for every section."""

    rows: list[dict[str, Any]]  # every child run (``run_row``)
    trials: list[dict[str, Any]]  # the search trials, best first
    best: dict[str, Any] | None  # the best finished trial
    baselines: dict[str, list[float]]  # each baseline's final val mIoU, one per seed
    mgd: list[float]  # the best trial's final val mIoU, then its repeats' on the other seeds
    baselines_test: dict[str, list[float]]  # the same on the test split, when the data has one
    mgd_test: list[float]


def study_results(plan: Plan) -> StudyResults:
    return results_from_rows(collect(plan))


def results_from_rows(rows: list[dict[str, Any]]) -> StudyResults:
    """The report's figures from a study's child runs (``run_row`` each)."""
    trials = sorted((r for r in rows if r["kind"] == "trial"), key=lambda r: -(r["miou"] or -1))
    finished = _finished(trials)
    best = finished[0] if finished else None
    baselines: dict[str, list[float]] = {}
    baselines_test: dict[str, list[float]] = {}
    for r in rows:
        if r["kind"] == "baseline" and r["miou"] is not None:
            baselines.setdefault(r["baseline"], []).append(r["miou"])
        if r["kind"] == "baseline" and r["test"] is not None:
            baselines_test.setdefault(r["baseline"], []).append(r["test"])
    mgd: list[float] = []
    mgd_test: list[float] = []
    if best is not None:
        repeats = [r for r in rows if r["kind"] == "repeat" and r["params"] == best["params"]]
        mgd = [r["miou"] for r in [best, *repeats] if r["miou"] is not None]
        mgd_test = [r["test"] for r in [best, *repeats] if r["test"] is not None]
    return StudyResults(rows, trials, best, baselines, mgd, baselines_test, mgd_test)


def _finished(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials that ran to the end with a val mIoU, in the order given."""
    return [r for r in trials if r["state"] == "finished" and r["miou"] is not None]


def trial_cost(row: dict[str, Any]) -> dict[str, float | None]:
    """A trial's cost as its run recorded it (``cost/*`` metrics): gflops, params_m, latency_ms."""
    return {key: row.get("cost", {}).get(key) for key in COST_KEYS.values()}


def front_members(plan: Plan, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished trials on the Pareto front of val mIoU (max) against the study's cost (min; GFLOPs
    when the search has one objective), cheapest first; one per architecture (cost is the architecture's)."""
    searcher = plan.study.searcher
    key = COST_KEYS[searcher.cost if searcher.multi_objective else "gflops"]
    done = [r for r in _finished(trials) if trial_cost(r)[key] is not None]
    front, seen = [], set()
    for i in pareto_front([(trial_cost(r)[key], r["miou"]) for r in done]):
        if done[i]["architecture"] not in seen:
            seen.add(done[i]["architecture"])
            front.append(done[i])
    return front


def baselines_student_best(plan: Plan, trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best finished trial on the baselines' own student, in a study that searches the student:
    the trial to set beside the baselines (the overall best may be a larger student)."""
    name = architecture_name(plan.study.student)
    same = [r for r in _finished(trials) if r["architecture"] == name]
    return max(same, key=lambda r: r["miou"]) if same else None
