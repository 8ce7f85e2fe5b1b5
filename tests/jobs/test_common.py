"""The optimiser and LR schedule every job shares."""

import pytest
import torch

from mgd_ray.config import OptimConfig
from mgd_ray.distributed import DistEnv
from mgd_ray.jobs.common import make_optimizer


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_lr_scaled_with_world_size_and_poly_decay(name, cls):
    params = [torch.nn.Parameter(torch.zeros(3))]
    cfg = OptimConfig(optimizer=name, lr=0.01, weight_decay=1e-4, poly_power=0.9)
    opt, sched = make_optimizer(params, cfg, iterations=10, env=DistEnv(0, 4, torch.device("cpu")))
    assert type(opt) is cls
    assert opt.param_groups[0]["weight_decay"] == 1e-4
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    # base LR × world size (4), then lr·(1 − t/T)^0.9, as the official code's poly schedule.
    assert lrs == pytest.approx([0.04 * (1 - t / 10) ** 0.9 for t in range(10)])
    assert sched.get_last_lr()[0] == 0.0


def test_adamw_steps_against_the_gradient_by_about_lr():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt, _ = make_optimizer([p], OptimConfig(optimizer="adamw", lr=0.1, weight_decay=0.0), 5, DistEnv(0, 1, torch.device("cpu")))
    p.grad = torch.tensor([0.5, -3.0])
    opt.step()
    # Adam's first step is lr·sign(g) (m̂/√v̂ = g/|g|), whatever the gradient's size.
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9]))
