"""Sup-only, KD and MGD students over several seeds on the built-in dataset, beside their CPS teachers.

The quickstart runs each method once; one seed moves a from-scratch student by several mIoU, so
whether MGD beats the baselines at a given budget needs repeats. This pretrains T_D (ResNet-34)
and T_W (ResNet-18) with CPS as the quickstart does (or reuses `--teachers DIR` holding
T_D/model.pt and T_W/model.pt), then trains a MobileNetV2 student with each method on every seed,
all as the package's own jobs in plain loops (no Ray, two processes at a time), and prints the
best val mIoU per seed with mean ± std. The defaults are the quickstart's data, recipes and loss
weights; `--teacher-iterations` / `--student-iterations` scale the budget. Not a test.

    python benchmarks/bench_builtin_methods.py [--teacher-iterations 120 150] [--student-iterations 120] \\
        [--eval-every 40] [--seeds 0 1 2] [--methods supervised kd mgd] [--teachers DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

TEACHERS = {"T_D": "resnet34", "T_W": "resnet18"}
# The quickstart's student loss weights (studies/quickstart.yaml: the official MobileNetV2 ones).
MGD_LOSSES = {"image_teachers": ["T_D"], "region_teachers": ["T_W"], "lambda_1": 0.0005, "lambda_2": 50, "pool_size": 4}


def data_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dataset": "builtin",
        "root": str(args.data),
        "partition": args.partition,
        "builtin": {"num_train": 256, "num_val": 64, "size": 32, "num_classes": 4},
        "crop_size": 32,
        "scales": [0.75, 1.0, 1.25],
    }


def schedule(iterations: int, eval_every: int, seed: int) -> dict[str, Any]:
    return {
        "iterations": iterations,
        "eval_every": eval_every,
        "batch_labeled": 4,
        "batch_unlabeled": 4,
        "eval_batch": 32,
        "seed": seed,
    }


def train_teacher(role: str, args: argparse.Namespace, iterations: int) -> tuple[str, float, float]:
    """CPS-pretrain one teacher with the quickstart's recipe; its final network goes to out/role/model.pt."""
    import torch

    from mgd_ray.config import parse_job_config
    from mgd_ray.jobs.cps import run_teacher

    torch.set_num_threads(1)
    cfg = parse_job_config(
        "teacher",
        {
            "data": data_config(args),
            "model": {"backbone": TEACHERS[role]},
            "optim": {"optimizer": "adamw", "lr": args.lr},
            "schedule": schedule(iterations, max(1, iterations // 2), 0),
            "cps_rampup": 0.5,
        },
    )
    final: dict[str, float] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mgd_bench_{role}_") as tmp:
        run_teacher(cfg, lambda metrics, _: final.update(metrics), Path(tmp))
        (args.out / role).mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / f"step_{iterations:08d}" / "model.pt", args.out / role / "model.pt")
    return role, 100 * final["val/mIoU"], time.perf_counter() - start


def train_student(method: str, seed: int, args: argparse.Namespace, teachers: Path) -> tuple[str, int, float, float]:
    """One student job; returns its best val mIoU over the evaluations (what the study reports)."""
    import torch

    from mgd_ray.config import parse_job_config
    from mgd_ray.jobs.baselines import run_baseline
    from mgd_ray.jobs.distill import run_distill

    torch.set_num_threads(1)
    refs = {
        role: {"model": {"backbone": bb}, "checkpoint": str(teachers / role / "model.pt")}
        for role, bb in TEACHERS.items()
    }
    base = {
        "data": data_config(args),
        "student": {"backbone": "mobilenet_v2"},
        "optim": {"optimizer": "adamw", "lr": args.lr},
        "schedule": schedule(args.student_iterations, args.eval_every, seed),
    }
    best = 0.0

    def report(metrics: dict[str, Any], _ckpt: Path | None) -> None:
        nonlocal best
        best = max(best, metrics["val/mIoU"])

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mgd_bench_{method}_") as tmp:
        if method == "mgd":
            run_distill(parse_job_config("student", base | {"teachers": refs, "losses": MGD_LOSSES}), report, Path(tmp))
        else:
            extra = {"method": method} | ({"teacher": refs["T_D"]} if method == "kd" else {})
            run_baseline(parse_job_config("baseline", base | extra), report, Path(tmp))
    return method, seed, 100 * best, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-iterations", nargs=2, type=int, default=[120, 150], metavar=("T_D", "T_W"))
    ap.add_argument("--student-iterations", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--partition", default="1/16")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", choices=["supervised", "kd", "mgd"], default=["supervised", "kd", "mgd"])
    ap.add_argument("--teachers", type=Path, help="reuse DIR/T_D/model.pt and DIR/T_W/model.pt instead of pretraining")
    ap.add_argument("--out", type=Path, help="where pretrained teachers are written (default: a temporary folder)")
    ap.add_argument("--data", type=Path, help="built-in dataset folder (default: a temporary folder)")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="mgd_bench_methods_"))
    args.data = (args.data or scratch / "builtin").absolute()
    args.out = (args.out or scratch / "teachers").absolute()
    if args.teachers is not None:
        missing = [
            str(args.teachers / r / "model.pt") for r in TEACHERS if not (args.teachers / r / "model.pt").is_file()
        ]
        if missing:
            ap.error(f"--teachers {args.teachers}: missing {', '.join(missing)}")
    source = f"from {args.teachers}" if args.teachers else f"{args.teacher_iterations} iterations, saved to {args.out}"
    print(
        f"Built-in dataset 32 px, 4 classes, {args.partition} labeled; teachers {source}; "
        f"students {args.student_iterations} iterations (eval every {args.eval_every}), seeds {args.seeds}",
        flush=True,
    )
    from mgd_ray.config import DataConfig
    from mgd_ray.data.stream import prepare_manifest

    # Generate the data once here, rather than in two worker processes at the same time.
    prepare_manifest(DataConfig.model_validate(data_config(args)))
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        teachers = args.teachers
        if teachers is None:
            jobs = [
                pool.submit(train_teacher, role, args, its)
                for role, its in zip(TEACHERS, args.teacher_iterations, strict=True)
            ]
            for job in jobs:
                role, miou, secs = job.result()
                print(
                    f"  teacher {role} ({TEACHERS[role]}): {miou:.1f} mIoU at its last step, {secs:.0f} s", flush=True
                )
            teachers = args.out
        jobs = [pool.submit(train_student, m, s, args, teachers) for m in args.methods for s in args.seeds]
        results: dict[str, list[float]] = {m: [] for m in args.methods}
        for job in jobs:
            method, seed, miou, secs = job.result()
            results[method].append(miou)
            print(f"  {method:10s} seed {seed}: best {miou:.1f} mIoU, {secs:.0f} s", flush=True)
    print(f"\n{'method':10s} {'mean ± std':>12s}  per seed {args.seeds}")
    for method, scores in results.items():
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        print(
            f"{method:10s} {f'{statistics.fmean(scores):.1f} ± {std:.1f}':>12s}  {', '.join(f'{s:.1f}' for s in scores)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
