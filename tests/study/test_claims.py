"""Claims on shared work in MLflow: studies running at once train a shared teacher once (``study.claims``),
and a study waits for, reuses, or takes over what another one holds (``stages.train_shared``)."""

import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mgd_ray import tracking
from mgd_ray.study import claims, stages
from mgd_ray.study.config import load_study
from mgd_ray.study.plan import Plan

QUICKSTART = Path(__file__).parents[2] / "studies" / "quickstart.yaml"


@pytest.fixture
def client(tmp_path) -> MlflowClient:
    return tracking.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")


def status(client, run_id: str) -> tuple[str, str]:
    run = client.get_run(run_id)
    return run.info.status, run.data.tags[claims.OUTCOME_TAG]


def test_the_first_claimant_holds_and_the_second_yields_to_it(client):
    mine, holder = claims.acquire(client, "k1", "parent-a", "study-a", "teacher T_D")
    assert holder is None and mine is not None and mine.owner == "parent-a" and mine.study == "study-a"

    theirs, holder = claims.acquire(client, "k1", "parent-b", "study-b", "teacher T_D")

    assert theirs is None and holder is not None and holder.run_id == mine.run_id and holder.study == "study-a"
    # The yielded claim is ended at once: only the holder's is running.
    assert [c.run_id for c in claims.running_claims(client, "k1")] == [mine.run_id]
    # Another key is another claim.
    other, holder = claims.acquire(client, "k2", "parent-b", "study-b", "teacher T_W")
    assert other is not None and holder is None


def test_claimants_racing_elect_exactly_one_holder(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.ensure_experiment(tracking.client_for(uri), claims.CLAIMS_EXPERIMENT)  # the sqlite schema, once
    start, results = threading.Barrier(4), {}

    def claim(owner: str) -> None:
        client = tracking.client_for(uri)
        start.wait()
        results[owner] = claims.acquire(client, "shared", owner, owner, "teacher T_D")

    threads = [threading.Thread(target=claim, args=(f"study-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    held = [owner for owner, (mine, _) in results.items() if mine is not None]
    assert len(results) == 4 and len(held) == 1
    holder = results[held[0]][0]
    assert all(h.run_id == holder.run_id for mine, h in results.values() if mine is None)
    assert [c.run_id for c in claims.running_claims(tracking.client_for(uri), "shared")] == [holder.run_id]


def test_a_claim_whose_run_landed_late_loses_though_its_start_time_is_earlier(client):
    # The interleaving CI hit: B took its start time first, but its run was written after A had read
    # the claims and decided. B must then yield to A, not hold the key too.
    mine, _ = claims.acquire(client, "k", "parent-a", "study-a", "teacher T_D")

    class EarlyClock:  # B's create_run, with a start time from before A's claim
        def __getattr__(self, name):
            return getattr(client, name)

        def create_run(self, *args, **kwargs):
            return client.create_run(*args, start_time=mine.start_time - 5000, **kwargs)

    theirs, holder = claims.acquire(EarlyClock(), "k", "parent-b", "study-b", "teacher T_D")

    assert theirs is None and holder is not None and holder.run_id == mine.run_id
    assert [c.run_id for c in claims.running_claims(client, "k")] == [mine.run_id]


def test_a_claimant_waits_for_a_claim_not_yet_stamped_and_yields_to_its_earlier_stamp(client, monkeypatch):
    # Another claimant has written its run but not yet its stamp: what it will stamp may come first.
    exp_id = tracking.ensure_experiment(client, claims.CLAIMS_EXPERIMENT)
    tags = {claims.CLAIM_TAG: "k", claims.OWNER_TAG: "parent-x", claims.STUDY_TAG: "study-x"}
    other = client.create_run(exp_id, tags=tags | {claims.HEARTBEAT_TAG: repr(time.time())}).info.run_id
    stamp = time.time()  # its clock, read before ours
    polled, sleep = threading.Event(), time.sleep

    def poll_again(seconds: float) -> None:  # the claimant saw the unstamped claim and looks again
        polled.set()
        sleep(seconds)

    monkeypatch.setattr(claims.time, "sleep", poll_again)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(r=claims.acquire(client, "k", "parent-a", "study-a", "T_D", stamp_poll_s=0.01))
    )
    thread.start()
    assert polled.wait(30) and thread.is_alive() and not result  # waiting for the stamp, undecided
    tracking.set_tags(client, other, {claims.ORDER_TAG: repr(stamp)})
    thread.join(30)

    mine, holder = result["r"]
    assert mine is None and holder.run_id == other and holder.order == stamp
    # A claim whose claimant died before stamping goes stale, and is then not waited for.
    client.delete_tag(other, claims.ORDER_TAG)
    tracking.set_tags(client, other, {claims.HEARTBEAT_TAG: repr(time.time() - 1000)})
    held, holder = claims.acquire(client, "k", "parent-b", "study-b", "T_D", stale_s=60)
    assert held is not None and holder is None


def test_a_stale_claim_is_gone_and_a_resumed_study_supersedes_its_own(client):
    dead, _ = claims.acquire(client, "k", "parent-a", "study-a", "teacher T_D")
    tracking.set_tags(client, dead.run_id, {claims.HEARTBEAT_TAG: repr(time.time() - 1000)})  # its study died

    mine, holder = claims.acquire(client, "k", "parent-b", "study-b", "teacher T_D", stale_s=60)
    assert holder is None and mine is not None  # the stale claim does not hold the key
    assert status(client, dead.run_id) == ("RUNNING", "held")  # left as it was: not this study's

    again, holder = claims.acquire(client, "k", "parent-b", "study-b", "teacher T_D")  # study-b resumed
    assert holder is None and again is not None
    assert status(client, mine.run_id) == ("KILLED", "superseded")


def test_held_claims_beat_while_the_block_runs_and_end_with_it(client):
    with claims.claimed(client, {"T_D": "kd"}, "parent-a", "study-a", "teacher", claims.Timing(heartbeat_s=0.05)) as (
        mine,
        theirs,
    ):
        assert mine == ["T_D"] and theirs == {}
        (claim,) = claims.running_claims(client, "kd")
        time.sleep(0.5)
        assert claims.get_claim(client, claim.run_id).heartbeat > claim.heartbeat
        with claims.claimed(client, {"T_D": "kd"}, "parent-b", "study-b", "teacher") as (mine_b, theirs_b):
            assert mine_b == [] and theirs_b["T_D"].run_id == claim.run_id
    assert status(client, claim.run_id) == ("FINISHED", "held")

    with pytest.raises(ValueError), claims.claimed(client, {"T_W": "kw"}, "parent-a", "study-a", "teacher"):
        (failed,) = claims.running_claims(client, "kw")
        raise ValueError("the training failed")
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert claims.running_claims(client, "kw") == []


def finished_teacher(client, key: str) -> str:
    exp = tracking.ensure_experiment(client, "teachers-of-a")
    run_id = client.create_run(exp, tags={tracking.TEACHER_KEY_TAG: key}).info.run_id
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_a_waiting_study_gets_the_holders_result_or_learns_that_there_is_none(client):
    held, _ = claims.acquire(client, "done", "parent-a", "study-a", "teacher T_D")
    dying, _ = claims.acquire(client, "dies", "parent-a", "study-a", "teacher T_W")
    failing, _ = claims.acquire(client, "fails", "parent-a", "study-a", "teacher T_X")

    def study_a() -> None:
        time.sleep(0.3)
        finished_teacher(client, "done")
        client.set_terminated(held.run_id, "FINISHED")
        client.set_terminated(failing.run_id, "FAILED")  # its job failed: no teacher
        # "dies" never beats again: its study was killed

    threading.Thread(target=study_a).start()
    find = lambda key: tracking.find_teacher(client, key)
    got = claims.wait_for(
        client, {"T_D": held, "T_W": dying, "T_X": failing}, find, "teacher", claims.Timing(stale_s=1.5, poll_s=0.1)
    )

    assert got["T_D"].data.tags[tracking.TEACHER_KEY_TAG] == "done"
    assert got["T_W"] is None and got["T_X"] is None


@pytest.fixture
def plan(tmp_path, client) -> Plan:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = client.create_experiment("study-b")
    parent = client.create_run(exp, tags={tracking.KIND_TAG: "study"}).info.run_id
    return Plan(load_study(QUICKSTART), tmp_path, uri, exp, parent)


def test_train_shared_waits_for_a_teacher_another_study_trains_and_never_trains_it(plan, client, monkeypatch):
    grids = []
    monkeypatch.setattr(stages, "run_grid", lambda plan, stage, resume, jobs: grids.append(jobs))
    other, _ = claims.acquire(client, "kd", "parent-a", "study-a", "teacher T_D")
    trained = {}

    def study_a() -> None:
        time.sleep(0.5)
        trained["run"] = finished_teacher(client, "kd")
        client.set_terminated(other.run_id, "FINISHED")

    threading.Thread(target=study_a).start()
    find = lambda key: tracking.find_teacher(client, key)
    out = stages.train_shared(
        plan,
        "teachers",
        {"T_D": "kd"},
        find,
        lambda names: [{"teacher": n} for n in names],
        False,
        claims.Timing(poll_s=0.1),
    )

    assert grids == []  # study-b trained nothing
    run, by = out["T_D"]
    assert run.info.run_id == trained["run"] and by == "study-a"


def test_train_shared_takes_over_when_the_other_study_dies(plan, client, monkeypatch):
    grids = []

    def run_grid(plan, stage, resume, jobs):
        grids.append(jobs)
        for job in jobs:  # this study's claim is the one live claim while it trains
            live = [c for c in claims.running_claims(client, "k" + job["teacher"]) if c.live(stale_s=1.0)]
            assert [c.owner for c in live] == [plan.parent_run_id]
            finished_teacher(client, "k" + job["teacher"])

    monkeypatch.setattr(stages, "run_grid", run_grid)
    dead, _ = claims.acquire(client, "kT_W", "parent-a", "study-a", "teacher T_W")  # then study-a is killed
    find = lambda key: tracking.find_teacher(client, key)
    jobs = lambda names: [{"teacher": n} for n in names]

    out = stages.train_shared(
        plan, "teachers", {"T_D": "kT_D", "T_W": "kT_W"}, find, jobs, False, claims.Timing(stale_s=1.0, poll_s=0.1)
    )

    # T_D was free: trained at once; T_W was study-a's until its claim went silent, then trained here.
    assert grids == [[{"teacher": "T_D"}], [{"teacher": "T_W"}]]
    assert {name: by for name, (_, by) in out.items()} == {"T_D": None, "T_W": None}
    assert claims.running_claims(client, "kT_W") == [claims.get_claim(client, dead.run_id)]  # left as it was
