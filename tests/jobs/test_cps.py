"""CPS pretraining: the ramp-up of the cross-supervision weight."""

import math

import pytest
import torch

from mgd_ray.config import parse_job_config
from mgd_ray.jobs import cps
from mgd_ray.jobs.cps import rampup


def test_rampup_by_hand():
    # exp(−5(1 − t)²) with t = step / (0.5 · 100): 0.5 → t = 0.01, 25 → t = 0.5, from 50 on the full weight.
    assert rampup(1, 100, 0.5) == pytest.approx(math.exp(-5 * 0.98**2))
    assert rampup(25, 100, 0.5) == pytest.approx(math.exp(-1.25))
    assert rampup(50, 100, 0.5) == 1.0
    assert rampup(99, 100, 0.5) == 1.0
    assert rampup(1, 100, 0.0) == 1.0  # the paper's constant weight


def test_teacher_job_passes_the_ramped_weight_to_every_step(tiny_data_cfg, tiny_schedule, tmp_path, monkeypatch):
    seen: list[float] = []
    real = cps.cps_terms

    def spy(pair, b, cps_weight, ohem=False, batch_reduction=None):
        seen.append(cps_weight)
        return real(pair, b, cps_weight, ohem, batch_reduction)

    monkeypatch.setattr(cps, "cps_terms", spy)
    cfg = parse_job_config(
        "teacher",
        {
            "data": tiny_data_cfg,
            "model": {"backbone": "mobilenet_v2"},
            "cps_weight": 2.0,
            "cps_rampup": 0.5,
            "schedule": {**tiny_schedule, "iterations": 4},
        },
    )
    cps.run_teacher(cfg, lambda m, c: None, tmp_path)
    assert seen == pytest.approx([2.0 * math.exp(-5 * 0.5**2), 2.0, 2.0, 2.0])  # t = 1/2, then capped at 1
    assert torch.isfinite(torch.tensor(seen)).all()
