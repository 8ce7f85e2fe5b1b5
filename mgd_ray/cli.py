"""`mgd-ray` command line: parse, validate, call into the package. No logic of its own.

Each command imports what it needs when it runs, so `mgd-ray validate` and `--help` answer without
loading torch, Ray or MLflow.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from mgd_ray.config import BackboneName
from mgd_ray.files import atomic_write

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
    from mgd_ray.data.datasets import DatasetError
    from mgd_ray.data.partitions import manifest_meta, prepare_builtin, read_manifest

    if args.dataset != "voc" and (args.download or args.protocol != "classic"):
        print(
            "mgd-ray data prepare: --download and --protocol apply to voc only (Cityscapes needs a login: "
            "download its two zips into --root yourself)",
            file=sys.stderr,
        )
        return 2
    try:
        if args.dataset == "voc":
            from mgd_ray.data.prepare_voc import prepare_voc

            print(prepare_voc(Path(args.root), args.fraction, args.protocol, download=args.download).summary())
            return 0
        if args.dataset == "cityscapes":
            from mgd_ray.data.prepare_cityscapes import prepare_cityscapes

            print(prepare_cityscapes(Path(args.root), args.fraction).summary())
            return 0
        path = prepare_builtin(Path(args.root), seed=args.seed, fraction=args.fraction)
    except DatasetError as err:
        print(f"mgd-ray data prepare {args.dataset}: {err}", file=sys.stderr)
        return 2
    table = read_manifest(path)
    meta = manifest_meta(table)
    subsets = table.column("subset").to_pylist()
    counts = {name: subsets.count(name) for name in ("labeled", "unlabeled", "val")}
    print(f"manifest: {path}")
    print(f"classes ({meta['num_classes']}): {', '.join(meta['class_names'])}")
    print("samples: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from mgd_ray.config import DataConfig, absolute_paths
    from mgd_ray.data.check import check_data
    from mgd_ray.data.datasets import DatasetError

    failed = 0
    for target in args.targets:
        if Path(target).is_dir():  # a folder dataset's root, with its default roles
            data = DataConfig(dataset="folder", root=Path(target))
        else:
            study = _load_study(target)
            if study is None:
                failed += 1
                continue
            data = study.data
        try:
            report = check_data(absolute_paths(data, Path.cwd()))
        except DatasetError as err:  # the manifest cannot even be built: a list or folder problem
            print(f"mgd-ray data check {target}: {err}", file=sys.stderr)
            failed += 1
            continue
        print(report.text())
        failed += not report.ok
    return 1 if failed else 0


def _cmd_init(args: argparse.Namespace) -> int:
    import torch

    from mgd_ray.data.datasets import DatasetError
    from mgd_ray.study.template import folder_study, online

    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"mgd-ray init: {out} exists; choose another --out or pass --force to replace it", file=sys.stderr)
        return 2
    pretrained = {"imagenet": True, "none": False}.get(args.pretrained)
    if pretrained is None:
        pretrained = online()
    gpus = torch.cuda.device_count() if args.gpus is None else args.gpus
    try:
        text = folder_study(Path(args.data), pretrained, gpus)
    except DatasetError as err:
        print(f"mgd-ray init: {err}", file=sys.stderr)
        return 2
    study = _load_study_text(text, str(out))
    if study is None:  # a bug, not the user's: the template must always validate
        return 1
    atomic_write(out, lambda temporary: temporary.write_text(text))
    print(
        f"wrote {out}: study {study.name!r} of {args.data}; check it with `mgd-ray data check {out}`, run it with `mgd-ray run {out}`"
    )
    return 0


def _load_study_text(text: str, source: str):  # -> StudyConfig | None
    import yaml

    from mgd_ray.config import ConfigError
    from mgd_ray.study.config import parse_study

    try:
        return parse_study(yaml.safe_load(text), source)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return None


def _cmd_train(args: argparse.Namespace) -> int:
    from mgd_ray.config import ConfigError, load_job_config
    from mgd_ray.train import run_job, scaling_config

    try:
        cfg = load_job_config(args.config, args.kind)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    scaling = scaling_config(args.workers, args.cpus_per_worker, 1.0 if args.gpus else 0.0)
    out = run_job(cfg, scaling, storage_path=args.storage, name=args.name, max_failures=args.max_failures)
    metric = "pretrain/label_accuracy" if cfg.kind == "pretrain" else "val/mIoU"
    print(f"{metric} {out.metrics.get(metric, float('nan')):.4f} after {out.metrics.get('step')} steps")
    print(f"model: {out.model_path}")
    return 0


def _load_study(path: str, smoke: bool = False):  # -> StudyConfig | None
    from mgd_ray.config import ConfigError
    from mgd_ray.study.config import load_study
    from mgd_ray.study.smoke import smoke as shrink

    try:
        study = load_study(path)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return None
    return shrink(study) if smoke else study


def _cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.studies:
        study = _load_study(path)
        if study is None:
            failed += 1
            continue
        searched = ", ".join(study.search.searched()) or "nothing (repeats of the default configuration)"
        print(
            f"{path}: valid study {study.name!r}: teachers {', '.join(study.teachers)}; student {study.student.backbone}; "
            f"{study.searcher.num_samples} trials over {searched}; baselines "
            f"{', '.join(b.name for b in study.baselines) or 'none'}; seeds {study.seeds}"
        )
    return 1 if failed else 0


def _study_for(args: argparse.Namespace, smoke: bool = False):  # -> StudyConfig | None
    """The study file with the command line's --tracking-uri and --storage, on the --address cluster."""
    study = _load_study(args.study, smoke)
    if study is None:
        return None
    if args.tracking_uri:
        study = study.model_copy(update={"mlflow": study.mlflow.model_copy(update={"tracking_uri": args.tracking_uri})})
    if args.storage:
        study = study.model_copy(update={"storage_path": args.storage})
    if args.address:
        from mgd_ray import tracking
        from mgd_ray.ray_connect import connect_ray

        tracking.require_reachable(tracking.resolve_tracking_uri(study.mlflow.tracking_uri, Path.cwd()))
        connect_ray(args.address)
    return study


def _cmd_run(args: argparse.Namespace) -> int:
    from mgd_ray.data.datasets import DatasetError
    from mgd_ray.study.records import StudyRecordError
    from mgd_ray.study.run import run_study, run_table
    from mgd_ray.study.search import SearchStorageError, WarmStartError
    from mgd_ray.tracking import TrackingError

    try:
        study = _study_for(args, args.smoke)
        if study is None:
            return 2
        run = run_table if study.data.partitions else run_study
        report = run(study, source=Path(args.study), resume=args.resume)
    except (TrackingError, SearchStorageError, StudyRecordError, WarmStartError, DatasetError) as err:
        # found before any training: one line, no traceback
        print(err, file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from mgd_ray.data.datasets import DatasetError
    from mgd_ray.study.records import StudyRecordError
    from mgd_ray.study.run import pretrain_study
    from mgd_ray.study.search import SearchStorageError, WarmStartError
    from mgd_ray.tracking import TrackingError

    try:
        study = _study_for(args)
        if study is None:
            return 2
        done = pretrain_study(study, source=Path(args.study))
    except (TrackingError, SearchStorageError, StudyRecordError, WarmStartError, DatasetError) as err:
        print(err, file=sys.stderr)
        return 2
    if not done:
        print(f"{args.study}: no model has pretrained: builtin (or every teacher that has is already trained)")
    for label, entry in done.items():
        accuracy = entry.get("pretrain/label_accuracy")
        scored = f", label accuracy {100 * accuracy:.1f} %" if accuracy is not None else ""
        print(f"{label}: {entry['path']} ({entry['source']}{scored})")
    return 0


def _model_arg(args: argparse.Namespace) -> tuple[Path, list[str] | None]:
    """The local checkpoint MODEL names, and the class list --classes expects (None without it)."""
    from mgd_ray.data.datasets import read_class_names
    from mgd_ray.predict import resolve_model
    from mgd_ray.tracking import resolve_tracking_uri

    classes = read_class_names(Path(args.classes)) if args.classes else None
    return resolve_model(args.model, resolve_tracking_uri(args.tracking_uri, Path.cwd())), classes


def _window_arg(value: str) -> int | str | None:
    if value in ("auto", "none"):
        return None if value == "none" else value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected auto, none or a window size in pixels, got {value!r}")


def _cmd_predict(args: argparse.Namespace) -> int:
    from mgd_ray import predict
    from mgd_ray.data.datasets import DatasetError

    try:
        path, classes = _model_arg(args)
        seg = predict.load_checkpoint(path, expect_classes=classes, device=args.device)
        print(f"model: {seg.describe()}")
        images = [Path(p) for p in args.images]
        written = predict.predict_files(seg, images, Path(args.out), window=args.window, batch_size=args.batch)
    except (predict.CheckpointError, predict.ImageError, DatasetError) as err:
        print(f"mgd-ray predict: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} masks and overlays to {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mgd_ray.data.datasets import DatasetError
    from mgd_ray.export import ExportError, export_onnx, export_torchscript
    from mgd_ray.predict import CheckpointError

    try:
        path, classes = _model_arg(args)
        options = {"allow_teacher": args.allow_teacher, "expect_classes": classes}
        if args.format == "onnx":
            out = export_onnx(path, Path(args.out), opset=args.opset, **options)
        else:
            out = export_torchscript(path, Path(args.out), **options)
    except (CheckpointError, ExportError, DatasetError) as err:
        print(f"mgd-ray export: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format}; input (N, 3, H, W) normalised RGB, output (N, C, H, W) logits)")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from mgd_ray import tracking
    from mgd_ray.study.compare import write_compare
    from mgd_ray.study.records import StudyRecordError

    uri = tracking.resolve_tracking_uri(args.tracking_uri, Path.cwd())
    try:
        tracking.require_reachable(uri)
        text, files = write_compare(uri, args.studies, Path(args.out))
    except (tracking.TrackingError, StudyRecordError) as err:
        print(err, file=sys.stderr)
        return 2
    print(text)
    print("wrote " + ", ".join(str(f) for f in files))
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
    train.add_argument("kind", choices=("teacher", "student", "baseline", "pretrain"))
    train.add_argument("--config", required=True, help="YAML job file (see studies/jobs/)")
    train.add_argument("--workers", type=int, default=1, help="DDP workers (default 1)")
    train.add_argument("--gpus", action="store_true", help="one GPU per worker (NCCL); CPU + gloo otherwise")
    train.add_argument("--cpus-per-worker", type=float, default=1.0)
    train.add_argument("--storage", default="mgd_ray_runs/ray", help="Ray Train storage path for checkpoints")
    train.add_argument("--name", default=None, help="run name; rerunning a name resumes it")
    train.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before giving up")
    train.set_defaults(func=_cmd_train)

    run = sub.add_parser("run", help="run a whole study: teachers, baselines, Optuna search, report (MLflow)")
    run.add_argument("study", help="study file (see studies/)")
    run.add_argument("--resume", action="store_true", help="continue the last interrupted run of this study")
    run.add_argument("--smoke", action="store_true", help="the same study shrunk to seconds on tiny built-in data")
    run.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (overrides the study's mlflow.tracking_uri)"
    )
    run.add_argument("--storage", default=None, help="storage path (overrides the study's storage_path)")
    run.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, or a local Ray)")
    run.set_defaults(func=_cmd_run)

    pretrain = sub.add_parser(
        "pretrain", help="pretrain a study's `pretrained: builtin` backbones on the built-in corpus (MLflow)"
    )
    pretrain.add_argument("study", help="study file (see studies/)")
    pretrain.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (overrides the study's)")
    pretrain.add_argument("--storage", default=None, help="storage path (overrides the study's storage_path)")
    pretrain.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, or a local Ray)")
    pretrain.set_defaults(func=_cmd_pretrain)

    init = sub.add_parser("init", help="write a study file for a folder of partly labeled images")
    init.add_argument(
        "--data", required=True, help="the folder: images/, labels/ (masks of the labeled images), classes.txt"
    )
    init.add_argument("--out", default="study.yaml", help="the study file to write (default study.yaml)")
    init.add_argument("--pretrained", default="auto", choices=("auto", "imagenet", "none"),
                      help="ImageNet weights: auto = when they can be downloaded from here")  # fmt: skip
    init.add_argument("--gpus", type=int, default=None, help="GPUs per job (default: this machine's)")
    init.add_argument("--force", action="store_true", help="replace --out if it exists")
    init.set_defaults(func=_cmd_init)

    validate = sub.add_parser("validate", help="check study files and report every error; runs nothing")
    validate.add_argument("studies", nargs="+")
    validate.set_defaults(func=_cmd_validate)

    data = sub.add_parser("data", help="dataset preparation")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prepare = data_sub.add_parser("prepare", help="build a dataset's files and its Parquet manifest")
    prepare.add_argument("dataset", choices=("builtin", "voc", "cityscapes"))
    prepare.add_argument(
        "--root",
        required=True,
        help="builtin: where to generate it; voc: holds (or receives) the VOC and SBD archives; "
        "cityscapes: holds leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip",
    )
    prepare.add_argument("--fraction", default="1/16", help="labeled fraction: 1/16, 1/8, 1/4 or 1/2")
    prepare.add_argument("--seed", type=int, default=0, help="partition seed (builtin)")
    prepare.add_argument(
        "--protocol",
        default="classic",
        choices=("classic", "pseudoseg"),
        help="voc: train_aug partitions (classic) or PseudoSeg's few-label ones",
    )
    prepare.add_argument(
        "--download",
        action="store_true",
        help="voc: download VOC2012 (2 GB) and SBD (1.4 GB) when they are not in --root",
    )
    prepare.set_defaults(func=_cmd_data_prepare)
    check = data_sub.add_parser(
        "check", help="read every image and mask of a study's data once; report every problem and the pixels per class"
    )
    check.add_argument(
        "targets",
        nargs="+",
        help="study files, or folder dataset roots (images/, labels/, classes.txt); studies run this check themselves",
    )
    check.set_defaults(func=_cmd_data_check)

    model_help = "checkpoint file (model.pt), MLflow run id, or models:/name/version"
    classes_help = "class list file (one name per line): refuse a checkpoint trained on other classes"
    uri_help = "MLflow tracking URI to look run ids and models:/ URIs up in (default sqlite:///mlflow.db)"
    predict = sub.add_parser("predict", help="segment images: a colour mask and an overlay PNG per image")
    predict.add_argument("model", help=model_help)
    predict.add_argument("images", nargs="+", help="image files or folders of them (jpg/png)")
    predict.add_argument("--out", required=True, help="folder for <name>.png masks and <name>_overlay.png")
    predict.add_argument("--batch", type=int, default=4, help="images per forward pass (default 4)")
    predict.add_argument(
        "--window",
        type=_window_arg,
        default="auto",
        help="sliding window: auto (the training crop, for larger images), none, or a size",
    )
    predict.add_argument("--classes", default=None, help=classes_help)
    predict.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    predict.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help=uri_help)
    predict.set_defaults(func=_cmd_predict)

    export = sub.add_parser("export", help="export a student to ONNX or TorchScript (dynamic batch and size)")
    export.add_argument("model", help=model_help)
    export.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    export.add_argument("--out", required=True, help="file to write")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    export.add_argument("--allow-teacher", action="store_true", help="export a teacher checkpoint too")
    export.add_argument("--classes", default=None, help=classes_help)
    export.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help=uri_help)
    export.set_defaults(func=_cmd_export)

    compare = sub.add_parser("compare", help="best configuration, mIoU and cost of several studies, side by side")
    compare.add_argument("studies", nargs="+", help="study names (each one's newest finished run) or parent run ids")
    compare.add_argument("--out", default="compare", help="folder for compare.md and compare.png (default compare/)")
    compare.add_argument(
        "--tracking-uri", default="sqlite:///mlflow.db", help="MLflow tracking URI the studies ran with"
    )
    compare.set_defaults(func=_cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
