"""Which image plays which role (labeled, unlabeled, val, test), shared by the folder and benchmark datasets.

Carved splits are seeded and keep the pool's order; extra unlabeled images come from folders or
lists of image paths; the settings that decide the roles (list files by their contents) name the
manifest, so two settings never share one, and a list edited in place gets a new one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgd_ray.config import DataConfig
from mgd_ray.data.datasets import Sample, image_files, inside_root
from mgd_ray.data.partitions import build_manifest, labeled_count, write_manifest

DEFAULT_VAL = 0.2  # a folder dataset's val share of its labeled images


@dataclass
class Roles:
    """The samples of each role; ``unlabeled`` ones carry no mask, whatever is on disk."""

    labeled: list[Sample]
    unlabeled: list[Sample]
    val: list[Sample]
    test: list[Sample]


def carve(pool: list[Sample], share: float, seed: int) -> list[Sample]:
    """A seeded share of ``pool`` (at least one), in the pool's order."""
    picked = set(np.random.default_rng(seed).permutation(len(pool))[: labeled_count(share, len(pool))].tolist())
    return [s for i, s in enumerate(pool) if i in picked]


def path_list(path: Path) -> list[tuple[int, str]]:
    """(line number, image path) of a list of image paths; a line's first column (tab- or blank-separated)
    is the image, so image/label pair lists (Cityscapes, the official MGD train_extra lists) serve too."""
    out = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        text = line.strip()
        if text:
            out.append((number, text.split("\t")[0].strip() if "\t" in text else text.split()[0]))
    return out


def extra_unlabeled(root: Path, sources: tuple[Path, ...], known: set[str], problems: list[str]) -> list[Sample]:
    """Images of extra folders (ids ``<folder>/<stem>``) or of lists of image paths relative to ``root``."""
    real_root = root.resolve()
    out = []
    for source in sources:
        if source.is_dir():
            paths = image_files(source)
            if not paths:
                problems.append(f"{source}: no images (.jpg/.jpeg/.png) in this unlabeled folder")
            named = [(f"{source.name}/{p.stem}", p, str(source)) for p in paths]
        elif source.is_file():
            named = [(line.lstrip("/"), root / line.lstrip("/"), f"{source} line {i}") for i, line in path_list(source)]
        else:
            problems.append(f"{source}: no such unlabeled folder or list of image paths; fix data.unlabeled")
            continue
        for sample_id, path, where in named:
            if sample_id in known:
                problems.append(
                    f"{where}: unlabeled image {sample_id!r} is already an image of the dataset; list it once"
                )
            elif not path.is_file():
                problems.append(f"{where}: image {path} does not exist; fix the list")
            else:
                known.add(sample_id)
                out.append(Sample(sample_id, inside_root(real_root, path, where), None))
    return out


def role_settings(cfg: DataConfig) -> dict:
    """What decides the roles, for the manifest's name and metadata (list files by their contents)."""

    def describe(value: Path | float | None) -> str | float | None:
        if isinstance(value, Path):
            return (
                f"{value} sha256:{hashlib.sha256(value.read_bytes()).hexdigest()[:12]}"
                if value.is_file()
                else str(value)
            )
        return value

    settings = {
        "partition": cfg.partition,
        "labeled": cfg.labeled,
        "labeled_list": describe(cfg.labeled_list),
        "val": describe(cfg.val) if cfg.val is not None else (DEFAULT_VAL if cfg.dataset == "folder" else None),
        "test": describe(cfg.test),
        "unlabeled": [describe(Path(p)) for p in cfg.unlabeled],
        "split_seed": cfg.split_seed,
        "partition_seed": cfg.partition_seed,
    }
    if cfg.dataset != "folder":  # the folder dataset's manifests keep the names they had before these existed
        settings |= {"protocol": cfg.protocol, "selection": cfg.selection}
    return settings


def write_roles_manifest(cfg: DataConfig, roles: Roles, class_names: list[str], meta: dict) -> Path:
    """``root/manifest_<dataset>_<digest of the settings>.parquet``; ``meta`` adds to the roles' own."""
    root = Path(cfg.root).absolute()
    settings = role_settings(cfg)
    meta = {
        "dataset": cfg.dataset,
        "root": str(root),
        "num_classes": len(class_names),
        "class_names": class_names,
        "fraction": len(roles.labeled) / max(1, len(roles.labeled) + len(roles.unlabeled)),
        "seed": cfg.partition_seed,
        "roles": settings,
    } | meta
    train = roles.labeled + roles.unlabeled
    table = build_manifest(
        train, roles.val, [s.id for s in roles.labeled], [s.id for s in roles.unlabeled], meta, roles.test
    )
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return write_manifest(table, root / f"manifest_{cfg.dataset}_{digest}.parquet")
