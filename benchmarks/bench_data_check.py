"""Time of the data check (``mgd_ray.data.check``) on a dataset the size of VOC's train_aug.

Generates N (default 10,582) image/mask pairs of VOC's typical size (500×375 JPEG, q 90, with
texture and noise, and an L-mode PNG mask of a few class regions), every image labeled (the most a
check reads), then times, side by side in one run: the first check with one thread, the first
check with every CPU, and a second check that the verdict cache serves. Prints the table; not a
test.

    python benchmarks/bench_data_check.py [--images 10582] [--width 500 --height 375] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mgd_ray.data.check import CACHE_FILE, check_manifest
from mgd_ray.data.datasets import Sample
from mgd_ray.data.partitions import build_manifest, write_manifest

CLASSES = [f"class_{i}" for i in range(21)]


def generate(root: Path, n: int, width: int, height: int) -> list[Sample]:
    """N pairs from 16 textured base images, each shifted, so every file is its own JPEG stream."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    bases = []
    for k in range(16):
        gradient = np.stack([(xx * 0.5 + 16 * k) % 256, (yy * 0.7) % 256, ((xx + yy) * 0.3 + k) % 256], -1)
        bases.append((gradient + rng.normal(0, 18, (height, width, 3))).clip(0, 255).astype(np.uint8))
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    samples = []
    for i in range(n):
        image = np.roll(bases[i % 16], shift=(i * 7) % width, axis=1)
        mask = np.zeros((height, width), np.uint8)
        for c in rng.integers(1, 21, 2):
            y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
            mask[y0 : y0 + height // 3, x0 : x0 + width // 3] = c
        mask[:, :2] = 255
        sample = Sample(f"{i:06d}", root / "images" / f"{i:06d}.jpg", root / "labels" / f"{i:06d}.png")
        Image.fromarray(image).save(sample.image, quality=90)
        Image.fromarray(mask, mode="L").save(sample.label)
        samples.append(sample)
    return samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_582)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--keep", default=None, help="generate into this folder and keep it (default: a temp dir)")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mgd_bench_check_")) / "data"
    start = time.perf_counter()
    samples = generate(root, args.images, args.width, args.height)
    size = sum(s.image.stat().st_size + s.label.stat().st_size for s in samples)
    print(f"generated {args.images:,} pairs of {args.width}×{args.height} in {time.perf_counter() - start:.0f} s, "
          f"{size / 2**30:.2f} GiB, under {root}", flush=True)  # fmt: skip
    meta = {"dataset": "folder", "root": str(root), "num_classes": len(CLASSES), "class_names": CLASSES}
    meta |= {"partition": "given", "fraction": 1.0, "seed": 0}
    val = samples[: len(samples) // 8]
    train = samples[len(val) :]
    table = build_manifest(train, val, [s.id for s in train], [], meta)
    path = write_manifest(table, root / "manifest.parquet")
    cpus = os.cpu_count() or 1
    rows = []
    for label, threads, cache in (
        ("first check, 1 thread", 1, None),
        (f"first check, {cpus} threads", cpus, root / CACHE_FILE),
        ("second check (cached)", cpus, root / CACHE_FILE),
    ):
        report = check_manifest(table, path, len(CLASSES), CLASSES, cache, threads)
        assert report.ok, report.text()
        rows.append((label, report.seconds, report.read))
    print(f"\n{'data check of ' + format(args.images, ',') + ' images':34s} {'seconds':>8s} {'files read':>10s} "
          f"{'ms/image':>9s} {'vs 1 thread':>11s}")  # fmt: skip
    for label, seconds, read in rows:
        print(
            f"{label:34s} {seconds:8.1f} {read:10,d} {1000 * seconds / args.images:9.2f} {rows[0][1] / seconds:10.1f}x"
        )
    if not args.keep:
        shutil.rmtree(root.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
