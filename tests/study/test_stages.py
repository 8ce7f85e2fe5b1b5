"""The study's Tune stages, without Ray: orphaned runs, pending baselines, the cache's CPUs, checkpoints."""

from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from mgd_ray import tracking
from mgd_ray.study.config import load_study
from mgd_ray.study.plan import Plan
from mgd_ray.study.stages import _cache_cpus, drop_checkpoints, drop_orphan_trial_runs, pending_baselines

QUICKSTART = Path(__file__).parents[2] / "studies" / "quickstart.yaml"


def test_resume_deletes_only_unfinished_trial_runs_that_tunes_snapshot_does_not_know(tmp_path):

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("orphans")
    parent = client.create_run(exp, tags={tracking.KIND_TAG: "study"}).info.run_id
    other_parent = client.create_run(exp, tags={tracking.KIND_TAG: "study"}).info.run_id

    def trial(trial_id: str, status: str, parent_id: str = parent, kind: str = "trial") -> str:
        tags = {tracking.KIND_TAG: kind, "mgd_ray.trial_id": trial_id, "mlflow.parentRunId": parent_id}
        run_id = client.create_run(exp, tags=tags).info.run_id
        if status != "RUNNING":
            client.set_terminated(run_id, status)
        return run_id

    known_running = trial("known", "RUNNING")
    orphan_running = trial("lost1", "RUNNING")
    orphan_killed = trial("lost2", "KILLED")
    orphan_finished = trial("lost3", "FINISHED")  # a result: kept
    other_study = trial("lost4", "RUNNING", parent_id=other_parent)
    baseline = trial("", "RUNNING", kind="baseline")
    plan = Plan(load_study(QUICKSTART), tmp_path, uri, exp, parent)
    for trial_id in ("known", "lost1", "lost3"):  # the jobs' own folders, with the checkpoints they wrote
        (tmp_path / "trials" / trial_id / "checkpoints" / "step_00000002").mkdir(parents=True)

    dropped = drop_orphan_trial_runs(plan, {"known"})

    assert sorted(dropped) == sorted([orphan_running, orphan_killed])
    alive = {r.info.run_id for r in client.search_runs([exp], max_results=100)}
    assert alive == {parent, other_parent, known_running, orphan_finished, other_study, baseline}
    # A dropped trial's folder goes with its run (nothing resumes it); the others' stay.
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == ["known", "lost3"]


def test_baseline_jobs_are_those_without_a_finished_run(tmp_path):

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("baselines")
    parent = client.create_run(exp, tags={tracking.KIND_TAG: "study"}).info.run_id
    study = load_study(QUICKSTART)
    study = study.model_copy(update={"seeds": (0, 1)})  # baselines: 0 supervised, 1 kd[T_D], 2 kd[T_D]+unlabeled
    plan = Plan(study, tmp_path, uri, exp, parent)

    def run(key: str, status: str, state: str) -> None:
        run_id = client.create_run(
            exp, tags={tracking.KEY_TAG: f"{parent}/baseline/{key}", tracking.STATE_TAG: state}
        ).info.run_id
        client.set_terminated(run_id, status)

    run("supervised/0", "FINISHED", "finished")  # done: not run again
    run("supervised/1", "KILLED", "interrupted")  # interrupted: runs again
    run("kd[T_D]/0", "FINISHED", "finished")
    run("kd[T_D]+unlabeled/0", "FINISHED", "finished")
    run("kd[T_D]+unlabeled/1", "FINISHED", "finished")
    assert pending_baselines(plan) == [(0, 1), (1, 1)]
    assert pending_baselines(plan, teacher_free=True) == [(0, 1)]  # kd needs T_D: not beside the teachers


@pytest.mark.parametrize(
    "leave,gpus,expected",
    [
        (0.0, 0.0, 2.0),  # alone: both trial slots' CPUs of the 2-CPU node
        (1.0, 0.0, 1.0),  # one baseline beside it: the other CPU
        (2.0, 0.0, 1.0),  # baselines wanting every CPU: still one worker's (a baseline waits)
        (1.0, 0.5, 1.0),  # on GPU: one worker's CPUs
    ],
)
def test_cache_build_leaves_the_cpus_of_the_baselines_beside_it(tmp_path, monkeypatch, leave, gpus, expected):

    study = load_study(QUICKSTART)  # max_concurrent 2, 1 CPU per trial
    study = study.model_copy(update={"resources": study.resources.model_copy(update={"gpus_per_worker": gpus})})
    monkeypatch.setattr(
        ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False, "Resources": {"CPU": 64.0}}]
    )
    assert _cache_cpus(Plan(study, tmp_path, "sqlite://", "0", "p"), leave) == expected


def test_ended_trials_tune_checkpoints_are_dropped_and_failed_ones_kept(tmp_path):
    from types import SimpleNamespace

    def trial(name: str, sizes: list[int]) -> Path:
        d = tmp_path / name
        for i, size in enumerate(sizes):
            (d / f"checkpoint_{i:06d}").mkdir(parents=True)
            (d / f"checkpoint_{i:06d}" / "state.pt").write_bytes(b"x" * size)
        (d / "result.json").write_text("{}")
        return d

    done, stopped, failed = trial("done", [100, 20]), trial("stopped", [7]), trial("failed", [50])
    results = [
        SimpleNamespace(path=str(done), error=None),
        SimpleNamespace(path=str(stopped), error=None),
        SimpleNamespace(path=str(failed), error=RuntimeError("x")),
        SimpleNamespace(path=None, error=None),
    ]
    assert drop_checkpoints(results, "search") == 127
    assert not list(done.glob("checkpoint_*")) and not list(stopped.glob("checkpoint_*"))
    assert (done / "result.json").is_file()  # the trial's results stay
    assert (failed / "checkpoint_000000" / "state.pt").stat().st_size == 50  # a failed trial may be resumed


def test_the_teacher_cache_covers_the_longest_trial_or_the_first_teacher_cache_steps(tmp_path):
    from mgd_ray.study.plan import pretrain_key
    from mgd_ray.study.stages import cache_contents

    study = load_study(QUICKSTART)
    longest = max([study.schedule.iterations, *(study.search.iterations.choices if study.search.iterations else [])])

    def contents(**distill):
        s = study.model_copy(update={"distill": study.distill.model_copy(update=distill)})
        plan = Plan(s, tmp_path, "sqlite:///unused.db", "0", "parent")
        plan.teachers = {name: tmp_path / f"{name}.pt" for name in s.teachers}
        plan.pretrained = {pretrain_key(s, s.student): tmp_path / "student_backbone.pt"}
        return cache_contents(plan)

    job, pool_sizes, steps, signals = contents()
    assert steps == longest and job.schedule.seed == study.seeds[0] and signals == "job"
    assert set(pool_sizes) >= {study.distill.losses.pool_size}
    assert contents(teacher_cache_steps=longest // 4)[2] == longest // 4  # only the first steps
    assert contents(teacher_cache_steps=10 * longest)[2] == longest  # never more than a trial runs
