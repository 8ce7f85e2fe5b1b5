"""Report helpers that need only an MLflow store (no Ray)."""

from types import SimpleNamespace

from mlflow.entities import Metric

from mgd_ray import tracking
from mgd_ray.report import finalize_stopped


def test_stopped_runs_keep_their_real_end_time(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    exp = tracking.ensure_experiment(client, "s")
    parent, _ = tracking.get_or_create_run(client, exp, "study/s", "study s", {tracking.KIND_TAG: "study"})

    def child(key: str, state: str) -> str:
        run_id, _ = tracking.get_or_create_run(client, exp, key, key, {tracking.KIND_TAG: "trial"}, parent)
        tracking.set_tags(client, run_id, {tracking.STATE_TAG: state})
        return run_id

    # Killed mid-trial before it could close its run: its last metric is at t = 7000 ms.
    killed = child("killed", "running")
    client.log_batch(killed, metrics=[Metric("val/mIoU", 0.2, 5000, 1), Metric("val/mIoU", 0.3, 7000, 2), Metric("loss/total", 1.0, 6500, 2)])
    # Interrupted: it terminated itself at t = 9000 ms.
    stopped = child("stopped", "interrupted")
    client.set_terminated(stopped, "KILLED", end_time=9000)
    done = child("done", "finished")
    client.set_terminated(done, "FINISHED", end_time=12000)

    finalize_stopped(SimpleNamespace(tracking_uri=uri, experiment_id=exp, parent_run_id=parent))
    k, s, d = (client.get_run(r) for r in (killed, stopped, done))
    assert k.data.tags[tracking.STATE_TAG] == "stopped_early" and k.info.status == "KILLED" and k.info.end_time == 7000
    assert s.data.tags[tracking.STATE_TAG] == "stopped_early" and s.info.end_time == 9000
    assert d.data.tags[tracking.STATE_TAG] == "finished" and d.info.end_time == 12000
