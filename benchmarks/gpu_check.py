"""The GPU paths CI cannot run: NCCL across 2 processes, SyncBatchNorm, bf16 teachers, a study on CUDA.

CI has no GPU, so these paths run only here (issue 20). Whoever holds a GPU runs this script, in under
5 minutes on one GPU, and it prints PASS, FAIL or SKIP per path, with the reason:
- nccl_2_process: a Sup-only job as 2 NCCL ranks (needs 2 GPUs): finite losses, and replicas that
  agree (replica_spread 0) at every evaluation;
- syncbn: a segmenter converted to SyncBatchNorm on a 1-rank NCCL group computes what BatchNorm does;
- global_batchnorm_2_ranks: a student trained by 2 NCCL ranks with SyncBatchNorm reports the same
  losses as 1 rank with both halves of its batch (needs 2 GPUs);
- bf16_teachers: frozen teachers under bf16 autocast give float32 outputs whose pseudo labels agree
  with fp32 on most pixels (printed; random-weight teachers agree less than trained ones);
- study_on_cuda: the quickstart shrunk by --smoke, with one GPU per job: every trial finishes and reads
  the teacher-signal cache.
`--device cpu` runs the same checks on CPU with gloo where that means anything (for this script's
own test); the NCCL and SyncBatchNorm paths are then skipped. Not a test.
    python benchmarks/gpu_check.py [--device cuda|cpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TINY_DATA = {"builtin": {"num_train": 16, "num_val": 4, "size": 32, "num_classes": 4}, "crop_size": 32, "scales": [1.0]}
TINY_SCHEDULE = {"iterations": 4, "eval_every": 2, "batch_labeled": 2, "batch_unlabeled": 2, "eval_batch": 4}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_cfg(root: Path) -> dict[str, Any]:
    return TINY_DATA | {"root": str(root), "partition": "1/4"}


def _rank(rank: int, world: int, port: int, backend: str, fn: Callable[..., Any], out: Path, args: tuple) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(fn(*args), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(world: int, backend: str, fn: Callable[..., Any], out: Path, *args: Any) -> list[Any]:
    mp.spawn(_rank, args=(world, free_port(), backend, fn, out, args), nprocs=world, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def sup_job(root: str, per_worker: int) -> list[dict[str, Any]]:
    """A Sup-only job on this process (or rank); its reports."""
    from mgd_ray.config import parse_job_config
    from mgd_ray.jobs.baselines import run_baseline

    schedule = TINY_SCHEDULE | {"batch_labeled": per_worker, "batch_unlabeled": per_worker}
    cfg = parse_job_config(
        "baseline",
        {
            "method": "supervised",
            "data": data_cfg(Path(root)),
            "schedule": schedule,
            "optim": {"scale_lr_with_world_size": False},
        },
    )
    reports: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        run_baseline(cfg, lambda m, _: reports.append(dict(m)), Path(d))
    return reports


def check_nccl_2_process(args: argparse.Namespace) -> str:
    if args.device != "cuda" or torch.cuda.device_count() < 2:
        raise Skip(f"needs 2 CUDA devices ({torch.cuda.device_count()} here)")
    ranks = spawn(2, "nccl", sup_job, args.out / "nccl", str(args.out / "data"), 2)
    for reports in ranks:
        assert reports and all(torch.isfinite(torch.tensor(r["loss/total"])) for r in reports), "non-finite loss"
        assert all(r["replica_spread"] == 0.0 for r in reports), [r["replica_spread"] for r in reports]
    return f"{len(ranks[0])} evaluations on 2 ranks, replicas identical"


def check_global_batchnorm_2_ranks(args: argparse.Namespace) -> str:
    if args.device != "cuda" or torch.cuda.device_count() < 2:
        raise Skip(f"needs 2 CUDA devices ({torch.cuda.device_count()} here)")
    two = spawn(2, "nccl", sup_job, args.out / "gbn", str(args.out / "data"), 1)[0]
    one = sup_job(str(args.out / "data"), 2)
    worst = max(abs(a["loss/sup"] - b["loss/sup"]) for a, b in zip(one, two, strict=True))
    assert worst < 1e-3, f"2 ranks x 1 image and 1 rank x 2 differ by {worst:.2e} in loss/sup"
    return f"loss/sup of 2 ranks x 1 image = 1 rank x 2 images within {worst:.1e}"


def _syncbn_rank() -> float:
    from mgd_ray.models.deeplab import build_segmenter

    torch.manual_seed(0)
    plain = build_segmenter("resnet18", 4).cuda().train()
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(build_segmenter("resnet18", 4)).cuda().train()
    synced.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64, device="cuda")
    a, b = plain(x).logits, synced(x).logits
    b.sum().backward()  # SyncBatchNorm's backward runs too
    return float((a - b).abs().max())


def check_syncbn(args: argparse.Namespace) -> str:
    if args.device != "cuda":
        raise Skip("SyncBatchNorm is CUDA-only (CPU runs use mgd_ray's GlobalBatchNorm2d, tested in CI)")
    worst = spawn(1, "nccl", _syncbn_rank, args.out / "syncbn")[0]
    assert worst < 1e-3, f"SyncBatchNorm on 1 rank differs from BatchNorm by {worst:.2e}"
    return f"1-rank SyncBatchNorm = BatchNorm within {worst:.1e}"


def check_bf16_teachers(args: argparse.Namespace) -> str:
    from mgd_ray.config import CheckpointRef, ModelConfig
    from mgd_ray.models.deeplab import build_segmenter
    from mgd_ray.teachers import load_teacher

    device = torch.device(args.device)
    if args.device == "cuda" and not torch.cuda.is_bf16_supported():
        raise Skip("this GPU has no bf16")
    torch.manual_seed(0)
    net = build_segmenter("resnet18", 4)
    path = args.out / "teacher.pt"
    torch.save(_record(net, args), path)
    ref = CheckpointRef(model=ModelConfig(backbone="resnet18"), checkpoint=path)
    fp32 = load_teacher(ref, 4, device)
    bf16 = load_teacher(ref, 4, device, precision="bf16")
    x = torch.randn(4, 3, 64, 64, device=device)
    with torch.no_grad():
        out32, out16 = fp32(x), bf16(x)
    assert out16.logits.dtype == torch.float32 and out16.features.dtype == torch.float32, "bf16 outputs not float32"
    assert torch.isfinite(out16.logits).all(), "non-finite bf16 logits"
    agree = float((out32.logits.argmax(1) == out16.logits.argmax(1)).float().mean())
    return f"pseudo labels agree with fp32 on {100 * agree:.2f}% of pixels (random weights)"


def _record(net: torch.nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    from mgd_ray.checkpoint import segmenter_record
    from mgd_ray.config import parse_job_config
    from mgd_ray.data.stream import load_job_data

    data = load_job_data(parse_job_config("baseline", {"data": data_cfg(args.out / "data")}).data)
    return segmenter_record(net, parse_job_config("baseline", {}).student, data, 32, "teacher")


def check_study_on_cuda(args: argparse.Namespace) -> str:
    import ray
    from mlflow.tracking import MlflowClient

    from mgd_ray import tracking
    from mgd_ray.study.config import load_study
    from mgd_ray.study.run import run_study
    from mgd_ray.study.smoke import smoke

    study = smoke(load_study(Path(__file__).parents[1] / "studies" / "quickstart.yaml"))
    gpus = 1.0 if args.device == "cuda" else 0.0
    study = study.model_copy(
        update={
            "name": "gpu-check",
            "storage_path": str(args.out / "runs"),
            "mlflow": study.mlflow.model_copy(update={"tracking_uri": f"sqlite:///{args.out / 'mlflow.db'}"}),
            "resources": study.resources.model_copy(update={"gpus_per_worker": gpus}),
            "scheduler": study.scheduler.model_copy(update={"type": "none"}),  # every trial runs to its end
        }
    )
    ray.init(num_gpus=torch.cuda.device_count() if gpus else 0, logging_level="WARNING")
    try:
        run_study(study, base=args.out)
    finally:
        ray.shutdown()
    client = MlflowClient(f"sqlite:///{args.out / 'mlflow.db'}")
    exp = client.get_experiment_by_name(study.experiment)
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags.get(tracking.KIND_TAG) == "trial"]
    assert trials and all(r.info.status == "FINISHED" for r in trials), [r.info.status for r in trials]
    hits = [r.data.tags.get("mgd_ray.teacher_cache") for r in trials]
    assert all(h == "hit" for h in hits), hits
    return f"{len(trials)} trials finished on {args.device}, every one read the teacher-signal cache"


class Skip(Exception):
    """A path this machine cannot run."""


CHECKS: dict[str, Callable[[argparse.Namespace], str]] = {
    "nccl_2_process": check_nccl_2_process,
    "global_batchnorm_2_ranks": check_global_batchnorm_2_ranks,
    "syncbn": check_syncbn,
    "bf16_teachers": check_bf16_teachers,
    "study_on_cuda": check_study_on_cuda,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--out", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--only", nargs="+", choices=list(CHECKS), help="run these checks only")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device here; --device cpu runs what a CPU can")
    args.out = (args.out or Path(tempfile.mkdtemp(prefix="mgd_gpu_check_"))).absolute()
    for sub in ("nccl", "gbn", "syncbn", "data"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"gpu_check on {name} ({torch.cuda.device_count()} CUDA devices), torch {torch.__version__}", flush=True)
    failed = 0
    for label, check in CHECKS.items():
        if args.only and label not in args.only:
            continue
        start = time.perf_counter()
        try:
            verdict, detail = "PASS", check(args)
        except Skip as why:
            verdict, detail = "SKIP", str(why)
        except Exception as err:  # noqa: BLE001 (every failure is reported, and the next check runs)
            verdict, detail = "FAIL", f"{type(err).__name__}: {err}"
            traceback.print_exc()
            failed += 1
        print(f"{verdict:4s}  {label:26s} {time.perf_counter() - start:6.1f} s  {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
