"""Earlier studies read back from MLflow: found by name (the newest finished run) or parent run id,
with the study file they ran and their figures; an unknown name is one clear error."""

import pytest

from mgd_ray import tracking
from mgd_ray.study.records import StudyRecordError, find_study_run, load_record
from mgd_ray.testing import record_study, tiny_builtin_study

SCHEDULE = {"iterations": 2, "eval_every": 1, "batch_labeled": 2, "batch_unlabeled": 2, "eval_batch": 4}


def test_a_study_is_found_by_name_or_run_id_and_read_back_with_its_figures(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = tiny_builtin_study("a", tmp_path, uri, SCHEDULE, trials=3)
    old = record_study(uri, raw, [({"lambda_1": 0.001, "lambda_2": 5.0}, [0.1, 0.2], "finished")])
    trials = [
        ({"lambda_1": 0.002, "lambda_2": 10.0}, [0.30, 0.41], "finished"),
        ({"lambda_1": 0.005, "lambda_2": 20.0}, [0.50], "stopped_early"),  # higher, but not finished
        ({"lambda_1": 0.003, "lambda_2": 30.0}, [0.20, 0.35], "finished"),
    ]
    new = record_study(uri, raw, trials, baselines={"supervised": [0.30, 0.32]}, repeats=[0.39])
    client = tracking.client_for(uri)
    assert find_study_run(client, "a", uri).info.run_id == new  # the newest finished run of the name
    assert find_study_run(client, old, uri).info.run_id == old
    record = load_record(client, uri, "a")
    assert record.study.name == "a" and record.study.student.backbone == "mobilenet_v2"
    assert record.results.best["params"] == {"lambda_1": 0.002, "lambda_2": 10.0}
    assert record.results.mgd == [0.41, 0.39]
    assert sorted(record.results.baselines["supervised"]) == [0.30, 0.32]
    assert [r["miou"] for r in record.results.trials] == [0.50, 0.41, 0.35]  # best first


def test_unfinished_and_pretrain_only_runs_are_not_studies_and_an_unknown_name_names_the_known_ones(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    done = record_study(uri, tiny_builtin_study("done", tmp_path, uri, SCHEDULE, trials=1), [])
    pretrain = record_study(uri, tiny_builtin_study("pre", tmp_path, uri, SCHEDULE, trials=1), [])
    tracking.set_tags(client, pretrain, {"mgd_ray.only": "pretrain"})
    exp = tracking.ensure_experiment(client, "live")
    tracking.get_or_create_run(
        client, exp, "study/live/1", "study live", {tracking.STUDY_TAG: "live", tracking.KIND_TAG: "study"}
    )
    assert find_study_run(client, "done", uri).info.run_id == done
    for ref in ("pre", "live", "nope"):
        with pytest.raises(StudyRecordError) as err:
            find_study_run(client, ref, uri)
        assert f"no finished study {ref!r} in the tracking store {uri} (finished studies there: done)" in str(err.value)


def test_a_run_without_its_resolved_study_file_is_a_clear_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    exp = tracking.ensure_experiment(client, "bare")
    run_id, _ = tracking.get_or_create_run(
        client, exp, "study/bare/1", "study bare", {tracking.STUDY_TAG: "bare", tracking.KIND_TAG: "study"}
    )
    client.set_terminated(run_id, "FINISHED")
    with pytest.raises(StudyRecordError) as err:
        load_record(client, uri, "bare")
    assert str(err.value).startswith(f"study bare (run {run_id}): cannot read its study/resolved_study.json")
