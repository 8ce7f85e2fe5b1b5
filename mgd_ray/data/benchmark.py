"""VOC and Cityscapes beyond their shipped partitions: any labeled share or count, a labeled list,
extra unlabeled images and a selection set.

The paper's protocol stays the default: the shipped 1/16..1/2 lists, and the report on the
official val set (``partitions.voc_manifest`` / ``cityscapes_manifest``). Any other fraction or a
count draws the labeled images by ``partition_seed`` (``generate_partition``: class-covering);
``labeled_list`` names them in the dataset's list format (VOC ids; Cityscapes stems or image/label
lines). ``unlabeled`` adds images that train without labels: folders, or lists of image paths under
root, such as the official MGD repository's Cityscapes ``train_extra_{3000,6000,9000}.txt`` (a
list's label column is ignored). ``selection`` holds out images of the unlabeled training pool,
whose labels the dataset has: they play val (search, ASHA, checkpoint choice) and train on
nothing, and the official val set becomes test, read once by the final evaluation, so that the
search and the report use different images. Every problem with the lists is reported at once.
"""

from __future__ import annotations

from pathlib import Path

from mgd_ray.config import DataConfig
from mgd_ray.data.datasets import (
    CITYSCAPES_CLASSES,
    VOC_CLASSES,
    DatasetError,
    Sample,
    cityscapes_samples,
    read_id_list,
    voc_samples,
)
from mgd_ray.data.partitions import (
    STANDARD_FRACTIONS,
    TRAIN_LISTS,
    generate_partition,
    parse_fraction,
    protocol_key,
    split_list_path,
    standard_split,
)
from mgd_ray.data.roles import Roles, carve, extra_unlabeled, path_list, write_roles_manifest


def is_shipped(cfg: DataConfig) -> bool:
    """The paper's protocol: a shipped partition list, and nothing added or held out."""
    return (
        parse_fraction(cfg.partition)[0] in STANDARD_FRACTIONS
        and cfg.labeled is None
        and cfg.labeled_list is None
        and not cfg.unlabeled
        and cfg.selection is None
    )


def _splits(cfg: DataConfig) -> tuple[list[Sample], list[Sample], list[str]]:
    """(training samples, official val samples, class names) of the dataset under ``cfg.root``."""
    root = Path(cfg.root)
    if cfg.dataset == "voc":
        train_list = split_list_path("voc", TRAIN_LISTS[protocol_key("voc", cfg.protocol)])
        val_list = split_list_path("voc", "val.txt")
        train = voc_samples(root, read_id_list(train_list), str(train_list))
        return train, voc_samples(root, read_id_list(val_list), str(val_list)), list(VOC_CLASSES)
    protocol_key("cityscapes", cfg.protocol)
    train = cityscapes_samples(root, split_list_path("cityscapes", "train.txt"))
    return train, cityscapes_samples(root, split_list_path("cityscapes", "val.txt")), list(CITYSCAPES_CLASSES)


def _listed_ids(path: Path, dataset: str, problems: list[str]) -> list[tuple[int, str]]:
    """(line, id) of a user's labeled list: VOC ids, or Cityscapes image stems / image-label lines."""
    if not path.is_file():
        problems.append(f"{path}: no such labeled_list file; fix data.labeled_list")
        return []
    if dataset == "voc":
        return list(enumerate(read_id_list(path), start=1))
    return [(line, Path(image).stem) for line, image in path_list(path)]


def _labeled(
    cfg: DataConfig, train: list[Sample], val_ids: set[str], num_classes: int, problems: list[str]
) -> list[str]:
    """The ids of the training images that keep their labels."""
    if cfg.labeled_list is not None:
        known, seen, ids = {s.id for s in train}, set(), []
        for line, sample_id in _listed_ids(cfg.labeled_list, cfg.dataset, problems):
            where = f"{cfg.labeled_list} line {line}"
            if sample_id in seen:
                problems.append(f"{where}: id {sample_id!r} appears twice; remove the duplicate")
            elif sample_id in val_ids:
                problems.append(f"{where}: {sample_id!r} is an image of the official val set; it cannot train")
            elif sample_id not in known:
                problems.append(f"{where}: id {sample_id!r} is not a training image of {cfg.dataset}; fix the list")
            else:
                ids.append(sample_id)
            seen.add(sample_id)
        if not ids and not problems:
            problems.append(f"{cfg.labeled_list}: lists no image; name the labeled training images, one per line")
        return ids
    if cfg.labeled is not None:
        if cfg.labeled > len(train):
            problems.append(f"labeled: {cfg.labeled} asked for, but {cfg.dataset} has {len(train)} training images")
            return []
        return generate_partition(train, cfg.labeled / len(train), cfg.partition_seed, num_classes)[0]
    name, share = parse_fraction(cfg.partition)
    if name in STANDARD_FRACTIONS:
        return standard_split(cfg.dataset, cfg.protocol, cfg.partition)[0]  # type: ignore[arg-type]
    return generate_partition(train, share, cfg.partition_seed, num_classes)[0]


def benchmark_roles(cfg: DataConfig) -> tuple[Roles, list[str]]:
    """Each image's role by ``cfg`` (see the module docstring), and the class names."""
    train, official_val, class_names = _splits(cfg)
    problems: list[str] = []
    labeled_ids = set(_labeled(cfg, train, {s.id for s in official_val}, len(class_names), problems))
    labeled = [s for s in train if s.id in labeled_ids]
    pool = [s for s in train if s.id not in labeled_ids]
    val, test = official_val, []
    if cfg.selection is not None:
        count = cfg.selection if isinstance(cfg.selection, int) else None
        if count is not None and count >= len(pool):
            problems.append(
                f"selection: {count} images asked for, but {len(pool)} unlabeled training images remain; hold out fewer"
            )
        elif pool:
            val, test = carve(pool, count / len(pool) if count is not None else cfg.selection, cfg.split_seed), val
            held = {s.id for s in val}
            pool = [s for s in pool if s.id not in held]
    unlabeled = [Sample(s.id, s.image, None) for s in pool]  # their labels stay hidden
    known = {s.id for s in train + official_val}
    unlabeled += extra_unlabeled(Path(cfg.root), cfg.unlabeled, known, problems)
    if problems:
        raise DatasetError(
            f"{cfg.root}: {len(problems)} problem(s) with the {cfg.dataset} settings:\n  " + "\n  ".join(problems)
        )
    return Roles(labeled, unlabeled, val, test), class_names


def prepare_benchmark(cfg: DataConfig) -> Path:
    """The manifest of a VOC / Cityscapes setting beyond the shipped lists, under the dataset's root."""
    cfg = cfg.model_copy(update={"root": Path(cfg.root).absolute()})
    roles, class_names = benchmark_roles(cfg)
    partition = "listed" if cfg.labeled_list is not None else "generated"
    if cfg.labeled is None and cfg.labeled_list is None and parse_fraction(cfg.partition)[0] in STANDARD_FRACTIONS:
        partition = cfg.protocol  # the shipped list, with images added or held out
    return write_roles_manifest(cfg, roles, class_names, {"partition": partition})
