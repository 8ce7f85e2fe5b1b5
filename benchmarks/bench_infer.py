"""Inference speed of the students and the teachers: eager PyTorch against ONNX Runtime, on CPU with one
thread and with all of them, and on CUDA when present. Not a test: it prints a table.

    python benchmarks/bench_infer.py                 # 512×512, 64×64 and 32×32 (the quickstart's crop)
    python benchmarks/bench_infer.py --quick         # 3 timed runs per cell instead of 20
    python benchmarks/bench_infer.py --models resnet18 mobilenet_v2 --sizes 512 --batch 8

Latency is the wall time of one forward pass of a ``--batch`` batch (default 1) after warm-up, at
p50/p95; images/s = batch / mean latency. Each network is exported to ONNX once (dynamic shapes,
``mgd_ray.export.write_onnx``) and reused for every size. Weights are random: speed does not depend on
them. DeepLabv3+ at output stride 16 unless ``--output-stride`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mgd_ray.export import write_onnx
from mgd_ray.models.deeplab import DeepLabV3Plus, build_segmenter

MODELS = {"resnet18": "student", "mobilenet_v2": "student", "resnet101": "teacher", "wide_resnet50_2": "teacher"}


@dataclass(frozen=True)
class Row:
    model: str
    role: str
    size: int
    engine: str
    device: str
    threads: str
    batch: int
    p50_ms: float
    p95_ms: float
    images_per_s: float


def time_ms(run: Callable[[], object], reps: int, warmup: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    """Wall times (ms) of ``reps`` calls of ``run`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
        sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return times


def row(model: str, size: int, engine: str, device: str, threads: str, batch: int, times: list[float]) -> Row:
    p50, p95 = np.percentile(times, [50, 95])
    return Row(
        model, MODELS.get(model, "?"), size, engine, device, threads, batch, p50, p95, batch * 1000 / np.mean(times)
    )


def bench_torch(net: DeepLabV3Plus, x: torch.Tensor, device: str, reps: int, warmup: int) -> list[float]:
    net = net.to(device)
    x = x.to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        return time_ms(lambda: net(x).logits, reps, warmup, sync)


def ort_session(path: Path, threads: int, provider: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=[provider])


def bench_ort(path: Path, x: torch.Tensor, threads: int, provider: str, reps: int, warmup: int) -> list[float]:
    session = ort_session(path, threads, provider)
    feed = {"image": x.numpy()}
    return time_ms(lambda: session.run(None, feed), reps, warmup)


def bench_cells(
    net: DeepLabV3Plus,
    onnx_path: Path | None,
    x: torch.Tensor,
    cpu_threads: list[int],
    cuda: bool,
    reps: int,
    warmup: int,
) -> Iterator[tuple[str, str, str, list[float]]]:
    """(engine, device, threads, times) for every engine × device × CPU thread count, one by one."""
    for threads in cpu_threads:
        label = "1" if threads == 1 else f"all ({threads})"
        torch.set_num_threads(threads)
        yield "pytorch", "cpu", label, bench_torch(net, x, "cpu", reps, warmup)
        if onnx_path is not None:  # 0: ONNX Runtime's default, one thread per physical core
            yield (
                "onnxruntime",
                "cpu",
                label,
                bench_ort(onnx_path, x, 1 if threads == 1 else 0, "CPUExecutionProvider", reps, warmup),
            )
    torch.set_num_threads(max(cpu_threads))
    if cuda:
        yield "pytorch", "cuda", "-", bench_torch(net, x, "cuda", reps, warmup)
        net.cpu()
        if onnx_path is not None and "CUDAExecutionProvider" in ort.get_available_providers():
            yield "onnxruntime", "cuda", "-", bench_ort(onnx_path, x, 0, "CUDAExecutionProvider", reps, warmup)


def format_table(rows: list[Row]) -> str:
    header = f"{'model':<16} {'role':<8} {'size':>5} {'engine':<12} {'device':<6} {'threads':>7} {'batch':>5} {'p50 ms':>9} {'p95 ms':>9} {'img/s':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.model:<16} {r.role:<8} {r.size:>5} {r.engine:<12} {r.device:<6} {r.threads:>7} {r.batch:>5} "
            f"{r.p50_ms:>9.2f} {r.p95_ms:>9.2f} {r.images_per_s:>8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 64, 32])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--output-stride", type=int, default=16, choices=(8, 16, 32))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="3 timed runs after 1 warm-up per cell")
    parser.add_argument("--no-onnx", action="store_true", help="eager PyTorch only")
    args = parser.parse_args(argv)
    reps, warmup = (3, 1) if args.quick else (args.reps, args.warmup)
    all_threads = torch.get_num_threads()
    cpu_threads = sorted({1, all_threads})
    cuda = torch.cuda.is_available()
    print(
        f"torch {torch.__version__} ({all_threads} threads, {os.cpu_count()} CPUs), onnxruntime {ort.__version__}, "
        f"CUDA: {torch.cuda.get_device_name() if cuda else 'none'}; {reps} timed runs after {warmup} warm-up",
        file=sys.stderr,
    )
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        for name in args.models:
            torch.manual_seed(0)
            net = build_segmenter(name, args.num_classes, args.output_stride).eval()
            onnx_path = None
            if not args.no_onnx:
                start = time.perf_counter()
                onnx_path = write_onnx(net, Path(tmp) / f"{name}.onnx")
                print(f"{name}: exported to ONNX in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            for size in args.sizes:
                x = torch.randn(args.batch, 3, size, size)
                for engine, device, threads, times in bench_cells(net, onnx_path, x, cpu_threads, cuda, reps, warmup):
                    rows.append(row(name, size, engine, device, threads, args.batch, times))
                    print(format_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
