"""The protocol check of issue 23: is the laptop setting one where semi-supervised distillation can matter?

Pretrains each backbone on the built-in corpus (``mgd_ray.jobs.pretrain``), then, from scratch and
from those weights side by side, trains the quickstart's jobs as plain loops (no Ray, two processes
of one thread each): Sup-only MobileNetV2 on the study's fraction and on all labels, and the two CPS
teachers on the fraction. It prints each run's last-evaluation val mIoU and the three conditions:

- label-limited: Sup-only on all labels ≥ Sup-only on the fraction + 8 mIoU;
- teachers clearly above the student: each teacher ≥ Sup-only on the fraction + 8;
- the student is not capacity-limited: Sup-only on all labels within a few points of the teachers.

Not a test. The defaults are the quickstart's data and recipes, with the corpus probe's pretraining.

    python benchmarks/bench_pretrain_protocol.py [--partition 1/16] [--student-iterations 120] \\
        [--teacher-iterations 120 150] [--pretrain-iterations 600] [--inits scratch builtin] [--seeds 0]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from builtin_setup import data_config, pretrain_backbone, schedule

TEACHERS = {"T_D": "resnet34", "T_W": "resnet18"}
STUDENT = "mobilenet_v2"
GAP = 8.0  # mIoU points each condition asks for


def recipe(args: argparse.Namespace) -> Any:
    """The pretraining recipe the command line asks for (the study default when left alone)."""
    from mgd_ray.study.config import PretrainRecipe

    return PretrainRecipe(
        corpus={"num_images": args.corpus_images, "num_val": args.corpus_images // 10, "size": 32},
        optim={"optimizer": "adamw", "lr": args.pretrain_lr, "scale_lr_with_world_size": False},
        schedule={
            "iterations": args.pretrain_iterations,
            "batch": 64,
            "eval_every": max(1, args.pretrain_iterations // 3),
        },
    )


def weights(args: argparse.Namespace, backbone: str) -> Path:
    return args.out / "pretrained" / f"{backbone}.pt"


def model(backbone: str, init: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"backbone": backbone} | ({"pretrained": str(weights(args, backbone))} if init == "builtin" else {})


def run(job: tuple[str, str, str, int], args: argparse.Namespace) -> tuple[tuple[str, str, str, int], float, float]:
    """(what, init, partition, seed) → its last-evaluation val mIoU and seconds."""
    import torch

    from mgd_ray.config import parse_job_config
    from mgd_ray.jobs.baselines import run_baseline
    from mgd_ray.jobs.cps import run_teacher

    torch.set_num_threads(1)
    what, init, partition, seed = job
    last: dict[str, float] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mgd_protocol_") as tmp:
        if what in TEACHERS:
            iterations = args.teacher_iterations[list(TEACHERS).index(what)]
            cfg = parse_job_config(
                "teacher",
                {
                    "data": data_config(args.data, partition),
                    "model": model(TEACHERS[what], init, args),
                    "optim": {"optimizer": "adamw", "lr": args.lr},
                    "schedule": schedule(iterations, max(1, iterations // 3), seed),
                    "cps_rampup": 0.5,
                },
            )
            run_teacher(cfg, lambda metrics, _: last.update(metrics), Path(tmp))
        else:
            cfg = parse_job_config(
                "baseline",
                {
                    "method": "supervised",
                    "data": data_config(args.data, partition),
                    "student": model(STUDENT, init, args),
                    "optim": {"optimizer": "adamw", "lr": args.lr},
                    "schedule": schedule(args.student_iterations, max(1, args.student_iterations // 3), seed),
                },
            )
            run_baseline(cfg, lambda metrics, _: last.update(metrics), Path(tmp))
    return job, 100 * last["val/mIoU"], time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partition", default="1/16")
    ap.add_argument("--student-iterations", type=int, default=120)
    ap.add_argument("--teacher-iterations", nargs=2, type=int, default=[120, 150], metavar=("T_D", "T_W"))
    ap.add_argument("--pretrain-iterations", type=int, default=600)
    ap.add_argument("--pretrain-lr", type=float, default=0.002)
    ap.add_argument("--corpus-images", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--inits", nargs="+", choices=["scratch", "builtin"], default=["scratch", "builtin"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument(
        "--what", nargs="+", choices=["T_D", "T_W", "sup"], default=["T_D", "T_W", "sup"], help="the jobs to run"
    )
    ap.add_argument("--out", type=Path, help="where the corpus and pretrained weights go (reused when present)")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="mgd_protocol_"))
    args.out = (args.out or scratch).absolute()
    args.data = (scratch / "builtin").absolute()
    print(
        f"Built-in dataset 32 px, 4 classes, {args.partition} labeled; MobileNetV2 Sup-only {args.student_iterations} "
        f"iterations; CPS teachers {dict(zip(TEACHERS.values(), args.teacher_iterations, strict=True))}; pretraining "
        f"{args.pretrain_iterations} steps of 64 on {args.corpus_images} corpus images; seeds {args.seeds}",
        flush=True,
    )
    from mgd_ray.config import DataConfig
    from mgd_ray.data.corpus import CorpusSpec, load_corpus
    from mgd_ray.data.stream import prepare_manifest

    for partition in (args.partition, "all"):  # generated once here, not in two workers at once
        prepare_manifest(DataConfig.model_validate(data_config(args.data, partition)))
    load_corpus(CorpusSpec(num_images=args.corpus_images, num_val=args.corpus_images // 10), args.out / "corpus")
    results: dict[tuple[str, str, str], list[float]] = {}
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        if "builtin" in args.inits:
            wanted = [TEACHERS[w] for w in args.what if w in TEACHERS] + ([STUDENT] if "sup" in args.what else [])
            needed = [b for b in wanted if not weights(args, b).is_file()]
            for done in [
                pool.submit(pretrain_backbone, b, recipe(args), weights(args, b), args.out / "corpus") for b in needed
            ]:
                backbone, final, secs = done.result()
                print(
                    f"  pretrained {backbone}: label accuracy {100 * final['pretrain/label_accuracy']:.1f} %, "
                    f"mAP {100 * final['pretrain/mAP']:.1f} %, {secs:.0f} s",
                    flush=True,
                )
        jobs = [
            (what, init, partition, seed)
            for init in args.inits
            for seed in args.seeds
            for what, partition in (
                ("T_D", args.partition),
                ("T_W", args.partition),
                ("sup", args.partition),
                ("sup", "all"),
            )
            if what in args.what
        ]
        for done in [pool.submit(run, job, args) for job in jobs]:
            (what, init, partition, seed), miou, secs = done.result()
            results.setdefault((what, init, partition), []).append(miou)
            print(f"  {what:4s} {init:8s} {partition:5s} seed {seed}: {miou:.1f} mIoU, {secs:.0f} s", flush=True)

    def mean(key: tuple[str, str, str]) -> float:
        return statistics.fmean(results[key]) if key in results else math.nan

    print(
        f"\n{'init':8s} {'T_D':>6s} {'T_W':>6s} {'Sup ' + args.partition:>9s} {'Sup all':>8s}  conditions (≥ {GAP:.0f} points)"
    )
    for init in args.inits:
        t_d, t_w = mean(("T_D", init, args.partition)), mean(("T_W", init, args.partition))
        sup, sup_all = mean(("sup", init, args.partition)), mean(("sup", init, "all"))
        checks = [f"label-limited {sup_all - sup:+.1f} {'ok' if sup_all - sup >= GAP else 'NO'}"]
        if not math.isnan(t_d + t_w):
            checks += [
                f"teachers above {min(t_d, t_w) - sup:+.1f} {'ok' if min(t_d, t_w) - sup >= GAP else 'NO'}",
                f"student-all vs teachers {sup_all - max(t_d, t_w):+.1f}",
            ]
        print(f"{init:8s} {t_d:6.1f} {t_w:6.1f} {sup:9.1f} {sup_all:8.1f}  {'; '.join(checks)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
