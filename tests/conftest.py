"""Shared fixtures: a tiny built-in dataset and tiny job configurations (CPU, seconds per job)."""

from pathlib import Path

import pytest
import torch

from mgd_ray.checkpoint import segmenter_record
from mgd_ray.config import parse_job_config
from mgd_ray.data.stream import Batch, JobData, load_job_data
from mgd_ray.models.deeplab import build_segmenter

TINY_DATA = {"builtin": {"num_train": 16, "num_val": 4, "size": 32}, "crop_size": 32, "scales": [1.0]}
TINY_SCHEDULE = {"iterations": 4, "eval_every": 2, "batch_labeled": 2, "batch_unlabeled": 2, "eval_batch": 4}


@pytest.fixture(scope="session")
def tiny_schedule() -> dict:
    return dict(TINY_SCHEDULE)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("builtin")


@pytest.fixture(scope="session")
def tiny_data_cfg(tiny_root) -> dict:
    return {**TINY_DATA, "root": str(tiny_root), "partition": "1/4"}


@pytest.fixture(scope="session")
def tiny_job_data(tiny_data_cfg) -> JobData:
    return load_job_data(parse_job_config("baseline", {"data": tiny_data_cfg}).data)


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory, tiny_job_data) -> Path:
    """An (untrained, seeded) resnet18 segmenter saved as a teacher checkpoint."""
    cfg = parse_job_config("baseline", {}).student
    torch.manual_seed(123)
    model = build_segmenter("resnet18", tiny_job_data.num_classes)
    path = tmp_path_factory.mktemp("teacher") / "model.pt"
    torch.save(segmenter_record(model, cfg, tiny_job_data, 32, "teacher"), path)
    return path


def _make_batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(2, 1, 32, 32)
    m[:, :, 8:24, 4:20] = 1
    return Batch(
        x_l=torch.randn(2, 3, 32, 32, generator=g),
        y=torch.randint(0, 6, (2, 32, 32), generator=g),
        u0=torch.randn(2, 3, 32, 32, generator=g),
        u1=torch.randn(2, 3, 32, 32, generator=g),
        m=m,
    )


@pytest.fixture(scope="session")
def make_batch():
    """``make_batch(seed)``: a fixed step of two 32-px images, 6 classes, and a box CutMix mask."""
    return _make_batch


@pytest.fixture(scope="session")
def student_cfg(teacher_ckpt):
    """``student_cfg(**losses)``: a distillation job with two resnet18 teachers (the ``teacher_ckpt`` file)."""

    def make(**losses_cfg):
        ref = {"model": {"backbone": "resnet18"}, "checkpoint": str(teacher_ckpt)}
        return parse_job_config("student", {"teachers": {"T_D": ref, "T_W": ref}, "losses": losses_cfg})

    return make
