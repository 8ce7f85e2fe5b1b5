"""Shared fixtures: a tiny built-in dataset and tiny job configurations (CPU, seconds per job)."""

from pathlib import Path

import pytest
import torch

from mgd_ray.config import parse_job_config
from mgd_ray.jobs.common import JobData, load_job_data, segmenter_record
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
