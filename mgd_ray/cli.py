"""`mgd-ray` command line: parse, validate, call into the package. No logic of its own."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from mgd_ray.config import BackboneName

BACKBONES: tuple[str, ...] = get_args(BackboneName)


def _cmd_models(args: argparse.Namespace) -> int:
    from mgd_ray.models.complexity import complexity_table, format_table

    rows = complexity_table(
        backbones=args.backbones,
        num_classes=args.num_classes,
        input_size=(args.size, args.size),
        output_stride=args.output_stride,
        stem=args.stem,
    )
    print(format_table(rows))
    return 0


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from mgd_ray.data.partitions import manifest_meta, prepare_builtin, read_manifest

    if args.dataset != "builtin":
        raise SystemExit(f"mgd-ray data prepare: dataset {args.dataset!r} is not supported yet")
    path = prepare_builtin(Path(args.root), seed=args.seed, fraction=args.fraction)
    table = read_manifest(path)
    meta = manifest_meta(table)
    subsets = table.column("subset").to_pylist()
    counts = {name: subsets.count(name) for name in ("labeled", "unlabeled", "val")}
    print(f"manifest: {path}")
    print(f"classes ({meta['num_classes']}): {', '.join(meta['class_names'])}")
    print("samples: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from ray.train import ScalingConfig

    from mgd_ray.config import ConfigError, load_job_config
    from mgd_ray.train import run_job

    try:
        cfg = load_job_config(args.config, args.kind)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    scaling = ScalingConfig(
        num_workers=args.workers,
        use_gpu=args.gpus,
        resources_per_worker={"CPU": args.cpus_per_worker} | ({"GPU": 1} if args.gpus else {}),
    )
    out = run_job(cfg, scaling, storage_path=args.storage, name=args.name, max_failures=args.max_failures)
    print(f"val/mIoU {out.metrics.get('val/mIoU', float('nan')):.4f} after {out.metrics.get('step')} steps")
    print(f"model: {out.model_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgd-ray",
        description="Multi-Granularity Distillation for lightweight semi-supervised segmentation.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="print params and FLOPs of backbones and whole segmenters")
    models.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    models.add_argument("--size", type=int, default=512, help="square input size (default 512, the paper's)")
    models.add_argument("--num-classes", type=int, default=21)
    models.add_argument("--output-stride", type=int, default=16, choices=(8, 16, 32))
    models.add_argument("--stem", default="plain", choices=("plain", "deep"))
    models.set_defaults(func=_cmd_models)

    train = sub.add_parser("train", help="run one training job on Ray Train (outside a study)")
    train.add_argument("kind", choices=("teacher", "student", "baseline"))
    train.add_argument("--config", required=True, help="YAML job file (see studies/jobs/)")
    train.add_argument("--workers", type=int, default=1, help="DDP workers (default 1)")
    train.add_argument("--gpus", action="store_true", help="one GPU per worker (NCCL); CPU + gloo otherwise")
    train.add_argument("--cpus-per-worker", type=float, default=1.0)
    train.add_argument("--storage", default="mgd_ray_runs/ray", help="Ray Train storage path for checkpoints")
    train.add_argument("--name", default=None, help="run name; rerunning a name resumes it")
    train.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before giving up")
    train.set_defaults(func=_cmd_train)

    data = sub.add_parser("data", help="dataset preparation")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser("prepare", help="build a dataset's files and its Parquet manifest")
    prepare.add_argument("dataset", choices=("builtin",))
    prepare.add_argument("--root", required=True, help="directory to write the dataset and manifest into")
    prepare.add_argument("--fraction", default="1/16", help="labeled fraction: 1/16, 1/8, 1/4 or 1/2")
    prepare.add_argument("--seed", type=int, default=0)
    prepare.set_defaults(func=_cmd_data_prepare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
