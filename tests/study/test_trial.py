"""One Tune trial: its process's GC, and what a stopped or failed trial leaves."""

import gc
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mgd_ray import tracking
from mgd_ray.study import trial
from mgd_ray.study.config import load_study
from mgd_ray.study.plan import Plan, pretrain_key, pretrained_architectures

QUICKSTART = Path(__file__).parents[2] / "studies" / "quickstart.yaml"


def test_a_trial_runs_with_the_processs_earlier_objects_frozen_out_of_the_gc(monkeypatch):

    seen = {}

    def body(config, plan):
        seen["frozen"] = gc.get_freeze_count()  # objects moved to the permanent generation
        raise RuntimeError("the job failed")

    monkeypatch.setattr(trial, "_run_trial", body)
    with pytest.raises(RuntimeError, match="the job failed"):
        trial.run_trial({}, None)
    assert seen["frozen"] > 1000  # the process's modules, classes and functions at least
    assert gc.get_freeze_count() == 0  # unfrozen again, even after a failure


def test_a_stopped_or_failed_trial_leaves_no_checkpoint_folder_of_its_job(tmp_path, monkeypatch):
    """ASHA's stop reaches the trial as an exception out of the job: its own checkpoint folder (a
    full resume state) is deleted, as a retry resumes from Tune's copy and a stopped trial never does."""

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("stopped")
    parent = client.create_run(exp, tags={tracking.KIND_TAG: "study"}).info.run_id
    plan = Plan(load_study(QUICKSTART), tmp_path, uri, exp, parent)
    for model in pretrained_architectures(
        plan.study, []
    ):  # the student's corpus weights, as stage_pretrain leaves them
        plan.pretrained[pretrain_key(plan.study, model)] = tmp_path / f"{model.backbone}.pt"
    made = []

    class Stopped:
        def __init__(self, cfg, scaling, storage, name, **kwargs):
            self.local = kwargs["in_trial"]
            made.append(self.local)

        def fit(self):
            (self.local / "step_00000050").mkdir(parents=True)
            (self.local / "step_00000050" / "state.pt").write_bytes(b"resume state")
            raise KeyboardInterrupt("stopped by the scheduler")

    monkeypatch.setattr(trial, "make_trainer", Stopped)
    with pytest.raises(KeyboardInterrupt):
        trial._run_trial({"stage": "baselines", "job": {"baseline": 0, "seed": 0}}, plan)
    assert made and made[0].parent.parent == tmp_path / "baselines" and not made[0].exists()
    run = client.search_runs([exp], f"tags.`{tracking.KIND_TAG}` = 'baseline'")[0]
    assert run.info.status == "KILLED" and run.data.tags[tracking.STATE_TAG] == "interrupted"
