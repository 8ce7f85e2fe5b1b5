"""Throughput and peak memory of one MGD distillation step. Not a test: it prints a table.

    python benchmarks/bench_step.py                                   # the paper's backbones, 128² crops
    python benchmarks/bench_step.py --crop 64 --batch 2 --student mobilenet_v2 --t-d resnet34 --t-w resnet18

One step = student forward + backward on x_l and x_mix, the teachers' signals, every loss of Eq. 7
(sup, pixel-level from both teachers, image-level from T_D, region-level from T_W), an SGD update
(the reference: ``torch.optim.SGD`` as the official code; the mgd_ray rows: the fused SGD ``fit`` builds).
Rows, each in its own process (so max RSS is that row's peak):

- ``reference``: the step as the official code writes it: every teacher in train mode under
  ``no_grad``, one forward each on u0, u1, x_mix and x_l, losses from the full outputs.
- ``mgd_ray (teacher_mode=train)``: ``run_distill``'s step with the official train-mode teachers
  (one forward per input, ``inference_mode``, only the outputs a loss uses): the same numbers as
  the reference.
- ``mgd_ray (teacher_mode=eval)``: ``run_distill``'s default step, eval-mode teachers, one batched
  forward per teacher.
- ``mgd_ray (eval, channels_last, …)``: the same with the teachers' execution options
  (``FrozenTeacher``): channels_last and, with ``--fast-precision bf16`` (the default on GPU), bf16
  autocast; bf16 changes the signals slightly.
- ``mgd_ray + teacher cache``: the signals read from a teacher-signal cache (Parquet, as
  ``mgd_ray.teacher_cache`` writes and reads it); no teacher runs.
- ``… + bf16 student``: the same, with the student's step under ``optim.precision: bf16`` (the
  autocast ``fit`` uses: ``jobs.loop.step_precision``; fp32 weights, losses in fp32).

The cache row also projects the cache's cost to a paper study (``--project``, default the VOC
ResNet-18 Table 1 study): each column's measured bytes per step, scaled to the study's crop and
global batch (pseudo-label columns by pixels; the pooled image- and region-level columns do not
grow with the crop), the total for its schedule, and the read bandwidth a trial needs at the GPU's
cached step time (``--project-step-ms``, 34 ms: performance.md, H100, 512², B = 8). Random-weight
teachers' label maps are not a trained teacher's: nearly constant at 128² (they compress to ~0.01
bits per pixel), noise at 32². So a second projection puts the pseudo-label columns at the bytes
per pixel of ground-truth-like maps (built-in masks at the study's crop, zstd as the cache writes
them): what a teacher whose labels are as clean as ground truth costs.

``--trained-teachers DIR`` (DIR/T_D/model.pt, DIR/T_W/model.pt, e.g. the quickstart's teachers or
what ``bench_builtin_methods --out`` wrote) also prints how often bf16 teachers' pseudo labels agree
with fp32 on the quickstart's val images: the check for ``teacher_precision: bf16`` on trained weights.

images/s counts the images the student trains on per step (B labeled + B mixed); "teacher share" is
the part of the step spent producing the teachers' signals (forwards, or the cache read). Peak
memory: max RSS of the row's process on CPU, ``torch.cuda.max_memory_allocated`` on GPU. Student
GFLOP/s: FLOPs of the student's forward + backward (``torch.utils.flop_counter``) over the step
time minus the teacher time, against a large fp32 matmul on the same device. Weights are random:
speed does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mgd_ray import losses
from mgd_ray.config import OptimConfig, parse_job_config
from mgd_ray.data.stream import Batch
from mgd_ray.data.transforms import box_mask
from mgd_ray.distributed import DistEnv, bf16_units
from mgd_ray.jobs.distill import distill_terms
from mgd_ray.jobs.loop import make_optimizer, step_precision
from mgd_ray.models.deeplab import build_segmenter
from mgd_ray.teacher_cache.build import step_columns, write_steps
from mgd_ray.teacher_cache.read import TeacherCache
from mgd_ray.teachers import FrozenTeacher, step_signals, teacher_roles

ROWS = ("reference", "train", "eval", "fast", "cache", "cache_bf16")
LABELS = {
    "reference": "reference (official: train-mode teachers, 4 forwards each)",
    "train": "mgd_ray (teacher_mode=train)",
    "eval": "mgd_ray (teacher_mode=eval, batched)",
    "fast": "mgd_ray (eval, batched, channels_last, --fast-precision)",
    "cache": "mgd_ray + teacher cache (no teacher runs)",
    "cache_bf16": "mgd_ray + teacher cache + bf16 student",
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batches(n: int, batch: int, crop: int, classes: int, device: torch.device, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append(
            Batch(
                x_l=torch.randn(batch, 3, crop, crop, generator=g).to(device),
                y=torch.randint(0, classes, (batch, crop, crop), generator=g).to(device),
                u0=torch.randn(batch, 3, crop, crop, generator=g).to(device),
                u1=torch.randn(batch, 3, crop, crop, generator=g).to(device),
                m=box_mask(batch, crop, crop, g).to(device),
            )
        )
    return out


def reference_step(student, teachers, b: Batch, cfg, opt) -> tuple[float, float]:
    """The official code's step: each teacher on u0, u1, x_mix and x_l separately, no_grad, train mode."""
    sync(b.x_l.device)
    t0 = time.perf_counter()
    x_mix = b.x_mix
    outs = {}
    with torch.no_grad():
        for name, t in teachers.items():
            outs[name] = {k: t(v) for k, v in (("u0", b.u0), ("u1", b.u1), ("mix", x_mix), ("l", b.x_l))}
    sync(b.x_l.device)
    t_teacher = time.perf_counter() - t0
    lc = cfg.losses
    out_l = student(b.x_l)
    out_mix = student(x_mix)
    loss = losses.supervised_loss(out_l.logits, b.y)
    for o in outs.values():
        loss = loss + losses.pixel_consistency_loss(out_l.logits, o["l"].logits)
        pl_mix = losses.mixed_pseudo_labels(o["u0"].logits, o["u1"].logits, b.m)
        loss = loss + losses.pixel_consistency_loss(out_mix.logits, pl_mix)
    loss = loss + lc.lambda_1 * losses.image_level_loss(out_mix.logits, outs["T_D"]["mix"].logits)
    loss = loss + lc.lambda_2 * losses.region_level_loss(out_mix.features, outs["T_W"]["mix"].features, lc.pool_size)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sync(b.x_l.device)
    return time.perf_counter() - t0, t_teacher


def mgd_step(student, signals_fn, b: Batch, k: int, cfg, opt, precision) -> tuple[float, float]:
    """``run_distill``'s step (signals from teachers or the cache) + the optimiser update ``fit`` does,
    the student's forward in ``precision`` (``step_precision``'s context) as ``fit`` runs it."""
    sync(b.x_l.device)
    t0 = time.perf_counter()
    signals = signals_fn(b, k)
    sync(b.x_l.device)
    t_teacher = time.perf_counter() - t0
    with precision:
        terms = distill_terms(student, signals, b, cfg)
    loss = torch.stack(list(terms.values())).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sync(b.x_l.device)
    return time.perf_counter() - t0, t_teacher


def run_row(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = parse_job_config(
        "student",
        {
            "teachers": {
                "T_D": {"model": {"backbone": args.t_d}, "checkpoint": "unused.pt"},
                "T_W": {"model": {"backbone": args.t_w}, "checkpoint": "unused.pt"},
            },
            "teacher_mode": "eval" if args.row in ("eval", "fast", "cache", "cache_bf16") else "train",
            "losses": {"pool_size": args.pool_size},
        },
    )
    student = build_segmenter(args.student, args.classes).to(device).train()
    teachers = {
        "T_D": build_segmenter(args.t_d, args.classes).to(device),
        "T_W": build_segmenter(args.t_w, args.classes).to(device),
    }
    for t in teachers.values():
        t.requires_grad_(False).train(cfg.teacher_mode == "train")
    if args.row == "fast":
        precision = args.fast_precision or ("bf16" if device.type == "cuda" else "fp32")
        teachers = {n: FrozenTeacher(t, precision, channels_last=True).eval() for n, t in teachers.items()}
    if args.row == "reference":  # the official code's torch.optim.SGD
        opt = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    else:  # what fit() builds: the same SGD update, fused into one kernel
        sgd = OptimConfig(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=0.0)
        opt, _ = make_optimizer(student, sgd, args.warmup + args.steps, DistEnv(0, 1, device))
    total = args.warmup + args.steps
    data = make_batches(total, args.batch, args.crop, args.classes, device)
    lc = cfg.losses
    roles = teacher_roles(cfg)

    def live(b: Batch, _: int):
        return step_signals(teachers, b, roles, batched=cfg.teacher_mode == "eval")

    cache_bytes, column_bytes = None, None
    signals_fn = live
    if args.row in ("cache", "cache_bf16"):
        tmp = Path(tempfile.mkdtemp(prefix="bench_step_cache_")) / "rank0-of-1.parquet"
        columns = write_steps(tmp, (step_columns(teachers, b, roles, [args.pool_size], True) for b in data))
        cache_bytes = tmp.stat().st_size / total
        column_bytes = column_bytes_per_step(tmp)
        meta = {"iterations": total, "columns": columns}
        cache = TeacherCache(tmp, meta, device, teachers)
        del teachers  # nothing runs them now

        def signals_fn(b: Batch, k: int):
            return cache.signals(k, lc.pool_size)

    env = DistEnv(0, 1, device)
    precision = step_precision("bench", OptimConfig(precision="bf16" if args.row == "cache_bf16" else "fp32"), env)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, teacher_times = [], []
    for k, b in enumerate(data):
        if args.row == "reference":
            dt, tt = reference_step(student, teachers, b, cfg, opt)
        else:
            dt, tt = mgd_step(student, signals_fn, b, k, cfg, opt, precision)
        if k >= args.warmup:
            times.append(dt)
            teacher_times.append(tt)
    # FLOPs of the student part of one step (forward + backward), counted on a cached-signal step.
    flops = None
    if args.row == "cache":
        with FlopCounterMode(display=False) as counter:
            terms = distill_terms(student, signals_fn(data[0], 0), data[0], cfg)
            torch.stack(list(terms.values())).sum().backward()
        flops = counter.get_total_flops()
        opt.zero_grad(set_to_none=True)
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    )
    step_s = sum(times) / len(times)
    teacher_s = sum(teacher_times) / len(teacher_times)
    return {
        "row": args.row,
        "step_s": step_s,
        "teacher_s": teacher_s,
        "images_per_s": 2 * args.batch / step_s,
        "peak_bytes": peak,
        "student_flops": flops,
        "cache_bytes_per_step": cache_bytes,
        "column_bytes_per_step": column_bytes,
    }


def trained_agreement(directory: Path, device: torch.device) -> list[str]:
    """Pixel agreement of bf16 and fp32 pseudo labels of the trained teachers in ``directory``, on the
    quickstart's val images (``builtin_setup.data_config``: the data they were trained on)."""
    from builtin_setup import data_config

    from mgd_ray.config import CheckpointRef, DataConfig, ModelConfig
    from mgd_ray.data.stream import load_job_data, prepare_manifest
    from mgd_ray.teachers import load_teacher

    data_cfg = DataConfig.model_validate(data_config(Path(tempfile.mkdtemp(prefix="bench_step_val_")), "1/16"))
    prepare_manifest(data_cfg)
    val = load_job_data(data_cfg).val
    x = torch.stack([val[i]["image"] for i in range(len(val))]).to(device)
    lines = []
    for role in ("T_D", "T_W"):
        path = directory / role / "model.pt"
        record = torch.load(path, map_location="cpu", weights_only=True)
        ref = CheckpointRef(model=ModelConfig.model_validate(record["model"]), checkpoint=path)
        fp32, bf16 = (load_teacher(ref, record["num_classes"], device, precision=p) for p in ("fp32", "bf16"))
        with torch.inference_mode():
            agree = (fp32(x).logits.argmax(1) == bf16(x).logits.argmax(1)).float().mean().item()
        lines.append(
            f"  {role} ({ref.model.backbone}, trained, {path}): bf16 pseudo labels agree with fp32 on "
            f"{100 * agree:.2f}% of {x.shape[0]} val images' pixels (goal 99.5%)"
        )
    return lines


def column_bytes_per_step(path: Path) -> dict[str, float]:
    """Compressed bytes per step of each cached column (Parquet's own accounting of the file)."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    sizes: dict[str, float] = {}
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for j in range(group.num_columns):
            column = group.column(j)
            name = column.path_in_schema.split(".")[0]
            sizes[name] = sizes.get(name, 0.0) + column.total_compressed_size
    return {k: v / meta.num_rows for k, v in sizes.items() if k != "step"}


def mask_bytes_per_pixel(size: int, n: int = 8) -> float:
    """zstd bytes per pixel of ``n`` built-in ground-truth masks at ``size``² (what clean labels cost)."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from mgd_ray.data.builtin import generate_builtin
    from mgd_ray.teacher_cache.build import COMPRESSION

    root = generate_builtin(Path(tempfile.mkdtemp(prefix="bench_step_masks_")) / "b", 3, n, 1, size, 6)
    codec, total, pixels = pa.Codec(COMPRESSION), 0, 0
    for path in sorted((root / "labels").glob("train_*.png")):
        mask = np.asarray(Image.open(path), dtype=np.uint8)
        total += len(codec.compress(mask.tobytes(), asbytes=True))
        pixels += mask.size
    return total / pixels


def project_cache(columns: dict[str, float], args: argparse.Namespace) -> list[str]:
    """The cache of ``args.project``'s student at its crop, global batch and schedule, from ``columns``."""
    from mgd_ray.study.config import load_study

    study = load_study(args.project)
    workers = study.resources.workers
    crop, sched = study.data.crop_size, study.schedule
    labeled, unlabeled = sched.batch_labeled * workers, sched.batch_unlabeled * workers
    pixels = (crop / args.crop) ** 2

    def scaled(name: str, size: float) -> float:
        images = labeled if name.endswith("/pl_l") else unlabeled  # pl_l: x_l; every other column: x_mix
        grow = pixels if name.endswith(("/pl_l", "/pl_mix")) else 1.0  # pooled columns do not grow with the crop
        return size / args.batch * images * grow

    def summary(at_scale: dict[str, float]) -> str:
        per_step = sum(at_scale.values())
        rate = per_step / (args.project_step_ms / 1e3)
        return (
            f"{per_step / 2**20:.2f} MiB per step; {per_step * sched.iterations / 2**30:.1f} GiB for the schedule; "
            f"{rate / 2**20:.0f} MiB/s read per trial at {args.project_step_ms:g} ms per cached step"
        )

    measured = {name: scaled(name, size) for name, size in columns.items()}
    clean = mask_bytes_per_pixel(crop)
    as_masks = {
        name: (labeled if name.endswith("/pl_l") else unlabeled) * crop * crop * clean
        if name.endswith(("/pl_l", "/pl_mix"))
        else size
        for name, size in measured.items()
    }
    return [
        f"projection for {args.project.name} ({crop}² crops, {labeled} labeled + {unlabeled} unlabeled images per "
        f"step over {workers} workers, {sched.iterations} iterations):",
        f"  as measured here (random teachers' labels, {8 * columns.get('T_D/pl_mix', 0) / args.batch / args.crop**2:.2f} "
        f"bits per pixel): {summary(measured)}",
        "    by column: " + ", ".join(f"{k} {v / 2**10:.0f} KiB" for k, v in measured.items()),
        f"  with labels as clean as ground-truth masks ({8 * clean:.3f} bits per pixel at {crop}²): {summary(as_masks)}",
    ]


def matmul_gflops(device: torch.device, n: int, reps: int = 5, dtype: torch.dtype = torch.float32) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="resnet18")
    p.add_argument("--t-d", default="resnet101")
    p.add_argument("--t-w", default="wide_resnet50_2")
    p.add_argument("--batch", type=int, default=2, help="labeled and unlabeled batch size")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--pool-size", type=int, default=7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--matmul", type=int, default=None, help="matmul size (default 4096 on GPU, 2048 on CPU)")
    p.add_argument(
        "--onednn-cache",
        type=int,
        default=None,
        help="ONEDNN_PRIMITIVE_CACHE_CAPACITY for the rows (CPU). oneDNN's default of 1024 primitives is too few "
        "for two teachers + a student: primitives are rebuilt every step and CPU steps run many times slower",
    )
    p.add_argument(
        "--fast-precision",
        choices=("fp32", "bf16"),
        default=None,
        help="teacher precision of the 'fast' row (default: bf16 on GPU, fp32 on CPU)",
    )
    p.add_argument(
        "--project",
        type=Path,
        default=Path(__file__).parents[1] / "studies" / "paper_table1_voc_resnet18.yaml",
        help="the paper study whose cache the cache row projects",
    )
    p.add_argument("--project-step-ms", type=float, default=34.0, help="GPU cached step time for the read bandwidth")
    p.add_argument("--trained-teachers", type=Path, help="DIR/T_D/model.pt, DIR/T_W/model.pt: bf16 agreement")
    p.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = p.parse_args()
    if args.row is not None:
        print("RESULT " + json.dumps(run_row(args)), flush=True)
        return

    results = {}
    for row in args.rows:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--row", row]
        env = dict(os.environ)
        if args.onednn_cache is not None:
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(args.onednn_cache)
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"row {row} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[row] = json.loads(line.removeprefix("RESULT "))
    device = torch.device(args.device)
    n = args.matmul or (4096 if device.type == "cuda" else 2048)
    peak = matmul_gflops(device, n)
    peak_bf16 = matmul_gflops(device, n, dtype=torch.bfloat16)

    print(
        f"\nbench_step: student {args.student}, T_D {args.t_d}, T_W {args.t_w}, batch {args.batch}+{args.batch}, "
        f"crop {args.crop}, {args.steps} timed steps after {args.warmup} warm-up, {args.device} ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, oneDNN primitive cache {args.onednn_cache or os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY', 'default (1024)')}"
    )
    mem = "peak GPU mem" if device.type == "cuda" else "max RSS"
    header = f"{'step':<58} {'ms/step':>9} {'images/s':>9} {'vs ref':>7} {'teacher share':>14} {mem:>12}"
    print(header)
    print("-" * len(header))
    ref = results.get("reference")
    for row, r in results.items():
        speedup = f"{ref['step_s'] / r['step_s']:.2f}x" if ref else "-"
        print(
            f"{LABELS[row]:<58} {1e3 * r['step_s']:>9.1f} {r['images_per_s']:>9.2f} {speedup:>7} "
            f"{100 * r['teacher_s'] / r['step_s']:>13.1f}% {r['peak_bytes'] / 2**20:>9.0f} MiB"
        )
    cached = results.get("cache")
    if cached is not None:
        print(
            f"\ncache size: {cached['cache_bytes_per_step'] / 1024:.1f} KiB per step (Parquet, zstd) = "
            f"{cached['cache_bytes_per_step'] / (2 * args.batch) / 1024:.1f} KiB per unlabeled image"
        )
        for line in project_cache(cached["column_bytes_per_step"], args):
            print(line)
        flops = cached["student_flops"]
        print(f"student step (fwd+bwd, x_l and x_mix): {flops / 1e9:.2f} GFLOP")
        for row, r in results.items():
            student_s = r["step_s"] - r["teacher_s"]
            print(
                f"  {LABELS[row]:<58} student part {1e3 * student_s:8.1f} ms = {flops / student_s / 1e9:7.1f} GFLOP/s "
                f"({100 * flops / student_s / 1e9 / peak:.0f}% of matmul)"
            )
    if args.trained_teachers is not None:
        print("bf16 teachers on trained weights:")
        for line in trained_agreement(args.trained_teachers, device):
            print(line)
    print(f"fp32 matmul {n}×{n}: {peak:.1f} GFLOP/s; bf16: {peak_bf16:.1f} GFLOP/s (bf16 units: {bf16_units(device)})")


if __name__ == "__main__":
    main()
