"""Which training images are labeled: the literature's shipped lists, seeded partitions, Parquet manifests.

A manifest is the one artefact a training job reads: one row per sample with absolute paths, the
subset it belongs to, and (as schema metadata) the dataset, classes and partition it came from.
Unlabeled rows carry no label path, so no job can read their labels by accident.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mgd_ray.config import labeled_share
from mgd_ray.data.builtin import generate_builtin
from mgd_ray.data.datasets import (
    CITYSCAPES_CLASSES,
    SUBSETS,
    VOC_CLASSES,
    DatasetError,
    Sample,
    cityscapes_samples,
    folder_samples,
    load_mask,
    read_id_list,
    read_pair_list,
    voc_samples,
)
from mgd_ray.files import atomic_write

SPLITS_DIR = Path(__file__).with_name("splits")
STANDARD_FRACTIONS = ("1-16", "1-8", "1-4", "1-2")
# (dataset, protocol) → the list of all its training images, and the prefix of its partition lists
TRAIN_LISTS = {
    ("voc", "classic"): "train_aug.txt",
    ("voc", "pseudoseg"): "train.txt",
    ("cityscapes", "classic"): "train.txt",
}
LIST_PREFIXES = {
    ("voc", "classic"): "train_aug",
    ("voc", "pseudoseg"): "pseudoseg",
    ("cityscapes", "classic"): "train_aug",
}
MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("label_path", pa.string()),
        pa.field("split", pa.string(), nullable=False),
        pa.field("subset", pa.string(), nullable=False),
    ]
)
META_KEY = b"mgd_ray"
META_KEYS = ("dataset", "root", "num_classes", "class_names", "partition", "fraction", "seed")

DatasetName = Literal["voc", "cityscapes"]
Protocol = Literal["classic", "pseudoseg"]


def parse_fraction(fraction: str | float) -> tuple[str, float]:
    """'1/16', '1-16', '0.0625' or 0.0625 → ('1-16', 0.0625); the name is safe in file names."""
    value = labeled_share(str(fraction).strip())
    if value is None:
        raise DatasetError(f"labeled fraction {fraction!r}: write it as '1/16', '1-16' or 0.0625, in (0, 1]")
    inverse = 1 / value
    name = f"1-{round(inverse)}" if abs(inverse - round(inverse)) < 1e-9 else f"{value:g}"
    return name, value


def split_list_path(dataset: DatasetName, name: str) -> Path:
    """Path of a shipped split list, e.g. split_list_path('voc', 'val.txt')."""
    path = SPLITS_DIR / dataset / name
    if not path.is_file():
        shipped = sorted(p.name for p in (SPLITS_DIR / dataset).glob("*.txt"))
        raise DatasetError(f"{path}: no such shipped list; {dataset} has {shipped}")
    return path


def _list_ids(dataset: DatasetName, path: Path) -> list[str]:
    """VOC lists hold ids; Cityscapes lists hold path pairs whose image stem is the id."""
    if dataset == "voc":
        return read_id_list(path)
    return [Path(image).stem for _, image, _ in read_pair_list(path)]


def protocol_key(dataset: str, protocol: str) -> tuple[str, str]:
    key = (dataset, protocol)
    if key not in TRAIN_LISTS:
        raise DatasetError(
            f"no shipped '{protocol}' protocol for dataset '{dataset}'; available: "
            + ", ".join(f"{d}/{p}" for d, p in TRAIN_LISTS)
        )
    return key


def standard_split(dataset: DatasetName, protocol: Protocol, fraction: str | float) -> tuple[list[str], list[str]]:
    """(labeled ids, unlabeled ids) of a shipped partition; Cityscapes ids are image stems.

    An id in both lists is labeled: the PseudoSeg lists repeat their last labeled id in the
    unlabeled list, which would otherwise give 1,465 images for VOC's 1,464.
    """
    key = protocol_key(dataset, protocol)
    name, _ = parse_fraction(fraction)
    if name not in STANDARD_FRACTIONS:
        raise DatasetError(
            f"no shipped {dataset}/{protocol} partition for {fraction!r}; use one of {STANDARD_FRACTIONS}"
        )
    prefix = LIST_PREFIXES[key]
    labeled = _list_ids(dataset, split_list_path(dataset, f"{prefix}_labeled_{name}.txt"))
    labeled_set = set(labeled)
    unlabeled = _list_ids(dataset, split_list_path(dataset, f"{prefix}_unlabeled_{name}.txt"))
    return labeled, [i for i in unlabeled if i not in labeled_set]


def labeled_count(fraction: float, num_samples: int) -> int:
    """max(1, fraction·N rounded half up)."""
    return max(1, math.floor(fraction * num_samples + 0.5))


def generate_partition(
    samples: Sequence[Sample], fraction: str | float, seed: int, num_classes: int
) -> tuple[list[str], list[str]]:
    """Seeded, class-covering split of training samples into (labeled ids, unlabeled ids).

    Algorithm: read every mask's class-presence vector (255 ignored); shuffle the samples with
    `default_rng(seed)`; while the labeled budget (`labeled_count`) lasts and some class present in
    the training set is not yet covered, take the sample that covers the most uncovered classes
    (ties: earliest in the shuffled order); fill the rest of the budget in shuffled order. Both
    lists keep the order of `samples`.
    """
    _, fraction = parse_fraction(fraction)
    presence = np.zeros((len(samples), num_classes), bool)
    for index, sample in enumerate(samples):
        if sample.label is None:
            raise DatasetError(
                f"{sample.image}: training sample without a label; a generated partition reads every mask"
            )
        mask = load_mask(sample.label, num_classes)
        presence[index, np.unique(mask[mask != 255])] = True
    budget = labeled_count(fraction, len(samples))
    order = np.random.default_rng(seed).permutation(len(samples))
    chosen: list[int] = []
    available = np.ones(len(samples), bool)
    uncovered = presence.any(axis=0)
    while len(chosen) < budget and uncovered.any():
        gain = np.where(available[order], (presence[order] & uncovered).sum(axis=1), -1)
        best = int(order[np.argmax(gain)])
        chosen.append(best)
        available[best] = False
        uncovered &= ~presence[best]
    chosen += [int(i) for i in order if available[i]][: budget - len(chosen)]
    labeled = set(chosen)
    return (
        [s.id for i, s in enumerate(samples) if i in labeled],
        [s.id for i, s in enumerate(samples) if i not in labeled],
    )


def _check_ids(ids: Sequence[str], name: str, known: set[str]) -> None:
    seen: set[str] = set()
    for sample_id in ids:
        if sample_id in seen:
            raise DatasetError(f"{name} ids: {sample_id!r} appears twice; remove the duplicate")
        if sample_id not in known:
            raise DatasetError(
                f"{name} ids: {sample_id!r} is not a training sample of this dataset; "
                "fix the partition list or the dataset root"
            )
        seen.add(sample_id)


def build_manifest(
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    labeled_ids: Sequence[str],
    unlabeled_ids: Sequence[str],
    meta: dict,
    test_samples: Sequence[Sample] = (),
) -> pa.Table:
    """One row per training, val and test sample; labels dropped for unlabeled rows; `meta` (META_KEYS) as JSON."""
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise DatasetError(f"manifest metadata lacks {missing}; it needs all of {META_KEYS}")
    if len(meta["class_names"]) != meta["num_classes"]:
        raise DatasetError(
            f"manifest metadata: {len(meta['class_names'])} class names for num_classes={meta['num_classes']}"
        )
    train_ids = {s.id for s in train_samples}
    _check_ids(labeled_ids, "labeled", train_ids)
    _check_ids(unlabeled_ids, "unlabeled", train_ids)
    both = set(labeled_ids) & set(unlabeled_ids)
    if both:
        raise DatasetError(f"ids both labeled and unlabeled: {sorted(both)[:5]}; put each id in one list")
    subset = {**{i: "unlabeled" for i in unlabeled_ids}, **{i: "labeled" for i in labeled_ids}}
    rows = []
    for sample in train_samples:
        if sample.id not in subset:
            raise DatasetError(
                f"training sample {sample.id!r} ({sample.image}) is in neither the labeled nor the unlabeled "
                "list; add it to one of them or leave it out of the training samples"
            )
        rows.append((sample, "train", subset[sample.id]))
    held: set[str] = set()
    for role, samples in (("val", val_samples), ("test", test_samples)):
        for sample in samples:
            if sample.id in train_ids or sample.id in held:
                other = "training" if sample.id in train_ids else "val"
                raise DatasetError(f"{role} sample {sample.id!r} is also a {other} sample; the splits must be disjoint")
            held.add(sample.id)
            rows.append((sample, role, role))
    for sample, _, row_subset in rows:
        if row_subset != "unlabeled" and sample.label is None:
            raise DatasetError(f"{sample.image}: {row_subset} sample {sample.id!r} has no label file")
    columns = {
        "id": [s.id for s, _, _ in rows],
        "image_path": [str(Path(s.image).absolute()) for s, _, _ in rows],
        "label_path": [None if sub == "unlabeled" else str(Path(s.label).absolute()) for s, _, sub in rows],
        "split": [split for _, split, _ in rows],
        "subset": [sub for _, _, sub in rows],
    }
    schema = MANIFEST_SCHEMA.with_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    return pa.table(columns, schema=schema)


def manifest_meta(table: pa.Table) -> dict:
    """The dataset/partition description stored in a manifest's schema metadata."""
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise DatasetError("table has no mgd_ray metadata; build it with build_manifest")
    return json.loads(raw)


def write_manifest(table: pa.Table, path: Path) -> Path:
    """Write atomically (temporary file in the same folder, then rename) and return the path."""
    return atomic_write(path, lambda temporary: pq.write_table(table, temporary))


def read_manifest(path: Path) -> pa.Table:
    """Read and validate a manifest; anything else raises DatasetError naming the file."""
    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise DatasetError(f"{path}: cannot read as a Parquet manifest ({err}); rebuild it with mgd_ray.data") from err
    fix = "rebuild it with mgd_ray.data (prepare_builtin, prepare_folder, voc_manifest, ...)"
    missing = [f.name for f in MANIFEST_SCHEMA if f.name not in table.column_names]
    if missing:
        raise DatasetError(f"{path}: not a manifest, columns {missing} missing; {fix}")
    try:
        meta = manifest_meta(table)
    except (DatasetError, ValueError) as err:
        raise DatasetError(f"{path}: not a manifest, {err}; {fix}") from err
    absent = [k for k in META_KEYS if k not in meta]
    if absent:
        raise DatasetError(f"{path}: manifest metadata lacks {absent}; {fix}")
    subsets = set(table["subset"].to_pylist())
    if not subsets <= set(SUBSETS):
        raise DatasetError(f"{path}: unknown subset values {sorted(subsets - set(SUBSETS))}; {fix}")
    for sample_id, label, subset in zip(
        table["id"].to_pylist(), table["label_path"].to_pylist(), table["subset"].to_pylist(), strict=True
    ):
        if (label is None) != (subset == "unlabeled"):
            raise DatasetError(
                f"{path}: row {sample_id!r} ({subset}) {'has' if label else 'lacks'} a label path; "
                f"only unlabeled rows go without; {fix}"
            )
    return table


def _select(samples: Sequence[Sample], ids: Sequence[str], list_file: Path) -> list[Sample]:
    by_id = {s.id: s for s in samples}
    for line, sample_id in enumerate(ids, start=1):
        if sample_id not in by_id:
            raise DatasetError(f"{list_file} line {line}: id {sample_id!r} is not in the dataset; fix the list")
    return [by_id[i] for i in ids]


def _manifest_name(fraction_name: str, seed: int) -> str:
    return f"manifest_{fraction_name}_seed{seed}.parquet"


def prepare_builtin(
    root: Path,
    seed: int,
    fraction: str | float,
    *,
    data_seed: int = 0,
    num_train: int = 256,
    num_val: int = 64,
    size: int = 96,
    num_classes: int = 6,
    fashion_mnist: bool = False,
    labeled_images: int | None = None,
    num_test: int = 0,
) -> Path:
    """Generate the built-in data (seeded by `data_seed`), partition it by `seed`, write the manifest.

    ``fraction`` (or ``"all"``) is the share of the training images that keep their labels;
    ``labeled_images`` asks for a count instead. Returns root/manifest_<fraction>_seed<seed>.parquet
    (``manifest_n<count>_seed<seed>`` for a count).
    """
    root = generate_builtin(root, data_seed, num_train, num_val, size, num_classes, fashion_mnist, num_test=num_test)
    samples, names = folder_samples(root)
    train = _select(samples, read_id_list(root / "train.txt"), root / "train.txt")
    val = _select(samples, read_id_list(root / "val.txt"), root / "val.txt")
    test = _select(samples, read_id_list(root / "test.txt"), root / "test.txt") if num_test else []
    if labeled_images is not None:
        if labeled_images > len(train):
            raise DatasetError(
                f"labeled: {labeled_images} asked for, but the built-in dataset has {len(train)} training images"
            )
        fraction_name, value = f"n{labeled_images}", labeled_images / len(train)
    else:
        fraction_name, value = parse_fraction(1 if fraction == "all" else fraction)
    labeled, unlabeled = generate_partition(train, value, seed, num_classes)
    meta = {
        "dataset": "builtin",
        "root": str(root),
        "num_classes": num_classes,
        "class_names": names,
        "partition": "generated",
        "fraction": value,
        "seed": seed,
        "data_seed": data_seed,
    }
    table = build_manifest(train, val, labeled, unlabeled, meta, test)
    return write_manifest(table, root / _manifest_name(fraction_name, seed))


def _standard_meta(dataset: str, root: Path, classes: Sequence[str], protocol: str, fraction: float) -> dict:
    return {
        "dataset": dataset,
        "root": str(Path(root).absolute()),
        "num_classes": len(classes),
        "class_names": list(classes),
        "partition": protocol,
        "fraction": fraction,
        "seed": None,
    }


def voc_manifest(root: Path, protocol: Protocol, fraction: str | float) -> pa.Table:
    """Manifest of a shipped VOC partition: train_aug (classic) or train (pseudoseg) + val."""
    key = protocol_key("voc", protocol)
    labeled, unlabeled = standard_split("voc", protocol, fraction)
    train_list, val_list = split_list_path("voc", TRAIN_LISTS[key]), split_list_path("voc", "val.txt")
    train = voc_samples(root, read_id_list(train_list), str(train_list))
    val = voc_samples(root, read_id_list(val_list), str(val_list))
    meta = _standard_meta("voc", root, VOC_CLASSES, protocol, parse_fraction(fraction)[1])
    return build_manifest(train, val, labeled, unlabeled, meta)


def cityscapes_manifest(root: Path, fraction: str | float) -> pa.Table:
    """Manifest of a shipped Cityscapes partition (CPS layout: images/, segmentation/ with train ids)."""
    labeled, unlabeled = standard_split("cityscapes", "classic", fraction)
    train = cityscapes_samples(root, split_list_path("cityscapes", "train.txt"))
    val = cityscapes_samples(root, split_list_path("cityscapes", "val.txt"))
    meta = _standard_meta("cityscapes", root, CITYSCAPES_CLASSES, "classic", parse_fraction(fraction)[1])
    return build_manifest(train, val, labeled, unlabeled, meta)
