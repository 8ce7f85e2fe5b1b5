"""A multi-objective study over two student backbones: the Pareto front of val mIoU against GFLOPs,
each front model registered with its cost and taken by name; a limit that drops an architecture
before it trains."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import ray
from mlflow.tracking import MlflowClient

from mgd_ray import tracking
from mgd_ray.config import ConfigError
from mgd_ray.predict import resolve_model
from mgd_ray.study.config import parse_study
from mgd_ray.study.costs import architectures, counted_costs
from mgd_ray.study.report import fmt_ms
from mgd_ray.study.run import run_study
from mgd_ray.testing import tiny_builtin_study

pytestmark = pytest.mark.slow  # a whole study

TINY = {"iterations": 2, "eval_every": 1, "batch_labeled": 2, "batch_unlabeled": 2, "eval_batch": 4}


def front_raw(root: Path, **searcher) -> dict:
    raw = tiny_builtin_study("front", root, f"sqlite:///{root / 'mlflow.db'}", TINY, trials=4)
    raw["search"] = {
        "lambda_1": {"low": 1e-4, "high": 1e-2, "log": True},
        "student_backbone": {"choices": ["mobilenet_v2", "resnet18"]},
    }
    raw["searcher"] = {
        "sampler": "nsga2",
        "num_samples": 4,
        "max_concurrent": 1,
        "cost": "gflops",
        "storage": "sqlite:///optuna.db",
    } | searcher
    raw["scheduler"] = {"type": "asha", "grace_period": 1, "reduction_factor": 2}
    raw["ray_train"] = {"in_trial": True}
    return raw


def dominated(point: tuple[float, float], others: list[tuple[float, float]]) -> bool:
    """(cost, mIoU): another point costs no more and scores no less, and differs."""
    return any(c <= point[0] and m >= point[1] and (c, m) != point for c, m in others)


def test_a_multi_objective_study_reports_and_registers_its_pareto_front(tmp_path):
    study = parse_study(front_raw(tmp_path))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = run_study(study, base=tmp_path)
    finally:
        ray.shutdown()
    client = MlflowClient(uri)
    parent = client.search_runs(
        [client.get_experiment_by_name("front").experiment_id], filter_string=f"tags.`{tracking.KIND_TAG}` = 'study'"
    )[0]
    trials = client.search_runs(
        [client.get_experiment_by_name("front").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`{tracking.KIND_TAG}` = 'trial'",
    )
    # Each trial ran the architecture it was given, and its run records that architecture's cost,
    # counted independently here.
    costs = counted_costs(architectures(study), 4, 32)
    points = {}
    for run in trials:
        arch = run.data.tags["mgd_ray.architecture"]
        assert run.data.params["student.backbone"] == arch.split("-os")[0]
        assert run.data.metrics["cost/gflops"] == pytest.approx(costs[arch].gflops)
        miou = tracking.metric_history(client, run.info.run_id, "val/mIoU")[-1][1]
        if run.data.tags[tracking.STATE_TAG] == "finished":
            points[run.info.run_id] = (costs[arch].gflops, miou, arch)
    assert {p[2] for p in points.values()} == {"mobilenet_v2-os16", "resnet18-os16"}  # both were searched
    # The front, by an independent dominance check over the finished trials' own metrics.
    pairs = [(c, m) for c, m, _ in points.values()]
    expected = {arch for c, m, arch in points.values() if not dominated((c, m), pairs)}
    versions = client.search_model_versions("name = 'front-front'")
    assert len(versions) == len(expected)
    registered = {arch: client.get_model_version_by_alias("front-front", arch) for arch in expected}
    text = Path(report).read_text()
    for arch, version in registered.items():
        # (trials with equal figures are all undominated; the front takes one of them)
        run_id = version.tags["mgd_ray.trial_run"]
        assert points[run_id][2] == arch and not dominated(points[run_id][:2], pairs)
        assert float(version.tags["mgd_ray.cost.gflops"]) == pytest.approx(costs[arch].gflops)
        assert float(version.tags["mgd_ray.val_mIoU"]) == pytest.approx(points[run_id][1])
        assert f"`models:/front-front@{arch}`" in text
        # export/predict take a front member by name: its alias resolves to that trial's model.
        path = resolve_model(f"models:/front-front@{arch}", uri, tmp_path / "resolved" / arch)
        assert path.is_file()
    assert "## Pareto front: val mIoU against GFLOPs" in text
    # Beside the baselines (whose student is MobileNetV2), MGD's best trial on that same student:
    # the overall best may be the larger ResNet-18, which the front shows at its own cost.
    same = max(m for c, m, arch in points.values() if arch == "mobilenet_v2-os16")
    assert f"| MGD (best trial on the baselines' student, mobilenet_v2-os16) | {fmt_ms([same])} |" in text
    # The search kept two objectives in Optuna: (mIoU, GFLOPs) per trial, the cost being the architecture's.
    ostudy = optuna.load_study(
        study_name=parent.data.tags["mgd_ray.optuna_study"], storage=f"sqlite:///{tmp_path / 'optuna.db'}"
    )
    assert [d.name for d in ostudy.directions] == ["MAXIMIZE", "MINIMIZE"]
    for t in ostudy.trials:
        if t.state.name == "COMPLETE":
            assert t.values[1] == pytest.approx(costs[t.params["student"]].gflops)


def test_a_student_over_the_limit_never_trains_and_no_student_left_is_an_error(tmp_path):
    study = parse_study(front_raw(tmp_path))
    costs = counted_costs(architectures(study), 4, 32)
    limit = (costs["mobilenet_v2-os16"].gflops + costs["resnet18-os16"].gflops) / 2
    assert costs["mobilenet_v2-os16"].gflops < limit < costs["resnet18-os16"].gflops
    from mgd_ray.study.costs import allowed

    kept, out = allowed(parse_study(front_raw(tmp_path, max_gflops=limit)), costs)
    assert kept == ["mobilenet_v2-os16"] and "searcher.max_gflops" in out["resnet18-os16"]
    with pytest.raises(ConfigError, match=r"searcher limits: no student architecture.*mobilenet_v2-os16 \("):
        run_study(parse_study(front_raw(tmp_path, max_gflops=limit / 100)), base=tmp_path)  # before Ray
