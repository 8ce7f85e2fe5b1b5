"""The training loop every job shares: optimiser, LR schedule, checkpoints."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mgd_ray.config import OptimConfig, parse_job_config
from mgd_ray.distributed import DistEnv
from mgd_ray.jobs.loop import make_optimizer


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_optimizer_lr_scaled_with_world_size_and_poly_decay(name, cls):
    params = [torch.nn.Parameter(torch.zeros(3))]
    cfg = OptimConfig(optimizer=name, lr=0.01, weight_decay=1e-4, poly_power=0.9)
    opt, sched = make_optimizer(
        torch.nn.ParameterList(params), cfg, iterations=10, env=DistEnv(0, 4, torch.device("cpu"))
    )
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
    opt, _ = make_optimizer(
        torch.nn.ParameterList([p]),
        OptimConfig(optimizer="adamw", lr=0.1, weight_decay=0.0),
        5,
        DistEnv(0, 1, torch.device("cpu")),
    )
    p.grad = torch.tensor([0.5, -3.0])
    opt.step()
    # Adam's first step is lr·sign(g) (m̂/√v̂ = g/|g|), whatever the gradient's size.
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9]))


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
        ("adamw", {"lr": 0.01, "weight_decay": 1e-2}),
    ],
)
def test_fused_optimizer_follows_the_per_tensor_update(name, kwargs):
    """make_optimizer's fused kernel against torch's reference loop (foreach=False), over 20 steps."""
    cfg = OptimConfig(optimizer=name, **kwargs)
    torch.manual_seed(0)
    start = [torch.randn(7, 5), torch.randn(5)]
    fused = [torch.nn.Parameter(t.clone()) for t in start]
    plain = [torch.nn.Parameter(t.clone()) for t in start]
    opt, _ = make_optimizer(torch.nn.ParameterList(fused), cfg, iterations=20, env=DistEnv(0, 1, torch.device("cpu")))
    assert opt.defaults["fused"] is True
    ref_cls = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
    extra = {"momentum": cfg.momentum} if name == "sgd" else {}
    ref = ref_cls(plain, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False, **extra)
    for step in range(20):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(t.shape, generator=g) for t in start]
        for params, o in ((fused, opt), (plain, ref)):
            for p, gr in zip(params, grads, strict=True):
                p.grad = gr.clone()
            o.step()
    for a, b, s in zip(fused, plain, start, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
        assert (a.detach() - s).abs().max() > 0.05  # the parameters really moved


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_official_weight_decay_groups_spare_biases_and_norm_layers(optimizer):
    """furnace's group_weight: conv and linear weights decay; biases, BatchNorm and GroupNorm do not."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),  # weight decays, bias does not
        torch.nn.BatchNorm2d(4),  # neither
        torch.nn.Conv2d(4, 4, 1, bias=False),
        torch.nn.GroupNorm(2, 4),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    model.append(frozen)
    lr, wd = 0.5, 0.1
    env = DistEnv(0, 1, torch.device("cpu"))
    cfg = OptimConfig(
        optimizer=optimizer,
        lr=lr,
        weight_decay=wd,
        momentum=0.0,
        scale_lr_with_world_size=False,
        weight_decay_groups="official",
    )
    opt, _ = make_optimizer(model, cfg, iterations=10, env=env)
    decayed = {id(model[0].weight), id(model[2].weight), id(model[5].weight)}
    assert [len(g["params"]) for g in opt.param_groups] == [3, 6]  # biases of conv 0 and the linear, 2 + 2 norm
    assert {id(p) for p in opt.param_groups[0]["params"]} == decayed
    assert [g["weight_decay"] for g in opt.param_groups] == [wd, 0.0]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        # With a zero gradient only decay moves a parameter: θ(1 − lr·wd) for SGD and decoupled AdamW alike.
        factor = 1 - lr * wd if id(p) in decayed else 1.0
        torch.testing.assert_close(p.detach(), before[name] * factor)
    # One group (the default): every trainable parameter decays.
    everything = cfg.model_copy(update={"weight_decay_groups": "all"})
    opt, _ = make_optimizer(model, everything, iterations=10, env=env)
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 9


def test_last_checkpoint_keeps_model_and_history_only_and_resumes_with_nothing_to_train(
    tiny_data_cfg, tiny_schedule, tmp_path
):
    from mgd_ray.checkpoint import MODEL_FILE, STATE_FILE, load_state
    from mgd_ray.jobs.baselines import run_baseline

    cfg = parse_job_config("baseline", {"method": "supervised", "data": tiny_data_cfg, "schedule": tiny_schedule})
    reports: list[tuple[dict, Path]] = []
    last = run_baseline(cfg, lambda m, c: reports.append((m, c)), tmp_path)
    assert [m["step"] for m, _ in reports] == [2, 4]
    mid, end = (torch.load(c / STATE_FILE, weights_only=True) for _, c in reports)
    assert {"model", "optimizer", "scheduler", "rng"} <= set(mid)  # an intermediate one resumes training
    assert set(end) == {"step", "final"} and end["step"] == 4
    assert (reports[1][1] / MODEL_FILE).is_file()
    assert [h["step"] for h in load_state(reports[1][1])["history"]] == [2, 4]

    again: list[dict] = []
    out = run_baseline(cfg, lambda m, c: again.append(m), tmp_path / "again", resume=load_state(reports[1][1]))
    assert again == []  # nothing re-trained or re-reported
    assert out["step"] == 4 and out["val/mIoU"] == last["val/mIoU"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bf16_training_runs_the_networks_forward_in_bf16_and_keeps_fp32_weights(
    tiny_data_cfg, tiny_schedule, tmp_path, precision
):
    """``optim.precision: bf16``: the student's convolutions compute in bf16 while it trains, and in fp32
    when it is evaluated; its weights (what the optimiser updates and the checkpoint holds) stay fp32."""
    from mgd_ray.checkpoint import MODEL_FILE
    from mgd_ray.jobs.baselines import run_baseline

    seen: dict[bool, set[torch.dtype]] = {True: set(), False: set()}  # module.training -> conv output dtypes

    def hook(module, args, output):
        if isinstance(module, nn.Conv2d):
            seen[module.training].add(output.dtype)

    cfg = parse_job_config(
        "baseline",
        {"method": "supervised", "data": tiny_data_cfg, "schedule": tiny_schedule, "optim": {"precision": precision}},
    )
    reports: list[tuple[dict, Path]] = []
    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        metrics = run_baseline(cfg, lambda m, c: reports.append((m, c)), tmp_path)
    finally:
        handle.remove()

    trained = {torch.float32: "fp32", torch.bfloat16: "bf16"}
    assert {trained[d] for d in seen[True]} == {precision} and seen[False] == {torch.float32}
    assert math.isfinite(metrics["loss/total"]) and 0 <= metrics["val/mIoU"] <= 100
    state = torch.load(reports[-1][1] / MODEL_FILE, weights_only=True)["state_dict"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}


def test_each_evaluation_reports_where_the_steps_time_went(tiny_data_cfg, tiny_schedule, tmp_path, monkeypatch):
    """``time/data_ms`` is the batch draw's share of a step, ``time/step_ms`` the rest, on the loop's
    clock (here a fake one that only the batch draw advances, by 50 ms): all 50 ms go to the draw."""
    from types import SimpleNamespace

    from mgd_ray.jobs import loop
    from mgd_ray.jobs.baselines import run_baseline

    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    real = loop.batches

    def slow_batches(*args, **kwargs):
        for batch in real(*args, **kwargs):
            clock.now += 0.05
            yield batch

    monkeypatch.setattr(loop, "batches", slow_batches)
    cfg = parse_job_config("baseline", {"method": "supervised", "data": tiny_data_cfg, "schedule": tiny_schedule})
    reports: list[dict] = []
    run_baseline(cfg, lambda m, c: reports.append(m), tmp_path)
    assert [m["step"] for m in reports] == [2, 4]
    for m in reports:
        assert m["time/data_ms"] == pytest.approx(50.0) and m["time/step_ms"] == 0.0
        assert m["time/data_share"] == 1.0 and m["time/eval_s"] == 0.0


def test_step_times_share():
    from mgd_ray.jobs.loop import step_times

    assert step_times({"time/data_ms": 1.0, "time/step_ms": 3.0})["time/data_share"] == 0.25
    assert step_times({"time/data_ms": 0.0, "time/step_ms": 0.0})["time/data_share"] == 0.0
