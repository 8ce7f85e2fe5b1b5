"""The optional Optuna storage of a search (``searcher.storage``): validated, opened before any work
with a one-line error that hides passwords, one fresh Optuna study per search, and trials that a dead
driver left RUNNING marked FAIL."""

import pickle
from pathlib import Path

import optuna
import pytest

from mgd_ray import tracking
from mgd_ray.config import ConfigError, absolute_sqlite_url
from mgd_ray.study.config import parse_study
from mgd_ray.study.records import StudyRecordError
from mgd_ray.study.run import resolve_warm_start
from mgd_ray.study.search import (
    SearchStorageError,
    WarmStartError,
    fail_orphan_trials,
    fresh_optuna_study,
    make_searcher,
    open_storage,
    shown_url,
    unsearched_values,
    warm_start_points,
)
from mgd_ray.testing import record_study, tiny_builtin_study

SCHEDULE = {"iterations": 2, "eval_every": 1, "batch_labeled": 2, "batch_unlabeled": 2, "eval_batch": 4}


def _study(tmp_path: Path, **searcher):
    raw = tiny_builtin_study("s", tmp_path, "sqlite:///mlflow.db", SCHEDULE, trials=2)
    raw["searcher"] = raw.get("searcher", {}) | searcher
    raw["search"] = {"lambda_1": {"low": 1e-4, "high": 1e-1, "log": True}}
    return parse_study(raw)


@pytest.mark.parametrize("url", ["optuna.db", "redis://localhost/0", "sqlite:/optuna.db", ""])
def test_a_storage_that_is_not_a_database_url_is_refused_naming_the_field(tmp_path, url):
    with pytest.raises(ConfigError) as err:
        _study(tmp_path, storage=url)
    assert "searcher.storage" in str(err.value) and "sqlite:///optuna.db" in str(err.value)


def test_database_urls_validate_and_a_relative_sqlite_file_becomes_absolute(tmp_path):
    for url in ("sqlite:///optuna.db", "postgresql://me@db.internal/optuna", "mysql+pymysql://me@db/optuna"):
        assert _study(tmp_path, storage=url).searcher.storage == url
    assert absolute_sqlite_url("sqlite:///runs/optuna.db", tmp_path) == f"sqlite:///{tmp_path}/runs/optuna.db"
    assert absolute_sqlite_url("sqlite:////abs/o.db", tmp_path) == "sqlite:////abs/o.db"
    assert absolute_sqlite_url("postgresql://h/db", tmp_path) == "postgresql://h/db"


def test_open_storage_creates_the_tables_or_fails_in_one_line_without_the_password(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url)
    assert (tmp_path / "optuna.db").is_file() and storage.get_all_studies() == []
    with pytest.raises(SearchStorageError) as err:
        open_storage(f"sqlite:///{tmp_path / 'missing' / 'optuna.db'}")
    assert str(err.value).startswith(f"searcher.storage sqlite:///{tmp_path / 'missing' / 'optuna.db'}: cannot open")
    assert "\n" not in str(err.value)
    secret = "postgresql://me:s3cret@127.0.0.1:9/optuna"
    with pytest.raises(SearchStorageError) as err:
        open_storage(secret)
    assert "s3cret" not in str(err.value) and "me:***@127.0.0.1:9" in str(err.value)
    assert shown_url(secret) == "postgresql://me:***@127.0.0.1:9/optuna"


def test_a_fresh_optuna_study_drops_an_interrupted_attempts_trials_and_links_to_mlflow(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    first = fresh_optuna_study(storage, "s-1", {"mlflow.parent_run_id": "abc"})
    first.ask()
    first.tell(first.ask(), 0.5)
    again = fresh_optuna_study(storage, "s-1", {"mlflow.parent_run_id": "abc"})
    assert again.trials == [] and again.user_attrs == {"mlflow.parent_run_id": "abc"}
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["s-1"]


def test_trials_left_running_are_marked_failed_and_finished_ones_are_kept(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    ostudy = fresh_optuna_study(storage, "s-1", {})
    done = ostudy.ask()
    ostudy.tell(done, 0.25)
    ostudy.ask(), ostudy.ask()  # asked, never told: the driver died
    assert fail_orphan_trials(storage, "s-1") == [1, 2]
    states = [(t.number, t.state, t.value) for t in optuna.load_study(study_name="s-1", storage=storage).trials]
    state = optuna.trial.TrialState
    assert states == [(0, state.COMPLETE, 0.25), (1, state.FAIL, None), (2, state.FAIL, None)]
    trials = optuna.load_study(study_name="s-1", storage=storage).trials
    assert [t.system_attrs.get("mgd_ray.orphan") is not None for t in trials] == [False, True, True]
    assert fail_orphan_trials(storage, "s-1") == []


def test_the_searcher_keeps_its_optuna_study_in_the_storage(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = _study(tmp_path, storage="sqlite:///optuna.db")
    searcher = make_searcher(study, storage, "s-1")
    searcher.set_search_properties("val/mIoU", "max", {})
    config = searcher.suggest("trial-a")
    searcher.on_trial_complete("trial-a", {"val/mIoU": 0.4})
    (trial,) = optuna.load_study(study_name="s-1", storage=storage).trials
    assert trial.params == {"lambda_1": config["lambda_1"]} and trial.value == 0.4


def test_a_searcher_restored_from_a_snapshot_older_than_the_storage_skips_what_optuna_already_holds(tmp_path):
    # The driver told Optuna that trial-a ended, then died before Tune snapshotted the searcher: the
    # resumed search's snapshot has trial-a still running, and Tune replays its reports (CI saw the
    # resumed study fail on "Trial#2 has already finished and can not be updated").
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = _study(tmp_path, storage="sqlite:///optuna.db")
    searcher = make_searcher(study, storage, "s-1")
    searcher.set_search_properties("val/mIoU", "max", {})
    searcher.suggest("trial-a")
    searcher.suggest("trial-b")
    searcher.on_trial_result("trial-a", {"val/mIoU": 0.3, "training_iteration": 1})
    searcher.save(str(tmp_path / "snapshot.pkl"))
    searcher.on_trial_result("trial-a", {"val/mIoU": 0.4, "training_iteration": 2})
    searcher.on_trial_complete("trial-a", {"val/mIoU": 0.4})

    resumed = make_searcher(study, open_storage(f"sqlite:///{tmp_path / 'optuna.db'}"), "s-1")
    resumed.restore(str(tmp_path / "snapshot.pkl"))
    resumed.on_trial_result("trial-a", {"val/mIoU": 0.3, "training_iteration": 1})  # the replay
    resumed.on_trial_result("trial-a", {"val/mIoU": 0.4, "training_iteration": 2})
    resumed.on_trial_complete("trial-a", {"val/mIoU": 0.4})
    resumed.on_trial_result("trial-b", {"val/mIoU": 0.5, "training_iteration": 1})  # still told as usual
    resumed.on_trial_complete("trial-b", {"val/mIoU": 0.5})

    a, b = optuna.load_study(study_name="s-1", storage=storage).trials
    assert (a.state.name, a.value, a.intermediate_values) == ("COMPLETE", 0.4, {1: 0.3, 2: 0.4})
    assert (b.state.name, b.value, b.intermediate_values) == ("COMPLETE", 0.5, {1: 0.5})


# ---------------------------------------------------------------------------- warm start
def _space_study(tmp_path: Path, search: dict, name: str = "now", **searcher):
    raw = tiny_builtin_study(name, tmp_path, "sqlite:///mlflow.db", SCHEDULE, trials=4)
    raw["search"] = search
    raw["searcher"] = raw["searcher"] | searcher
    return parse_study(raw)


BOTH = {"lambda_1": {"low": 1e-4, "high": 1e-1, "log": True}, "lambda_2": {"low": 1, "high": 200, "log": True}}


def test_warm_start_points_fill_what_the_earlier_study_fixed_and_refuse_what_this_space_excludes(tmp_path):
    earlier = _space_study(tmp_path, {"lambda_1": {"low": 1e-4, "high": 1e-1, "log": True}}, "earlier")
    assert unsearched_values(earlier) | {"lambda_1": 0.003} == {
        "lambda_1": 0.003,
        "lambda_2": 100.0,  # DistillLosses' default, the tiny study's fixed value
        "pool_size": 2,
        "lr": earlier.optim.lr,
        "iterations": 2,
        "teachers": "T_D",
        "pixel_labeled": True,
        "pixel_unlabeled": True,
        "image_level": True,
        "region_level": True,
        "student": "mobilenet_v2-os16",  # the student it trained: a point of a space that searches it
    }
    best = [{"lambda_1": 0.003}, {"lambda_1": 0.02}, {"lambda_1": 0.003}]
    now = _space_study(tmp_path, BOTH, warm_start=["earlier"], warm_start_best=3)
    # Best first, each once; lambda_2 is what the earlier study trained with.
    assert warm_start_points(now, [(earlier, best)]) == [
        {"lambda_1": 0.003, "lambda_2": 100.0},
        {"lambda_1": 0.02, "lambda_2": 100.0},
    ]
    assert warm_start_points(
        now.model_copy(update={"searcher": now.searcher.model_copy(update={"warm_start_best": 1})}), [(earlier, best)]
    ) == [{"lambda_1": 0.003, "lambda_2": 100.0}]
    narrow = _space_study(tmp_path, BOTH | {"lambda_2": {"low": 1, "high": 50}}, warm_start=["earlier"])
    with pytest.raises(WarmStartError) as err:
        warm_start_points(narrow, [(earlier, best)])
    assert str(err.value) == (
        "searcher.warm_start: study 'earlier''s configuration {\"lambda_1\": 0.003} has lambda_2=100.0, outside "
        "search.lambda_2 of study 'now' ([1.0, 50.0]); widen search.lambda_2 or leave 'earlier' out of warm_start"
    )
    with pytest.raises(WarmStartError, match="has no finished search trial"):
        warm_start_points(now, [(earlier, [])])


def test_warm_start_is_validated_against_the_trial_budget_and_needs_a_search(tmp_path):
    with pytest.raises(ConfigError, match=r"searcher.warm_start: 3 studies x warm_start_best 2 = 6 configurations"):
        _space_study(tmp_path, BOTH, warm_start=["a", "b", "c"], warm_start_best=2)
    with pytest.raises(ConfigError, match="searcher.warm_start: the study searches nothing"):
        _space_study(tmp_path, {}, warm_start=["a"])


def test_the_searcher_runs_the_warm_start_points_first(tmp_path):
    now = _space_study(tmp_path, BOTH, warm_start=["earlier"], warm_start_best=2)
    points = [{"lambda_1": 0.003, "lambda_2": 100.0}, {"lambda_1": 0.02, "lambda_2": 7.0}]
    searcher = make_searcher(now, points=points)
    assert [searcher.suggest(f"t{i}") for i in range(2)] == points
    third = searcher.suggest("t2")
    assert third not in points and 1e-4 <= third["lambda_1"] <= 1e-1  # then the sampler proposes


def test_warm_start_resolves_earlier_studies_from_mlflow_or_names_what_is_missing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = tiny_builtin_study("earlier", tmp_path, uri, SCHEDULE, trials=2)
    trials = [
        ({"lambda_1": 0.002, "lambda_2": 3.0}, [0.2, 0.3], "finished"),
        ({"lambda_1": 0.01, "lambda_2": 9.0}, [0.4, 0.5], "finished"),
    ]
    run_id = record_study(uri, raw, trials)
    now = _space_study(tmp_path, BOTH, warm_start=["earlier"])
    client = tracking.client_for(uri)
    assert resolve_warm_start(now, client, uri) == ([{"lambda_1": 0.01, "lambda_2": 9.0}], {"earlier": run_id})
    missing = _space_study(tmp_path, BOTH, warm_start=["earlier", "gone"])
    with pytest.raises(StudyRecordError, match="no finished study 'gone'"):
        resolve_warm_start(missing, client, uri)


def test_a_multi_objective_searcher_tells_optuna_the_mIoU_and_the_architectures_cost(tmp_path):
    raw = tiny_builtin_study("mo", tmp_path, "sqlite:///mlflow.db", SCHEDULE, trials=3)
    raw["search"] = {"student_backbone": {"choices": ["mobilenet_v2", "resnet18"]}}
    raw["searcher"] |= {"cost": "gflops", "sampler": "nsga2"}
    study = parse_study(raw)
    costs = {"mobilenet_v2-os16": 0.2, "resnet18-os16": 0.3}
    searcher = make_searcher(study, students=list(costs), costs=costs)
    assert (searcher.metric, searcher.mode) == ("val/mIoU", "max")  # what Tune checks every result for
    pickle.loads(pickle.dumps(searcher))  # Tune snapshots it (Optuna's NSGA-II holds a lock)
    configs = {t: searcher.suggest(t) for t in ("a", "b", "c")}
    searcher.on_trial_result("a", {"val/mIoU": 0.3, "training_iteration": 1})  # no intermediate values
    searcher.on_trial_complete("a", {"val/mIoU": 0.4, "training_iteration": 2})
    searcher.on_trial_complete("b", {"training_iteration": 1})  # stopped before an evaluation
    searcher.on_trial_complete("c", None, error=True)
    a, b, c = searcher._ot_study.trials
    assert a.state.name == "COMPLETE" and a.values == [0.4, costs[configs["a"]["student"]]]
    assert a.intermediate_values == {}
    assert (b.state.name, c.state.name) == ("PRUNED", "FAIL")
