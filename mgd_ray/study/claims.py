"""Claims on shared work in MLflow, so that studies running at once train a shared teacher (or pretraining) once.

Teachers and pretrainings are keyed by what they are (``teacher_key``, ``pretrain_key``) and reused by
every later study. Two studies that start together would both miss the other's run and both train.
So a study about to train one first *claims* its key. A claim is a RUNNING run in the
``mgd_ray-claims`` experiment, tagged with the key and the claiming study's parent run. Its holder
refreshes a heartbeat tag while it trains. MLflow has no compare-and-swap, so claiming is an election:
each claimant creates its run, *then* stamps it with its clock (``ORDER_TAG``), then reads every live
claim on the key. The earliest stamp (then run id) holds the key, and the others wait for its result.
A claim seen without its stamp yet is waited for. The stamp, not the run's start time, is what makes
this sound: a claim that was not visible when a claimant read was created after that read, so its
stamp is later than the reader's own. (A start time is taken before the run is written, and a slow
write could land after another claimant had already decided, so both trained: seen in CI with four
claimants at once.) The stamps are the claimants' clocks: a skew of more than the gap between two
claims can make both train, which wastes time but corrupts nothing. A claim whose heartbeat is older
than ``stale_s`` belongs to a study that died, and counts as gone. A study's own earlier claims (a
resumed study) are ended at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient

from mgd_ray import tracking

log = logging.getLogger("mgd_ray.study")

CLAIMS_EXPERIMENT = "mgd_ray-claims"
CLAIM_TAG = "mgd_ray.claim"
OWNER_TAG = "mgd_ray.claim_owner"  # the claiming study's parent run id
STUDY_TAG = "mgd_ray.claim_study"  # its name, for the logs
HEARTBEAT_TAG = "mgd_ray.claim_heartbeat"  # the holder's time.time() at its last refresh
ORDER_TAG = "mgd_ray.claim_order"  # the claimant's time.time() once its run was written: the election's order
OUTCOME_TAG = "mgd_ray.claim_outcome"  # held | yielded | superseded


@dataclass(frozen=True)
class Timing:
    """How often a holder beats, when its silence means it died, and how often a waiting study looks."""

    heartbeat_s: float = 15.0
    stale_s: float = 180.0  # > an MLflow outage a study rides through (60 s), with its beats lost
    poll_s: float = 10.0
    stamp_poll_s: float = 0.1  # how often a claimant looks again while another claim has no stamp yet


DEFAULT_TIMING = Timing()


@dataclass(frozen=True)
class Claim:
    key: str
    run_id: str
    owner: str
    study: str
    heartbeat: float
    start_time: int
    running: bool
    order: float | None  # None between the run's creation and its stamp

    def age(self, now: float | None = None) -> float:
        """Seconds since the holder's last heartbeat."""
        return (time.time() if now is None else now) - self.heartbeat

    def live(self, stale_s: float = DEFAULT_TIMING.stale_s, now: float | None = None) -> bool:
        return self.running and self.age(now) <= stale_s


def _claim(run: Any) -> Claim:
    tags = run.data.tags
    return Claim(
        key=tags[CLAIM_TAG],
        run_id=run.info.run_id,
        owner=tags.get(OWNER_TAG, ""),
        study=tags.get(STUDY_TAG, "?"),
        heartbeat=float(tags.get(HEARTBEAT_TAG, 0.0)),
        start_time=int(run.info.start_time or 0),
        running=run.info.status == "RUNNING",
        order=float(tags[ORDER_TAG]) if ORDER_TAG in tags else None,
    )


def running_claims(client: MlflowClient, key: str) -> list[Claim]:
    """Every RUNNING claim on ``key``, in the order in which they hold it (unstamped ones last)."""
    exp = client.get_experiment_by_name(CLAIMS_EXPERIMENT)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{CLAIM_TAG}` = '{key}' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    unstamped = float("inf")
    return sorted((_claim(r) for r in runs), key=lambda c: (unstamped if c.order is None else c.order, c.run_id))


def get_claim(client: MlflowClient, run_id: str) -> Claim:
    return _claim(client.get_run(run_id))


def _end(client: MlflowClient, claim: Claim, outcome: str, status: str) -> None:
    tracking.set_tags(client, claim.run_id, {OUTCOME_TAG: outcome})
    client.set_terminated(claim.run_id, status)


def acquire(
    client: MlflowClient,
    key: str,
    owner: str,
    study: str,
    label: str,
    stale_s: float = DEFAULT_TIMING.stale_s,
    stamp_poll_s: float = DEFAULT_TIMING.stamp_poll_s,
) -> tuple[Claim | None, Claim | None]:
    """Claim ``key`` for the study whose parent run is ``owner``: (this study's claim, None) when it now
    holds the key, or (None, the other study's live claim that holds it)."""
    for old in running_claims(client, key):
        if old.owner == owner:  # this study's own, from before it was resumed
            _end(client, old, "superseded", "KILLED")
    exp_id = tracking.ensure_experiment(client, CLAIMS_EXPERIMENT)
    tags = {CLAIM_TAG: key, OWNER_TAG: owner, STUDY_TAG: study, HEARTBEAT_TAG: repr(time.time()), OUTCOME_TAG: "held"}
    run = client.create_run(exp_id, tags=tags, run_name=f"{label} for study {study}")
    tracking.set_tags(client, run.info.run_id, {ORDER_TAG: repr(time.time())})  # after the run is visible
    while True:
        live = [c for c in running_claims(client, key) if c.live(stale_s)]
        if all(c.order is not None for c in live):  # a claim still unstamped may yet come first
            break
        time.sleep(stamp_poll_s)
    mine = next((c for c in live if c.run_id == run.info.run_id), None) or get_claim(client, run.info.run_id)
    holder = live[0] if live else mine
    if holder.run_id == mine.run_id:
        return mine, None
    _end(client, mine, f"yielded to {holder.run_id}", "FINISHED")
    return None, holder


class Heartbeat(threading.Thread):
    """Refreshes the heartbeat of ``claims`` every ``every_s`` until stopped; a failed refresh (MLflow
    down) is logged and retried at the next beat, since a claim only goes stale after ``Timing.stale_s``."""

    def __init__(self, client: MlflowClient, claims: list[Claim], every_s: float = DEFAULT_TIMING.heartbeat_s):
        super().__init__(name="mgd_ray-claim-heartbeat", daemon=True)
        self.client, self.claims, self.every_s = client, claims, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            for claim in self.claims:
                try:
                    tracking.set_tags(self.client, claim.run_id, {HEARTBEAT_TAG: repr(time.time())})
                except Exception as err:  # a lost beat is retried; the study goes on
                    log.warning("could not refresh claim %s: %s", claim.run_id, err)


@contextlib.contextmanager
def claimed(
    client: MlflowClient,
    keys: Mapping[str, str],
    owner: str,
    study: str,
    what: str,
    timing: Timing = DEFAULT_TIMING,
) -> Iterator[tuple[list[str], dict[str, Claim]]]:
    """Claim each of ``keys`` (name → key, ``what`` names them: "teacher"). Yields (the names this
    study now holds, name → the live claim of the study that holds each other one). The held claims
    beat while the block runs, and end when it does: FINISHED, or FAILED if it raised."""
    mine: dict[str, Claim] = {}
    theirs: dict[str, Claim] = {}
    status, beat = "FAILED", None
    try:
        for name, key in keys.items():
            held, holder = acquire(client, key, owner, study, f"{what} {name}", timing.stale_s, timing.stamp_poll_s)
            if held is not None:
                mine[name] = held
            else:
                assert holder is not None
                theirs[name] = holder
                log.info(
                    "%s %s: study %r is training it (claim %s); waiting for it", what, name, holder.study, holder.run_id
                )
        beat = Heartbeat(client, list(mine.values()), timing.heartbeat_s)
        beat.start()
        yield list(mine), theirs
        status = "FINISHED"
    finally:
        if beat is not None:
            beat.stopped.set()
            beat.join()
        for claim in mine.values():
            try:
                client.set_terminated(claim.run_id, status)
            except Exception as err:  # unreleased, it goes stale and others take over
                log.warning("could not release claim %s: %s", claim.run_id, err)


def wait_for(
    client: MlflowClient,
    claims: Mapping[str, Claim],
    find: Callable[[str], Any | None],
    what: str,
    timing: Timing = DEFAULT_TIMING,
) -> dict[str, Any | None]:
    """Wait until each other study's claim (name → claim) has a result: name → the finished run that
    ``find(key)`` returns, or None where its holder ended or went stale without one (train it then).

    Liveness is read before the result, and a holder releases its claim only after its run has
    finished, so a claim seen ended with no result means there is none. MLflow errors while waiting
    (an outage) are logged and waited out, up to ``timing.stale_s`` in a row.
    """
    out: dict[str, Any | None] = {}
    failing_since: float | None = None
    last_log = time.monotonic()
    while len(out) < len(claims):
        for name, claim in claims.items():
            if name in out:
                continue
            try:
                now_claim = get_claim(client, claim.run_id)
                run = find(claim.key)
            except Exception as err:  # e.g. the tracking server restarting
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > timing.stale_s:
                    raise
                log.warning("waiting for %s %s: MLflow did not answer (%s); retrying", what, name, err)
                continue
            failing_since = None
            if run is not None:
                out[name] = run
                log.info("%s %s: trained by study %r, run %s", what, name, claim.study, run.info.run_id)
            elif not now_claim.live(timing.stale_s):
                out[name] = None
                log.warning(
                    "%s %s: study %r stopped training it (claim %s %s); this study trains it",
                    what,
                    name,
                    claim.study,
                    claim.run_id,
                    "ended" if not now_claim.running else f"silent for {now_claim.age():.0f} s",
                )
            elif time.monotonic() - last_log > 60:
                last_log = time.monotonic()
                log.info(
                    "%s %s: still waiting for study %r (heartbeat %.0f s ago)", what, name, claim.study, now_claim.age()
                )
        if len(out) < len(claims):
            time.sleep(timing.poll_s)
    return out
