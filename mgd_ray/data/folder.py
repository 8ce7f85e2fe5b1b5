"""A user's folder of partly labeled images: which image plays which role, and its manifest.

Layout: ``images/`` holds every image (jpg/jpeg/png), ``labels/<id>.png`` the masks of the labeled
ones (class ids, 255 = ignore; mode L or P), ``classes.txt`` the class names (class 0 first). An
image without a mask is unlabeled; more unlabeled images may come from other folders or lists
(``DataConfig.unlabeled``). val and test are id lists, or shares of the labeled images carved by
``split_seed``; the labeled images left train, all of them (``partition: all``, the default) or a
seeded share or count of them, the rest joining the unlabeled ones without their masks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mgd_ray.config import DataConfig
from mgd_ray.data.datasets import DatasetError, Sample, folder_samples, image_files, inside_root, read_id_list
from mgd_ray.data.partitions import build_manifest, generate_partition, labeled_count, parse_fraction, write_manifest

DEFAULT_VAL = 0.2


@dataclass
class FolderRoles:
    """The samples of each role; ``unlabeled`` ones carry no mask, whatever is on disk."""

    labeled: list[Sample]
    unlabeled: list[Sample]
    val: list[Sample]
    test: list[Sample]


def _listed(samples: dict[str, Sample], list_file: Path, role: str, problems: list[str]) -> list[Sample]:
    """The masked samples an id list names; every unknown or unmasked id is a problem."""
    chosen = []
    for line, sample_id in enumerate(read_id_list(list_file), start=1):
        sample = samples.get(sample_id)
        if sample is None:
            problems.append(f"{list_file} line {line}: id {sample_id!r} is not an image of the dataset; fix the list")
        elif sample.label is None:
            problems.append(
                f"{list_file} line {line}: {role} image {sample_id!r} has no mask in labels/; add its mask or drop it"
            )
        else:
            chosen.append(sample)
    return chosen


def _carve(pool: list[Sample], share: float, seed: int) -> list[Sample]:
    """A seeded share of ``pool`` (at least one), in the pool's order."""
    picked = set(np.random.default_rng(seed).permutation(len(pool))[: labeled_count(share, len(pool))].tolist())
    return [s for i, s in enumerate(pool) if i in picked]


def _extra_unlabeled(root: Path, sources: tuple[Path, ...], known: set[str], problems: list[str]) -> list[Sample]:
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
            lines = read_id_list(source)
            named = [(line, root / line, f"{source} line {i}") for i, line in enumerate(lines, start=1)]
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


def folder_roles(cfg: DataConfig) -> tuple[FolderRoles, list[str]]:
    """Each image's role by ``cfg`` (see the module docstring), and the class names.

    Every problem with the lists and folders is collected and raised as one ``DatasetError``.
    """
    root = Path(cfg.root)
    samples, class_names = folder_samples(root)
    by_id = {s.id: s for s in samples}
    problems: list[str] = []
    val = _listed(by_id, cfg.val, "val", problems) if isinstance(cfg.val, Path) else []
    test = _listed(by_id, cfg.test, "test", problems) if isinstance(cfg.test, Path) else []
    for sample_id in sorted({s.id for s in val} & {s.id for s in test}):
        problems.append(f"image {sample_id!r} is in both the val and the test list; keep it in one")
    held = {s.id for s in val + test}
    pool = [s for s in samples if s.label is not None and s.id not in held]
    if not isinstance(cfg.val, Path):
        val = _carve(pool, cfg.val or DEFAULT_VAL, cfg.split_seed)
    if isinstance(cfg.test, float):
        taken = {s.id for s in val}
        test = _carve([s for s in pool if s.id not in taken], cfg.test, cfg.split_seed + 1)
    held = {s.id for s in val + test}
    pool = [s for s in pool if s.id not in held]
    labeled = _training_labels(cfg, pool, by_id, held, len(class_names), problems)
    chosen = {s.id for s in labeled}
    unlabeled = [Sample(s.id, s.image, None) for s in pool if s.id not in chosen]  # their masks stay hidden
    unlabeled += [s for s in samples if s.label is None]
    unlabeled += _extra_unlabeled(root, cfg.unlabeled, set(by_id), problems)
    if not labeled and not problems:
        problems.append(f"{root / 'labels'}: no labeled image is left for training; add masks or hold out fewer images")
    if problems:
        raise DatasetError(f"{root}: {len(problems)} problem(s) with the folder dataset:\n  " + "\n  ".join(problems))
    return FolderRoles(labeled, unlabeled, val, test), class_names


def _training_labels(
    cfg: DataConfig, pool: list[Sample], by_id: dict[str, Sample], held: set[str], num_classes: int, problems: list[str]
) -> list[Sample]:
    """The training images that keep their masks: a list, a count or share of ``pool``, or all of it."""
    if cfg.labeled_list is not None:
        labeled = _listed(by_id, cfg.labeled_list, "labeled", problems)
        for sample in labeled:
            if sample.id in held:
                problems.append(f"{cfg.labeled_list}: {sample.id!r} is a val or test image; it cannot train too")
        return [s for s in labeled if s.id not in held]
    if cfg.labeled is None and cfg.partition == "all":
        return pool
    if cfg.labeled is not None and cfg.labeled > len(pool):
        problems.append(f"labeled: {cfg.labeled} asked for, but only {len(pool)} labeled images are left for training")
        return []
    if not pool:
        return []
    share = cfg.labeled / len(pool) if cfg.labeled is not None else parse_fraction(cfg.partition)[1]
    ids = set(generate_partition(pool, share, cfg.partition_seed, num_classes)[0])
    return [s for s in pool if s.id in ids]


def _settings(cfg: DataConfig) -> dict:
    """What decides the roles, for the manifest's name and metadata (list files by their contents)."""

    def describe(value: Path | float | None) -> str | float | None:
        if isinstance(value, Path):
            return (
                f"{value} sha256:{hashlib.sha256(value.read_bytes()).hexdigest()[:12]}"
                if value.is_file()
                else str(value)
            )
        return value

    return {
        "partition": cfg.partition,
        "labeled": cfg.labeled,
        "labeled_list": describe(cfg.labeled_list),
        "val": describe(cfg.val) if cfg.val is not None else DEFAULT_VAL,
        "test": describe(cfg.test),
        "unlabeled": [describe(Path(p)) for p in cfg.unlabeled],
        "split_seed": cfg.split_seed,
        "partition_seed": cfg.partition_seed,
    }


def prepare_folder(cfg: DataConfig) -> Path:
    """The folder dataset's manifest under its root, one file per setting of its roles."""
    root = Path(cfg.root).absolute()
    cfg = cfg.model_copy(update={"root": root})
    roles, class_names = folder_roles(cfg)
    settings = _settings(cfg)
    meta = {
        "dataset": "folder",
        "root": str(root),
        "num_classes": len(class_names),
        "class_names": class_names,
        "partition": "generated" if cfg.partition != "all" or cfg.labeled is not None else "all",
        "fraction": len(roles.labeled) / max(1, len(roles.labeled) + len(roles.unlabeled)),
        "seed": cfg.partition_seed,
        "roles": settings,
    }
    train = roles.labeled + roles.unlabeled
    table = build_manifest(
        train, roles.val, [s.id for s in roles.labeled], [s.id for s in roles.unlabeled], meta, roles.test
    )
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return write_manifest(table, root / f"manifest_folder_{digest}.parquet")
