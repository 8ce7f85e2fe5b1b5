"""Ray Train jobs on a local Ray: DDP equivalence, fault-tolerant resume, every job kind."""

import math
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from mgd_ray import tracking, train
from mgd_ray.config import absolute_paths, parse_job_config
from mgd_ray.data.datasets import SegmentationDataset
from mgd_ray.data.stream import with_manifest
from mgd_ray.distributed import bf16_units
from mgd_ray.train import job_history, run_job, train_loop_per_worker

pytestmark = pytest.mark.slow  # a local Ray cluster and Ray Train worker groups


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def scaling(n: int) -> ScalingConfig:
    return ScalingConfig(num_workers=n, use_gpu=False, resources_per_worker={"CPU": 1})


def float64_loop(payload: dict) -> dict:
    """The job's ``train_loop_per_worker`` in float64 (images cast as they are loaded).

    Float32 cannot show that two workers optimise the same objective as one: its rounding
    (different for a batch of 2 than for two batches of 1) is amplified by the tiny nets' ReLU/max-pool
    kinks and by BatchNorm over 1×1 maps, so even two float32 one-worker runs differing only by
    1e-7 in their initial weights are 1e-3–1e-1 apart by step 3. In float64 the curves agree to ~1e-10.
    """
    torch.set_default_dtype(torch.float64)
    load = SegmentationDataset.__getitem__

    def getitem(self, index):
        item = load(self, index)
        return item | {"image": item["image"].double()}

    SegmentationDataset.__getitem__ = getitem
    return train_loop_per_worker(payload)


# Ray workers cannot import this test module: ship ``float64_loop`` by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def run_float64(cfg, workers: int, storage: Path, name: str) -> Result:
    cfg = with_manifest(absolute_paths(cfg, Path.cwd()))
    trainer = TorchTrainer(
        float64_loop,
        train_loop_config={"kind": cfg.kind, "config": cfg.model_dump(mode="json")},
        scaling_config=scaling(workers),
        # One restart from the last checkpoint, as a study's jobs have: on a loaded machine Ray Train
        # 2.60's PlacementGroupCleaner can take an empty State API answer for a dead controller and
        # remove a live run's placement group (seen with two suites at once; README, Reliability).
        # A restart resumes exactly (test_killed_job_resumes_from_its_checkpoint), so the curves still compare.
        run_config=RunConfig(name=name, storage_path=str(storage), failure_config=FailureConfig(max_failures=1)),
    )
    return trainer.fit()


DDP_JOBS = {
    # MGD with every term, the official per-batch "sum" image loss and two teachers.
    "student": lambda ckpt: {
        "teachers": {
            "T_D": {"model": {"backbone": "resnet18"}, "checkpoint": str(ckpt)},
            "T_W": {"model": {"backbone": "resnet18"}, "checkpoint": str(ckpt)},
        },
    },
}
# CPS (the teacher job) and Mean Teacher are compared with one worker in tests/test_distributed.py,
# on plain gloo process groups; here the whole Ray Train path of the richest job.


@pytest.mark.parametrize("kind", list(DDP_JOBS))
def test_two_workers_match_one_worker_with_same_global_batch(
    local_ray, tiny_data_cfg, teacher_ckpt, tiny_schedule, tmp_path, kind
):
    steps = 4

    def curve(workers: int):
        per_worker = 4 // workers
        cfg = parse_job_config(
            kind,
            {
                # Scale 0.75 pads 32-pixel crops with ignored pixels, so ranks count different
                # numbers of labeled pixels: the CE must be normalised over the global batch.
                "data": tiny_data_cfg | {"scales": [0.75, 1.0]},
                "optim": {"scale_lr_with_world_size": False},
                "schedule": tiny_schedule
                | {"iterations": steps, "eval_every": 1, "batch_labeled": per_worker, "batch_unlabeled": per_worker},
                "output": str(tmp_path / f"out{workers}"),
                **DDP_JOBS[kind](teacher_ckpt),
            },
        )
        result = run_float64(cfg, workers, tmp_path / "ray", f"ddp{workers}")
        return pd.DataFrame(job_history(result))

    one, two = curve(1), curve(2)
    assert one["step"].tolist() == two["step"].tolist() == list(range(1, steps + 1))
    terms = [c for c in one.columns if c.startswith("loss/")]
    assert len(terms) > 2
    for term in terms:  # every loss term at every step, not just the first
        assert two[term].tolist() == pytest.approx(one[term].tolist(), rel=1e-8, abs=1e-10), term
    # DDP keeps the two replicas' weights identical at every step.
    assert two["replica_spread"].tolist() == [0.0] * steps


class FailOnce:
    """A test-side ``log_metrics`` wrapper: rank 0 raises once (a marker file remembers) right after
    it logged the evaluation at ``step`` to MLflow and before Ray has its checkpoint, as a worker
    killed between the two: the restarted job evaluates that step again."""

    def __init__(self, log, step: int, marker: Path):
        self.log, self.step, self.marker = log, step, marker

    def __call__(self, client, run_id: str, metrics: dict, step: int) -> None:
        self.log(client, run_id, metrics, step)
        if step >= self.step and not self.marker.exists():
            self.marker.touch()
            raise RuntimeError(f"injected failure after logging step {step}")


def failing_loop(payload: dict) -> dict:
    """``train_loop_per_worker`` whose MLflow logging fails once (``payload["fault"]``: step, marker)."""
    step, marker = payload.pop("fault")
    train.log_metrics = FailOnce(train.log_metrics, step, Path(marker))
    return train_loop_per_worker(payload)


def test_killed_job_resumes_from_its_checkpoint(local_ray, tiny_data_cfg, tiny_schedule, tmp_path):
    cfg = parse_job_config(
        "baseline",
        {
            "method": "supervised",
            "data": tiny_data_cfg,
            "optim": {"lr": 0.05},
            "schedule": {**tiny_schedule, "iterations": 6, "eval_every": 2},
            "output": str(tmp_path / "out"),
        },
    )
    cfg = with_manifest(absolute_paths(cfg, Path.cwd()))
    (tmp_path / "ray").mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.client_for(uri)
    run_id = client.create_run(tracking.ensure_experiment(client, "resume")).info.run_id
    trainer = TorchTrainer(
        failing_loop,
        train_loop_config={
            "kind": cfg.kind,
            "config": cfg.model_dump(mode="json"),
            "fault": (4, str(tmp_path / "ray" / "resume.fault")),
            "mlflow": {"uri": uri, "run_id": run_id},
        },
        scaling_config=scaling(1),
        run_config=RunConfig(
            name="resume",
            storage_path=str(tmp_path / "ray"),
            failure_config=FailureConfig(max_failures=1),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    history = job_history(result)
    assert (tmp_path / "ray" / "resume.fault").exists()  # the failure really happened
    assert [m["step"] for m in history] == [2, 4, 6]  # no duplicated or missing steps
    losses = [m["loss/total"] for m in history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert result.metrics["step"] == 6
    # MLflow had step 4 before the failure; the restarted job evaluated it again and did not log it
    # twice: one unbroken history, with the values the checkpointed history holds.
    logged = tracking.metric_history(client, run_id, "val/mIoU")
    assert [step for step, _ in logged] == [2, 4, 6]
    assert dict(logged) == {m["step"]: m["val/mIoU"] for m in history}
    # The run says what arithmetic its steps used, and what computed it.
    tags = client.get_run(run_id).data.tags
    assert tags["mgd_ray.precision"] == "fp32" and tags["mgd_ray.device"] == "cpu"
    assert tags["mgd_ray.bf16_units"] == bf16_units(torch.device("cpu"))


# Every baseline method runs in-process in tests/jobs/test_baselines.py; here the Ray Train worker
# group runs the job kinds with something of their own to ship: a CPS pair, and a frozen teacher's
# checkpoint loaded on the worker (the student job: the DDP test below).
@pytest.mark.parametrize(
    "kind,extra",
    [
        ("teacher", {"model": {"backbone": "resnet18"}}),
        ("baseline", {"method": "kd", "teacher": "T"}),
    ],
)
def test_every_job_kind_runs_and_reports_miou(
    local_ray, tiny_data_cfg, teacher_ckpt, tiny_schedule, tmp_path, kind, extra
):
    if extra.get("teacher") == "T":
        extra = extra | {"teacher": {"model": {"backbone": "resnet18"}, "checkpoint": str(teacher_ckpt)}}
    cfg = parse_job_config(
        kind,
        {
            "data": tiny_data_cfg,
            "schedule": {**tiny_schedule, "iterations": 2},
            "output": str(tmp_path / "out"),
            **extra,
        },
    )
    out = run_job(cfg, scaling(1), storage_path=tmp_path / "ray", name="job")
    assert out.metrics["step"] == 2
    assert 0.0 <= out.metrics["val/mIoU"] <= 1.0
    assert out.model_path.is_file()


def test_in_trial_job_killed_after_its_last_step_still_exports_its_model(
    local_ray, tiny_data_cfg, tiny_schedule, tmp_path
):
    """A trial killed after its job's last step (while logging artifacts) restarts from Tune's last
    checkpoint with nothing left to train: its model must still come from that checkpoint."""
    from mgd_ray.train import copy_exported_model, latest_checkpoint, make_trainer

    cfg = parse_job_config(
        "baseline",
        {
            "method": "supervised",
            "data": tiny_data_cfg,
            "schedule": {**tiny_schedule, "iterations": 2, "eval_every": 2},
            "output": str(tmp_path / "out"),
        },
    )
    cfg = with_manifest(cfg)
    local = cfg.output / "checkpoints"
    marker = tmp_path / "killed"

    def trial(config: dict) -> None:
        trainer = make_trainer(cfg, scaling(1), tmp_path / "ray_train", "job", in_trial=local)
        result = trainer.fit()
        model = copy_exported_model(result, cfg.output, latest_checkpoint(local))
        shutil.rmtree(local)  # as run_trial does before logging the trial's artifacts
        if not marker.exists():  # killed here once, on its first attempt
            marker.touch()
            raise RuntimeError("killed while logging artifacts")
        (tmp_path / "exported").write_text(str(model))

    tuner = ray.tune.Tuner(
        trial,
        run_config=ray.tune.RunConfig(
            storage_path=str(tmp_path / "tune"), name="t", failure_config=ray.tune.FailureConfig(max_failures=1)
        ),
    )
    results = tuner.fit()
    assert marker.exists() and not results.errors
    # Trained once, not again: one report in all (Tune's progress files may be rewritten on the
    # retry, so the count comes from the trial's last result rather than its metrics dataframe).
    assert results[0].metrics["training_iteration"] == 1 and results[0].metrics["step"] == 2
    assert Path((tmp_path / "exported").read_text()).is_file()


def test_a_pretraining_runs_as_a_ray_train_job_and_exports_its_backbone(local_ray, tmp_path):
    """`mgd-ray train pretrain`: two DDP workers over gloo, no dataset to check, backbone.pt exported."""
    cfg = parse_job_config(
        "pretrain",
        {
            "corpus": {"num_images": 40, "num_val": 8},
            "model": {"backbone": "mobilenet_v2"},
            "schedule": {"iterations": 2, "batch": 8, "eval_every": 1},
            "cache": str(tmp_path / "corpus"),
            "output": str(tmp_path / "out"),
        },
    )
    out = run_job(cfg, scaling(2), storage_path=tmp_path / "ray", name="pretrain")
    assert [h["step"] for h in out.history] == [1, 2]
    assert out.model_path == tmp_path / "out" / "backbone.pt"
    record = torch.load(out.model_path, weights_only=True)
    assert record["format"] == "mgd_ray.backbone/1" and record["metrics"]["step"] == 2
    assert 0.0 <= out.metrics["pretrain/label_accuracy"] <= 1.0
