"""Two gloo processes against one: global BatchNorm, global-batch losses, whole jobs (float64).

Each check spawns a 2-rank process group (no Ray) and compares with the same computation on the
concatenated batch in this process. Float64, so agreement is exact up to summation order.
"""

import socket
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mgd_ray import losses
from mgd_ray.checkpoint import MODEL_FILE, read_segmenter
from mgd_ray.config import parse_job_config
from mgd_ray.data.datasets import IGNORE_INDEX, SegmentationDataset
from mgd_ray.data.stream import batches, load_job_data
from mgd_ray.distributed import DistEnv, GlobalBatchNorm2d, bf16_units, dist_env, global_batch, unwrap, wrap_model
from mgd_ray.jobs.loop import NORM_LAYERS
from mgd_ray.models.deeplab import build_segmenter
from mgd_ray.train import JOBS

pytestmark = pytest.mark.slow  # gloo process groups

SIZES = (1, 3)  # uneven per-rank batches: the global statistics must weigh ranks by their counts


def spawn(fn, out: Path, *args) -> list:
    """Run ``fn(rank, *args)`` on 2 gloo ranks; returns each rank's result (saved with torch.save)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, fn, out, args), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _rank_main(rank: int, port: int, fn, out: Path, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.save(fn(rank, *args), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def bn_inputs(spatial: int, dtype=torch.float64, offset: float = 0.0, scale: float = 1.0):
    g = torch.Generator().manual_seed(0)
    x = offset + scale * torch.randn(sum(SIZES), 4, spatial, spatial, generator=g, dtype=torch.float64)
    upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x.to(dtype), upstream.to(dtype)


def bn_rank(rank: int, spatial: int, dtype, offset: float, scale: float) -> dict:
    x, upstream = bn_inputs(spatial, dtype, offset, scale)
    part = slice(sum(SIZES[:rank]), sum(SIZES[: rank + 1]))
    bn = GlobalBatchNorm2d(4, momentum=None, dtype=dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    x_r = x[part].clone().requires_grad_(True)
    for _ in range(2):  # two updates of the running statistics
        y = bn(x_r)
    (y * upstream[part]).sum().backward()  # the global loss is the sum of the ranks' losses
    return {"y": y.detach(), "dx": x_r.grad, "dw": bn.weight.grad, "db": bn.bias.grad, "state": bn.state_dict()}


@pytest.mark.parametrize("spatial", [3, 1], ids=["map", "pooled"])
def test_global_batchnorm_is_batchnorm_over_the_global_batch(tmp_path, spatial):
    parts = spawn(bn_rank, tmp_path, spatial, torch.float64, 0.0, 1.0)
    x, upstream = bn_inputs(spatial)
    bn = nn.BatchNorm2d(4, momentum=None, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    x.requires_grad_(True)
    for _ in range(2):
        y = bn(x)
    (y * upstream).sum().backward()
    close = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), **close)
    torch.testing.assert_close(torch.cat([p["dx"] for p in parts]), x.grad, **close)
    torch.testing.assert_close(parts[0]["dw"] + parts[1]["dw"], bn.weight.grad, **close)
    torch.testing.assert_close(parts[0]["db"] + parts[1]["db"], bn.bias.grad, **close)
    for p in parts:  # running mean, unbiased running variance over the global count, batches tracked
        for k, v in bn.state_dict().items():
            torch.testing.assert_close(p["state"][k], v, **close)


def test_global_batchnorm_float32_statistics_do_not_cancel(tmp_path):
    # A nearly constant channel (mean 100, std 1e-3), like a stride-16 map of a tiny image: the
    # shortcut E[x²] − E[x]² loses every digit of the variance in float32 (≈1e-3 instead of 1e-6).
    parts = spawn(bn_rank, tmp_path, 3, torch.float32, 100.0, 1e-3)
    x, _ = bn_inputs(3, torch.float32, 100.0, 1e-3)
    bn = nn.BatchNorm2d(4, momentum=None)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        y = bn(x)
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y, rtol=1e-3, atol=1e-3)


def loss_inputs():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (4, 5, 5), generator=g)
    target[:2, :, :4] = 255  # rank 0's images have far fewer labeled pixels than rank 1's
    teacher = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    return logits, target, teacher


LOSSES = {
    "supervised": lambda s, y, t, reduction: losses.supervised_loss(s, y, batch_reduction=reduction),
    "ohem": lambda s, y, t, reduction: losses.ohem_cross_entropy(s, y, min_kept=5, batch_reduction=reduction),
    "pixel": lambda s, y, t, reduction: losses.pixel_consistency_loss(s, y, batch_reduction=reduction),
    "image_sum": lambda s, y, t, reduction: losses.image_level_loss(s, t, "sum", batch_reduction=reduction),
}


def loss_rank(rank: int) -> dict:
    logits, target, teacher = loss_inputs()
    part = slice(2 * rank, 2 * rank + 2)
    reduction = global_batch(DistEnv(rank, 2, torch.device("cpu")))
    out = {}
    for name, fn in LOSSES.items():
        s = logits[part].clone().requires_grad_(True)
        loss = fn(s, target[part], teacher[part], reduction)
        loss.backward()
        out[name] = (loss.detach(), s.grad)
    return out


def test_losses_over_the_global_batch(tmp_path):
    """Mean over ranks of the losses (what is reported) and the DDP-averaged gradient equal the
    loss and gradient of one process holding the whole batch."""
    parts = spawn(loss_rank, tmp_path)
    logits, target, teacher = loss_inputs()
    for name, fn in LOSSES.items():
        if name == "ohem":  # mined per rank (min_kept per rank, as the official code per GPU)
            continue
        s = logits.clone().requires_grad_(True)
        loss = fn(s, target, teacher, None)
        loss.backward()
        torch.testing.assert_close((parts[0][name][0] + parts[1][name][0]) / 2, loss.detach(), msg=name)
        torch.testing.assert_close(torch.cat([p[name][1] for p in parts]) / 2, s.grad, msg=name)
    # Per-rank means would weigh rank 0's few labeled pixels like rank 1's many.
    per_rank = sum(F.cross_entropy(logits[r : r + 2], target[r : r + 2], ignore_index=255) for r in (0, 2)) / 2
    assert abs(per_rank - losses.supervised_loss(logits, target)) > 1e-2
    # OHEM: the mean runs over the kept pixels of both ranks.
    kept = [
        losses.ohem_cross_entropy(logits[r : r + 2], target[r : r + 2], min_kept=5, batch_reduction=_Count())
        for r in (0, 2)
    ]
    total, count = zip(*kept, strict=True)
    expected = sum(total) / sum(count)
    torch.testing.assert_close((parts[0]["ohem"][0] + parts[1]["ohem"][0]) / 2, expected)


class _Count:
    """A reduction that returns (sum, count) to inspect what a loss reduces."""

    def mean(self, total, count):
        return total.detach(), count

    def sum(self, total):
        return total


# ---------------------------------------------------------------------------- whole jobs
@contextmanager
def float64():
    """Default dtype float64, and images cast to it as they are loaded."""
    dtype, load = torch.get_default_dtype(), SegmentationDataset.__getitem__
    torch.set_default_dtype(torch.float64)

    def getitem(self, index):
        item = load(self, index)
        return item | {"image": item["image"].double()}

    SegmentationDataset.__getitem__ = getitem
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        SegmentationDataset.__getitem__ = load


def float64_job(kind: str, raw: dict, weights: bool = False) -> list[dict] | dict[str, torch.Tensor] | None:
    """One job in float64 on this process or rank; its reports, or with ``weights`` its exported
    weights (None on rank 1, which exports nothing)."""
    reports: list[dict] = []
    cfg = parse_job_config(kind, raw)
    with float64(), tempfile.TemporaryDirectory() as d:
        JOBS[kind](cfg, lambda m, _: reports.append(m), Path(d), None)
        if weights:
            exported = Path(d) / f"step_{cfg.schedule.iterations:08d}" / MODEL_FILE
            return read_segmenter(exported)[1] if exported.is_file() else None
    return reports


def job_ranks(rank: int, jobs: dict) -> dict:
    return {name: float64_job(kind, raw) for name, (kind, raw) in jobs.items()}


def test_cps_and_baselines_match_one_worker(tmp_path, tiny_data_cfg, tiny_job_data, tiny_schedule, teacher_ckpt):
    """CPS (teacher job), Mean Teacher and MGD with train-mode teachers (the official code's, whose
    BatchNorm then runs over the global batch, as its SyncBatchNorm): 2 workers × 2 images = 1 worker
    × 4, step by step."""
    steps = 3

    def raw(workers: int, extra: dict) -> dict:
        per_worker = 4 // workers
        return {
            "data": tiny_data_cfg
            | {"scales": [0.75, 1.0], "manifest": str(tiny_job_data.manifest)},  # padding: ignored pixels
            "optim": {"scale_lr_with_world_size": False},
            "schedule": tiny_schedule
            | {"iterations": steps, "eval_every": 1, "batch_labeled": per_worker, "batch_unlabeled": per_worker},
            **extra,
        }

    jobs = {
        "cps": ("teacher", {"model": {"backbone": "resnet18"}}),
        "mean_teacher": ("baseline", {"method": "mean_teacher"}),
        "mgd_train_mode_teachers": (
            "student",
            {
                "teachers": {
                    role: {"model": {"backbone": "resnet18"}, "checkpoint": str(teacher_ckpt)}
                    for role in ("T_D", "T_W")
                },
                "teacher_mode": "train",
                "losses": {"pool_size": 2},
            },
        ),
    }
    two = spawn(job_ranks, tmp_path, {n: (k, raw(2, e)) for n, (k, e) in jobs.items()})
    for name, (kind, extra) in jobs.items():
        one = float64_job(kind, raw(1, extra))
        assert [m["step"] for m in one] == [m["step"] for m in two[0][name]] == list(range(1, steps + 1))
        for m1, m2 in zip(one, two[0][name], strict=True):
            assert {k: v for k, v in m2.items() if k.startswith("loss/")} == pytest.approx(
                {k: v for k, v in m1.items() if k.startswith("loss/")}, rel=1e-8, abs=1e-10
            ), (name, m1["step"])
            assert m2["replica_spread"] == 0.0
        # Both ranks report the same reduced metrics, NaN included (the IoU of a class absent from
        # the tiny val split and never predicted is NaN on every rank, and NaN != NaN).
        for r0, r1 in zip(two[0][name], two[1][name], strict=True):
            assert r0 == pytest.approx(r1, rel=0, abs=0, nan_ok=True)


# ----------------------------------------------------------------- the official step rule
STEPS, LR, MOMENTUM, DECAY = 3, 0.05, 0.9, 0.01


def step_rule_raw(data_cfg: dict, manifest: str, schedule: dict, rule: str) -> dict:
    """Sup-only, SGD as the paper studies configure it, 2 labeled images per worker, 3 steps."""
    return {
        "method": "supervised",
        "data": data_cfg | {"scales": [0.75, 1.0], "manifest": manifest},  # padding: uneven ignored pixels
        "optim": {
            "optimizer": "sgd",
            "lr": LR,
            "momentum": MOMENTUM,
            "weight_decay": DECAY,
            "weight_decay_groups": "official",
            "step_rule": rule,
        },
        "schedule": schedule | {"iterations": STEPS, "eval_every": STEPS, "batch_labeled": 2, "batch_unlabeled": 2},
    }


def official_update(raw: dict) -> dict[str, torch.Tensor]:
    """The authors' step, written from their train.py, on this rank's batches.

    Per rank: ``loss = CE(student(x), y)`` over its own batch, then their ``dist.all_reduce(loss);
    loss = loss / W``, run as they run it: autograd does not see the all-reduce (it warns that the op
    has no autograd kernel), so each rank differentiates its own loss / W; DDP averages the ranks'
    gradients; SGD (momentum, lr = base lr × W, poly decay) adds weight decay at the full lr to the
    conv and linear weights only (furnace's group_weight).
    """
    cfg = parse_job_config("baseline", raw)
    env = dist_env()
    torch.manual_seed(cfg.schedule.seed)  # the job's initialisation, in its order
    data = load_job_data(cfg.data)
    model = wrap_model(build_segmenter(cfg.student, data.num_classes), env)
    decayed = {
        id(p)
        for m in model.modules()
        for name, p in m.named_parameters(recurse=False)
        if name != "bias" and not isinstance(m, NORM_LAYERS)
    }
    base_lr, momentum = LR * env.world_size, {}
    stream = batches(data, cfg.schedule, 0, env, 0, False)
    for t in range(STEPS):
        b = next(stream)
        loss = F.cross_entropy(model(b.x_l).logits, b.y.long(), ignore_index=IGNORE_INDEX)
        model.zero_grad(set_to_none=True)
        if env.world_size > 1:  # train.py: `if engine.distributed: dist.all_reduce(loss); loss = loss / W`
            with warnings.catch_warnings():  # "c10d::allreduce_: an autograd kernel was not registered"
                warnings.simplefilter("ignore")
                dist.all_reduce(loss, dist.ReduceOp.SUM)
            loss = loss / env.world_size
        loss.backward()
        lr = base_lr * (1 - t / STEPS) ** 0.9
        with torch.no_grad():
            for p in model.parameters():
                d = p.grad + (DECAY * p if id(p) in decayed else 0)
                buf = momentum[id(p)] = d if t == 0 else MOMENTUM * momentum[id(p)] + d
                p -= lr * buf
    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}


def step_rule_rank(rank: int, raws: dict) -> dict:
    with float64():
        reference = official_update(raws["official"])
    return {"reference": reference} | {rule: float64_job("baseline", raw, weights=True) for rule, raw in raws.items()}


def test_official_step_rule_reproduces_the_authors_update(tmp_path, tiny_data_cfg, tiny_job_data, tiny_schedule):
    """W = 2: mgd_ray's ``step_rule: official`` applies the authors' update, weight for weight, and
    the global-batch rule does not (it steps W× further). W = 1: both rules are SGD at the configured lr."""
    raws = {
        rule: step_rule_raw(tiny_data_cfg, str(tiny_job_data.manifest), tiny_schedule, rule)
        for rule in ("official", "global_batch")
    }
    close = {"rtol": 1e-9, "atol": 1e-12}
    for ranks in (spawn(step_rule_rank, tmp_path, raws), [step_rule_rank(0, raws)]):
        part = ranks[0]  # rank 0 exports; the job checks that the replicas agree (replica_spread)
        reference, official, plain = part["reference"], part["official"], part["global_batch"]
        assert official.keys() == reference.keys()
        for k, v in reference.items():
            torch.testing.assert_close(official[k], v, **close, msg=k)
        moved = max((plain[k] - official[k]).abs().max().item() for k in reference if reference[k].is_floating_point())
        if len(ranks) == 2:
            assert moved > 1e-4  # the two rules differ with several workers ...
            for k, v in ranks[1]["reference"].items():  # ... and the reference's replicas agree
                torch.testing.assert_close(v, reference[k], rtol=0, atol=0)
        else:
            assert moved < 1e-12  # ... and are the same on one


@pytest.mark.parametrize(
    "amx,avx512_bf16,expected",
    [(True, True, "amx"), (False, True, "avx512_bf16"), (False, False, "none")],
)
def test_bf16_units_on_cpu_follow_torch_cpu_probes(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert bf16_units(torch.device("cpu")) == expected


@pytest.mark.parametrize("capability,expected", [((9, 0), "cuda sm_90"), ((8, 0), "cuda sm_80"), ((7, 5), "none")])
def test_bf16_units_on_cuda_need_compute_capability_8(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert bf16_units(torch.device("cuda", 0)) == expected
