"""A user's folder of partly labeled images: which image plays which role, and its manifest.

Layout: ``images/`` holds every image (jpg/jpeg/png), ``labels/<id>.png`` the masks of the labeled
ones (class ids, 255 = ignore; mode L or P), ``classes.txt`` the class names (class 0 first). An
image without a mask is unlabeled; more unlabeled images may come from other folders or lists
(``DataConfig.unlabeled``). val and test are id lists, or shares of the labeled images carved by
``split_seed``; the labeled images left train, all of them (``partition: all``, the default) or a
seeded share or count of them, the rest joining the unlabeled ones without their masks.
"""

from __future__ import annotations

from pathlib import Path

from mgd_ray.config import DataConfig
from mgd_ray.data.datasets import DatasetError, Sample, folder_samples, read_id_list
from mgd_ray.data.partitions import generate_partition, parse_fraction
from mgd_ray.data.roles import DEFAULT_VAL, Roles, carve, extra_unlabeled, write_roles_manifest


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


def folder_roles(cfg: DataConfig) -> tuple[Roles, list[str]]:
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
        val = carve(pool, cfg.val or DEFAULT_VAL, cfg.split_seed)
    if isinstance(cfg.test, float):
        taken = {s.id for s in val}
        test = carve([s for s in pool if s.id not in taken], cfg.test, cfg.split_seed + 1)
    held = {s.id for s in val + test}
    pool = [s for s in pool if s.id not in held]
    labeled = _training_labels(cfg, pool, by_id, held, len(class_names), problems)
    chosen = {s.id for s in labeled}
    unlabeled = [Sample(s.id, s.image, None) for s in pool if s.id not in chosen]  # their masks stay hidden
    unlabeled += [s for s in samples if s.label is None]
    unlabeled += extra_unlabeled(root, cfg.unlabeled, set(by_id), problems)
    if not labeled and not problems:
        problems.append(f"{root / 'labels'}: no labeled image is left for training; add masks or hold out fewer images")
    if problems:
        raise DatasetError(f"{root}: {len(problems)} problem(s) with the folder dataset:\n  " + "\n  ".join(problems))
    return Roles(labeled, unlabeled, val, test), class_names


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


def prepare_folder(cfg: DataConfig) -> Path:
    """The folder dataset's manifest under its root, one file per setting of its roles."""
    cfg = cfg.model_copy(update={"root": Path(cfg.root).absolute()})
    roles, class_names = folder_roles(cfg)
    partition = "generated" if cfg.partition != "all" or cfg.labeled is not None else "all"
    return write_roles_manifest(cfg, roles, class_names, {"partition": partition})
