"""A whole study run twice (local Ray, in this process): a sequential search reruns to the same trial
table; ASHA really stops live trials, which MLflow and the report then call stopped early; and the
seed-repeat stage runs the baseline on every seed and the best configuration again on seed 1, whose
mean ± std the report gives.

With ``searcher.max_concurrent: 1`` TPE proposes each trial from the finished ones only, and ASHA
compares each trial with the earlier ones at the same rung, so neither depends on which trial
reports first: the README's reproducible mode (issue 20). The second run reuses the first one's
teacher from MLflow, as any later run of a study does.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import ray
from mlflow.tracking import MlflowClient

from mgd_ray import tracking
from mgd_ray.models.complexity import segmenter_cost
from mgd_ray.study.compare import write_compare
from mgd_ray.study.config import parse_study
from mgd_ray.study.report import fmt_ms
from mgd_ray.study.run import run_study
from mgd_ray.testing import tiny_builtin_study

pytestmark = pytest.mark.slow  # two whole studies

TINY = {"iterations": 4, "eval_every": 1, "batch_labeled": 2, "batch_unlabeled": 2, "eval_batch": 4}


def study_raw(root: Path) -> dict:
    return tiny_builtin_study("rerun", root, f"sqlite:///{root / 'mlflow.db'}", TINY, trials=4) | {
        "search": {
            "lambda_1": {"low": 1e-4, "high": 1e-1, "log": True},
            "lambda_2": {"low": 0.1, "high": 1000, "log": True},
        },
        "searcher": {
            "sampler": "tpe",
            "seed": 0,
            "num_samples": 4,
            "max_concurrent": 1,
            "storage": "sqlite:///optuna.db",
        },
        "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2},
        "baselines": [{"method": "supervised"}],
        "seeds": [0, 1],
        "ray_train": {"in_trial": True},
    }


def trial_table(client: MlflowClient, parent: str, experiment: str = "rerun") -> list[tuple]:
    """Each trial of one study run, in the order they ran: its parameters, val mIoU history and state."""
    runs = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.`{tracking.KIND_TAG}` = 'trial'",
        order_by=["attributes.start_time ASC"],
    )
    return [
        (
            float(r.data.params["losses.lambda_1"]),
            float(r.data.params["losses.lambda_2"]),
            tuple(tracking.metric_history(client, r.info.run_id, "val/mIoU")),
            r.data.tags[tracking.STATE_TAG],
        )
        for r in runs
    ]


def test_a_sequential_search_reruns_to_the_same_trials_and_asha_stops_weak_ones(tmp_path):
    study = parse_study(study_raw(tmp_path))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        reports, tables = [], []
        for _ in range(2):
            reports.append(run_study(study, base=tmp_path))
            parents = client.search_runs(
                [client.get_experiment_by_name("rerun").experiment_id],
                filter_string=f"tags.`{tracking.KIND_TAG}` = 'study'",
                order_by=["attributes.start_time DESC"],
            )
            tables.append(trial_table(client, parents[0].info.run_id))
        # A study seeded with the first run's best finished trial (searcher.warm_start by parent run id).
        seeded_raw = study_raw(tmp_path) | {"name": "seeded", "baselines": [], "seeds": [0]}
        seeded_raw["searcher"] = {"num_samples": 1, "max_concurrent": 1, "warm_start": [parents[1].info.run_id]}
        seeded_raw["scheduler"] = {"type": "none"}
        seeded_report = run_study(parse_study(seeded_raw), base=tmp_path)
    finally:
        ray.shutdown()
    first, second = tables
    assert len(first) == 4 and first == second  # parameters, every evaluation and the verdict, to the digit
    # searcher.storage (relative: beside the study) kept each run's search as an Optuna study of its
    # own, trial for trial the MLflow table: its parameters and its last val/mIoU, in the order asked.
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert sorted(s.study_name for s in optuna.get_all_study_summaries(storage)) == sorted(
        p.data.tags["mgd_ray.optuna_study"] for p in parents[:2]
    )
    for parent, table in zip([parents[1], parents[0]], tables, strict=True):
        assert parent.data.tags["mgd_ray.optuna_storage"] == storage
        ostudy = optuna.load_study(study_name=parent.data.tags["mgd_ray.optuna_study"], storage=storage)
        assert ostudy.user_attrs["mlflow.parent_run_id"] == parent.info.run_id
        assert [(t.params["lambda_1"], t.params["lambda_2"], t.value, t.state.name) for t in ostudy.trials] == [
            (l1, l2, history[-1][1], "COMPLETE") for l1, l2, history, _ in table
        ]
    states = [state for *_, state in first]
    assert "stopped_early" in states and "finished" in states, states
    for *_, history, state in first:
        steps = [s for s, _ in history]
        # A stopped trial has fewer evaluations than the schedule's four, a finished one all of them.
        assert (steps == [1, 2, 3, 4]) == (state == "finished"), (steps, state)
    # ASHA stops a trial at a rung only below the better half of the trials that reached it before.
    for i, (*_, history, state) in enumerate(first):
        if state == "stopped_early":
            rung = len(history)
            earlier = [dict(h)[rung] for *_, h, _ in first[:i] if rung in dict(h)]
            assert earlier and dict(history)[rung] < max(earlier)
    # Each run's report lists its stopped trials as such; the second run trained no teacher.
    for report in reports:
        text = Path(report).read_text()
        assert text.count(" | stopped_early |") == states.count("stopped_early")
    # Seed repeats, asserted against the runs' own metrics: Sup-only on seeds 0 and 1, the best
    # trial's configuration again on seed 1, and both as mean ± std over their last evaluations.
    parent = parents[0].info.run_id
    children = client.search_runs(
        [client.get_experiment_by_name("rerun").experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )

    def last(run) -> float:
        return tracking.metric_history(client, run.info.run_id, "val/mIoU")[-1][1]

    baselines = sorted(
        (int(r.data.params["schedule.seed"]), last(r)) for r in children if r.data.tags[tracking.KIND_TAG] == "baseline"
    )
    assert [seed for seed, _ in baselines] == [0, 1]
    repeats = [r for r in children if r.data.tags[tracking.KIND_TAG] == "repeat"]
    assert len(repeats) == 1 and repeats[0].data.params["schedule.seed"] == "1"
    finished = {t[:2]: t[2][-1][1] for t in second if t[-1] == "finished"}
    top = max(finished.values())
    repeat = repeats[0]
    # The best finished trial's configuration (on 4 val images, several trials may tie for it).
    configuration = (float(repeat.data.params["losses.lambda_1"]), float(repeat.data.params["losses.lambda_2"]))
    assert finished.get(configuration) == top, (configuration, finished)
    text = Path(reports[1]).read_text()
    assert f"| supervised | {fmt_ms([m for _, m in baselines])} |" in text
    assert f"| MGD (best searched configuration) | {fmt_ms([top, last(repeat)])} |" in text
    teachers = client.search_runs(
        [client.get_experiment_by_name("rerun").experiment_id], filter_string=f"tags.`{tracking.KIND_TAG}` = 'teacher'"
    )
    assert len(teachers) == 1
    # The seeded study's one trial ran the first run's best configuration, and trained to the same
    # val mIoU, evaluation by evaluation (same seed, same data, the reused teacher).
    seeded_parent = client.search_runs(
        [client.get_experiment_by_name("seeded").experiment_id], filter_string=f"tags.`{tracking.KIND_TAG}` = 'study'"
    )[0]
    seeded_table = trial_table(client, seeded_parent.info.run_id, "seeded")
    best_first = max(t[2][-1][1] for t in first if t[-1] == "finished")
    tied = {t[:2]: t[2] for t in first if t[-1] == "finished" and t[2][-1][1] == best_first}
    assert len(seeded_table) == 1 and seeded_table[0][:2] in tied
    assert seeded_table[0][2] == tied[seeded_table[0][:2]]
    assert "Warm start: 1 configuration(s), the best finished trials of" in Path(seeded_report).read_text()
    # mgd-ray compare reads both runs of the study back: the report's own figures, and the cost.
    text, _ = write_compare(f"sqlite:///{tmp_path / 'mlflow.db'}", [parents[1].info.run_id, parent], tmp_path / "cmp")
    gflops = segmenter_cost(study.student, 4, 32)[1]
    assert f"| {gflops:.2f} (32²) | MGD (best configuration) | {fmt_ms([top, last(repeat)])} |" in text
    assert f"| {gflops:.2f} (32²) | supervised | {fmt_ms([m for _, m in baselines])} |" in text
