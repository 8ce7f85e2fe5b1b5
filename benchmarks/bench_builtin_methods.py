"""Every student method over several seeds on the built-in dataset, beside their CPS teachers (issue 23).

The quickstart runs each method once; one seed moves a small student by several mIoU, so whether
MGD beats the baselines at a given budget needs repeats. This trains T_D (ResNet-34) and T_W
(ResNet-18) with CPS as the quickstart does (or reuses `--teachers DIR` holding T_D/model.pt and
T_W/model.pt), then a MobileNetV2 student with each method on every seed, all as the package's own
jobs in plain loops (no Ray, two processes of one thread each). It prints a table laid out like the
paper's Table 1 (teachers, Sup-only, Mean Teacher, CPS, KD, MGD; GFLOPs and params at the crop),
the ablation of its Table 5a (L_P, L_P + L_I, L_P + L_R, L_P + L_I + L_R), and MGD's lead over
each baseline paired by seed, with the standard error of that difference. Every figure is a run's
last evaluation, the one its exported weights have and a study reports.

KD is the paper's, on the labeled images only ("designed for labeled data", Sec. 1 and 3.3);
"KD + unlabeled" also distils on MGD's CutMix-ed unlabeled images, a stronger baseline than the
paper's that separates what MGD adds beyond its use of the unlabeled data.

`--precision fp32 bf16` trains every student both ways on the same seeds (``optim.precision``;
issue 22) and prints bf16 − fp32 per method, paired by seed, beside fp32's seed spread, with the
mean seconds per student job of each.

`--init builtin` starts every network from the built-in corpus' pretraining, as a study with
`pretrained: builtin` does: the backbones are pretrained here with the study default recipe
(`PretrainRecipe`), or reused from `--pretrained DIR` holding DIR/<backbone>.pt (what
bench_pretrain_protocol.py writes to OUT/pretrained with its defaults). Not a test.

The defaults are the quickstart's (studies/quickstart.yaml): pretrained networks, 1/16 labeled,
teachers 240 iterations, students 120, its loss weights, seeds 0-4 and every method (~30 min on
2 cores); `--init scratch --teacher-iterations 120 150 --lambda-2 50` is the from-scratch setting
the README's "without pretraining" row measured.

    python benchmarks/bench_builtin_methods.py [--init scratch|builtin] [--pretrained DIR] [--partition 1/16] \\
        [--teacher-iterations 240 240] [--student-iterations 120] [--eval-every 40] [--seeds 0 1 2 3 4] \\
        [--methods supervised kd mgd ...] [--precision fp32 bf16] [--lambda-1 L1] [--lambda-2 L2] [--pool-size H] [--teachers DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import shutil
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
# The quickstart's student loss weights (studies/quickstart.yaml).
MGD_LOSSES = {"image_teachers": ["T_D"], "region_teachers": ["T_W"], "lambda_1": 0.0005, "lambda_2": 5, "pool_size": 4}
# Table 5a: the pixel-level term alone, then with the image-level (T_D) and/or region-level (T_W) term.
ABLATION = {
    "mgd_P": {"image_teachers": [], "region_teachers": []},
    "mgd_PI": {"region_teachers": []},
    "mgd_PR": {"image_teachers": []},
    "mgd": {},
}
# kd: the paper's KD, on the labeled images only; kd_u: KD also on MGD's CutMix-ed unlabeled images.
BASELINES = ["supervised", "mean_teacher", "cps", "kd", "kd_u"]
METHODS = BASELINES + list(ABLATION)
LABELS = {
    "supervised": "Sup-only",
    "mean_teacher": "Mean Teacher",
    "cps": "CPS (student pair)",
    "kd": "KD (T_D)",
    "kd_u": "KD (T_D) + unlabeled",
    "mgd_P": "MGD L_P",
    "mgd_PI": "MGD L_P + L_I",
    "mgd_PR": "MGD L_P + L_R",
    "mgd": "MGD L_P + L_I + L_R",
}


def weights(args: argparse.Namespace, backbone: str) -> Path:
    return args.pretrained / f"{backbone}.pt"


def model(backbone: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"backbone": backbone} | ({"pretrained": str(weights(args, backbone))} if args.init == "builtin" else {})


def train_teacher(role: str, args: argparse.Namespace, iterations: int) -> tuple[str, float, float]:
    """CPS-train one teacher with the quickstart's recipe; its final network goes to out/role/model.pt."""
    import torch

    from mgd_ray.config import parse_job_config
    from mgd_ray.jobs.cps import run_teacher

    torch.set_num_threads(1)
    cfg = parse_job_config(
        "teacher",
        {
            "data": data_config(args.data, args.partition),
            "model": model(TEACHERS[role], args),
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


def train_student(
    method: str, seed: int, args: argparse.Namespace, teachers: Path, precision: str = "fp32"
) -> tuple[str, int, float, float]:
    """One student job; returns its last val mIoU (what the study reports: the exported weights')."""
    import torch

    from mgd_ray.config import parse_job_config
    from mgd_ray.jobs.baselines import run_baseline
    from mgd_ray.jobs.distill import run_distill

    torch.set_num_threads(1)
    # Frozen teachers are rebuilt from their checkpoints: no pretrained weights to load.
    refs = {
        role: {"model": {"backbone": bb}, "checkpoint": str(teachers / role / "model.pt")}
        for role, bb in TEACHERS.items()
    }
    base = {
        "data": data_config(args.data, args.partition),
        "student": model(STUDENT, args),
        "optim": {"optimizer": "adamw", "lr": args.lr, "precision": precision},
        "schedule": schedule(args.student_iterations, args.eval_every, seed),
    }
    last = 0.0

    def report(metrics: dict[str, Any], _ckpt: Path | None) -> None:
        nonlocal last
        last = metrics["val/mIoU"]

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mgd_bench_{method}_") as tmp:
        if method in ABLATION:
            losses = MGD_LOSSES | args.weights | ABLATION[method]
            run_distill(parse_job_config("student", base | {"teachers": refs, "losses": losses}), report, Path(tmp))
        else:
            extra = {"method": method.removesuffix("_u")} | (
                {"teacher": refs["T_D"]} if method.startswith("kd") else {}
            )
            extra |= {"distill_on": "labeled+unlabeled"} if method == "kd_u" else {}
            run_baseline(parse_job_config("baseline", base | extra), report, Path(tmp))
    return method, seed, 100 * last, time.perf_counter() - start


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-seed difference a − b (nan SE with one seed)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
    return statistics.fmean(diffs), se


def mean_std(scores: list[float]) -> str:
    std = statistics.stdev(scores) if len(scores) > 1 else 0.0
    return f"{statistics.fmean(scores):.1f} ± {std:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", choices=["scratch", "builtin"], default="builtin")
    ap.add_argument("--pretrained", type=Path, help="reuse DIR/<backbone>.pt (with --init builtin)")
    ap.add_argument("--teacher-iterations", nargs=2, type=int, default=[240, 240], metavar=("T_D", "T_W"))
    ap.add_argument("--student-iterations", type=int, default=120)
    ap.add_argument("--eval-every", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--partition", default="1/16")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    ap.add_argument(
        "--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"], help="students' optim.precision"
    )
    ap.add_argument("--lambda-1", type=float, help=f"image-level weight (default {MGD_LOSSES['lambda_1']})")
    ap.add_argument("--lambda-2", type=float, help=f"region-level weight (default {MGD_LOSSES['lambda_2']})")
    ap.add_argument("--pool-size", type=int, help=f"region pool size H_v (default {MGD_LOSSES['pool_size']})")
    ap.add_argument("--teachers", type=Path, help="reuse DIR/T_D/model.pt and DIR/T_W/model.pt instead of training")
    ap.add_argument("--out", type=Path, help="where trained teachers are written (default: a temporary folder)")
    ap.add_argument("--data", type=Path, help="built-in dataset folder (default: a temporary folder)")
    args = ap.parse_args()
    args.weights = {
        k: v
        for k, v in (("lambda_1", args.lambda_1), ("lambda_2", args.lambda_2), ("pool_size", args.pool_size))
        if v is not None
    }
    if args.pretrained is not None and args.init != "builtin":
        ap.error("--pretrained needs --init builtin")
    scratch = Path(tempfile.mkdtemp(prefix="mgd_bench_methods_"))
    args.data = (args.data or scratch / "builtin").absolute()
    args.out = (args.out or scratch / "teachers").absolute()
    args.pretrained = (args.pretrained or scratch / "pretrained").absolute()
    if args.teachers is not None:
        missing = [
            str(args.teachers / r / "model.pt") for r in TEACHERS if not (args.teachers / r / "model.pt").is_file()
        ]
        if missing:
            ap.error(f"--teachers {args.teachers}: missing {', '.join(missing)}")
    source = f"from {args.teachers}" if args.teachers else f"{args.teacher_iterations} iterations, saved to {args.out}"
    print(
        f"Built-in dataset 32 px, 4 classes, {args.partition} labeled; init {args.init}; teachers {source}; "
        f"students {args.student_iterations} iterations (eval every {args.eval_every}), seeds {args.seeds}; "
        f"MGD weights {MGD_LOSSES | args.weights}",
        flush=True,
    )
    from mgd_ray.config import DataConfig, ModelConfig
    from mgd_ray.data.stream import prepare_manifest
    from mgd_ray.models.complexity import segmenter_cost
    from mgd_ray.study.config import PretrainRecipe

    # Generate the data once here, rather than in two worker processes at the same time.
    prepare_manifest(DataConfig.model_validate(data_config(args.data, args.partition)))
    teacher_miou: dict[str, float] = {}
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        if args.init == "builtin":
            args.pretrained.mkdir(parents=True, exist_ok=True)
            wanted = ([] if args.teachers else list(TEACHERS.values())) + [STUDENT]
            recipe = PretrainRecipe()  # the study default: what `pretrained: builtin` pretrains with
            needed = [b for b in wanted if not weights(args, b).is_file()]
            for done in [
                pool.submit(pretrain_backbone, b, recipe, weights(args, b), args.pretrained / "corpus") for b in needed
            ]:
                backbone, final, secs = done.result()
                print(
                    f"  pretrained {backbone}: label accuracy {100 * final['pretrain/label_accuracy']:.1f} %, "
                    f"mAP {100 * final['pretrain/mAP']:.1f} %, {secs:.0f} s",
                    flush=True,
                )
        teachers = args.teachers
        if teachers is None:
            jobs = [
                pool.submit(train_teacher, role, args, its)
                for role, its in zip(TEACHERS, args.teacher_iterations, strict=True)
            ]
            for job in jobs:
                role, miou, secs = job.result()
                teacher_miou[role] = miou
                print(
                    f"  teacher {role} ({TEACHERS[role]}): {miou:.1f} mIoU at its last step, {secs:.0f} s", flush=True
                )
            teachers = args.out
        jobs = {
            (m, p): [pool.submit(train_student, m, s, args, teachers, p) for s in args.seeds]
            for p in args.precision
            for m in args.methods
        }
        by_precision: dict[tuple[str, str], list[float]] = {}
        seconds: dict[str, list[float]] = {p: [] for p in args.precision}
        for (method, precision), runs in jobs.items():
            for job in runs:
                _, seed, miou, secs = job.result()
                by_precision.setdefault((method, precision), []).append(miou)
                seconds[precision].append(secs)
                print(f"  {method:12s} {precision} seed {seed}: last {miou:.1f} mIoU, {secs:.0f} s", flush=True)
        results = {m: by_precision[(m, args.precision[0])] for m in args.methods}

    def cost(backbone: str) -> str:
        params, gflops = segmenter_cost(ModelConfig(backbone=backbone), 4, 32)
        return f"{gflops:7.3f} {params:7.2f}"

    print(f"\n{'method':22s} {'GFLOPs':>7s} {'params':>7s} {'mIoU':>12s}  per seed {args.seeds}  (at 32², 4 classes)")
    for role, miou in teacher_miou.items():
        print(f"{'teacher ' + role + ' ' + TEACHERS[role]:22s} {cost(TEACHERS[role])} {miou:12.1f}  (last step)")
    for method, scores in results.items():
        per_seed = ", ".join(f"{s:.1f}" for s in scores)
        print(f"{LABELS[method]:22s} {cost(STUDENT)} {mean_std(scores):>12s}  {per_seed}")
    if {"fp32", "bf16"} <= set(args.precision):
        print(f"\nbf16 − fp32 students, paired by seed (seeds {args.seeds}; 'within spread': |mean| ≤ fp32's std):")
        for method in args.methods:
            fp32, bf16 = by_precision[(method, "fp32")], by_precision[(method, "bf16")]
            diff, se = paired(bf16, fp32)
            spread = statistics.stdev(fp32) if len(fp32) > 1 else math.nan
            verdict = "within spread" if abs(diff) <= spread else "OUTSIDE spread"
            print(
                f"  {LABELS[method]:22s} fp32 {mean_std(fp32):>11s}  bf16 {mean_std(bf16):>11s}  "
                f"diff {diff:+.2f} ± {se:.2f}  ({verdict})"
            )
        for precision, secs in seconds.items():
            print(f"  {precision}: {statistics.fmean(secs):.1f} s per student job (1 thread)")
    if "mgd" in results and len(args.seeds) > 1:
        print("\nMGD − baseline, paired by seed (mean ± standard error; the issue asks for mean > 2 SE):")
        for base in [b for b in BASELINES + ["mgd_P", "mgd_PI", "mgd_PR"] if b in results]:
            diff, se = paired(results["mgd"], results[base])
            verdict = "lead > 2 SE" if diff > 2 * se else "not significant"
            print(f"  vs {LABELS[base]:20s} {diff:+.2f} ± {se:.2f}  ({verdict})")
        if {"supervised", "kd"} <= set(results):
            means = {b: statistics.fmean(results[b]) for b in ("supervised", "kd")}
            order = (
                "MGD > KD > Sup-only" if statistics.fmean(results["mgd"]) > means["kd"] > means["supervised"] else "no"
            )
            diff, se = paired(results["mgd"], results[max(means, key=means.get)])
            print(
                f"Issue 23's criterion: ordering {order}; MGD − max(KD, Sup-only) {diff:+.2f} ± {se:.2f} "
                f"({'> 2 SE: met' if diff > 2 * se else 'not met'})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
