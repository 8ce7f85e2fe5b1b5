"""How hard the built-in dataset is: Sup-only mIoU of a small and a larger model at few and many labels.

The method needs a gap to close: a small student trained on 1/16 of the labels must be clearly worse
than larger models, and than itself with more labels. This trains the package's own Sup-only job
(``run_baseline``, as plain loops in this process, no Ray) for every (backbone, partition) pair on the
same generated data and schedule, and prints the best validation mIoU of each. Not a test.

    python benchmarks/bench_builtin_gap.py [--size 32] [--classes 4] [--iterations 150] \\
        [--backbones mobilenet_v2 resnet18 resnet34] [--partitions 1/16 1/2] [--seeds 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import torch

from mgd_ray.config import parse_job_config
from mgd_ray.jobs.baselines import run_baseline


def sup_only(root: Path, backbone: str, partition: str, args: argparse.Namespace, seed: int) -> tuple[float, float]:
    cfg = parse_job_config(
        "baseline",
        {
            "method": "supervised",
            "data": {
                "dataset": "builtin",
                "root": str(root),
                "partition": partition,
                "builtin": {
                    "num_train": args.num_train,
                    "num_val": args.num_val,
                    "size": args.size,
                    "num_classes": args.classes,
                },
                "crop_size": args.size,
                "scales": [0.75, 1.0, 1.25],
            },
            "student": {"backbone": backbone},
            "optim": {"optimizer": "adamw", "lr": args.lr},
            "schedule": {
                "iterations": args.iterations,
                "eval_every": args.eval_every,
                "batch_labeled": args.batch,
                "batch_unlabeled": args.batch,
                "eval_batch": 32,
                "seed": seed,
            },
        },
    )
    best = 0.0

    def report(metrics: dict, _ckpt: Path | None) -> None:
        nonlocal best
        best = max(best, metrics["val/mIoU"])

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mgd_gap_") as tmp:
        run_baseline(cfg, report, Path(tmp))
    return best, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--num-train", type=int, default=256)
    ap.add_argument("--num-val", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "resnet18", "resnet34"])
    ap.add_argument("--partitions", nargs="+", default=["1/16", "1/2"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="mgd_gap_data_")) / "builtin"
    print(
        f"Sup-only on the built-in dataset: {args.size}px, {args.classes} classes, {args.num_train} train / {args.num_val} val, "
        f"{args.iterations} iterations, batch {args.batch}, AdamW lr {args.lr}, seeds {args.seeds}, {args.threads} threads",
        flush=True,
    )
    rows = []
    for backbone in args.backbones:
        for partition in args.partitions:
            scores, secs = [], 0.0
            for seed in args.seeds:
                miou, s = sup_only(root, backbone, partition, args, seed)
                scores.append(100 * miou)
                secs += s
            mean = statistics.fmean(scores)
            std = statistics.stdev(scores) if len(scores) > 1 else 0.0
            labeled = int(args.num_train * Fraction(partition))
            rows.append((backbone, partition, labeled, mean, std, secs))
            print(f"  {backbone:14s} {partition:5s} done: {mean:.1f} mIoU in {secs:.0f} s", flush=True)
    print(f"\n{'backbone':14s} {'labels':>12s} {'best val mIoU %':>16s} {'seconds':>8s}")
    for backbone, partition, labeled, mean, std, secs in rows:
        spread = f" ± {std:.1f}" if len(args.seeds) > 1 else ""
        print(f"{backbone:14s} {partition + f' ({labeled})':>12s} {f'{mean:.1f}{spread}':>16s} {secs:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
