"""A job's data: the datasets of its manifest, and the seeded stream of batches every step draws.

Data order, augmentation and CutMix masks are functions of (seed, epoch, index) and (seed, step)
only, never of the global RNG or of the process that loads them. So a resumed job continues the
same schedule, N workers see exactly the samples one worker would, and every trial of a study
draws the same batches (which is what lets the teacher-signal cache serve them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch.utils.data import DataLoader, Dataset

from mgd_ray.config import DataConfig, ScheduleConfig
from mgd_ray.data.benchmark import is_shipped, prepare_benchmark
from mgd_ray.data.datasets import IGNORE_INDEX, DatasetError, SegmentationDataset
from mgd_ray.data.folder import prepare_folder
from mgd_ray.data.partitions import (
    cityscapes_manifest,
    manifest_meta,
    prepare_builtin,
    read_manifest,
    voc_manifest,
    write_manifest,
)
from mgd_ray.data.transforms import box_mask, cutmix, eval_transform, train_transform
from mgd_ray.distributed import DistEnv

ConfigWithData = TypeVar("ConfigWithData", bound=BaseModel)


# ---------------------------------------------------------------------------- the job's datasets
@dataclass
class JobData:
    """The datasets of a job, built from the Parquet manifest every worker reads."""

    labeled: SegmentationDataset
    unlabeled: SegmentationDataset | None  # None when every training image keeps its label (partition: all)
    val: SegmentationDataset
    num_classes: int
    class_names: list[str]
    manifest: Path
    dataset: str = "folder"  # the manifest's dataset name: builtin, voc, cityscapes or folder
    test: SegmentationDataset | None = None  # only the final evaluation reads it


def prepare_manifest(cfg: DataConfig) -> Path:
    """The Parquet manifest of the configured dataset + partition, built if needed.

    Built once by the driver; every worker then reads the same file (``cfg.manifest``).
    """
    if cfg.manifest is not None:
        return cfg.manifest
    root = Path(cfg.root)
    if cfg.dataset == "builtin":
        size = cfg.builtin
        return prepare_builtin(
            root,
            cfg.partition_seed,
            cfg.partition,
            num_train=size.num_train,
            num_val=size.num_val,
            size=size.size,
            num_classes=size.num_classes,
            labeled_images=cfg.labeled,
            num_test=size.num_test,
        )
    if cfg.dataset == "folder":
        return prepare_folder(cfg)
    if not is_shipped(cfg):
        return prepare_benchmark(cfg)
    if cfg.dataset == "voc":
        table = voc_manifest(root, cfg.protocol, cfg.partition)
    else:
        table = cityscapes_manifest(root, cfg.partition)
    name = f"manifest_{cfg.dataset}_{cfg.protocol}_{cfg.partition.replace('/', '-')}.parquet"
    return write_manifest(table, root / name)


def with_manifest(cfg: ConfigWithData) -> ConfigWithData:
    """A copy of a job or study config whose ``data.manifest`` names its prepared manifest."""
    data: DataConfig = cfg.data  # type: ignore[attr-defined]
    return cfg.model_copy(update={"data": data.model_copy(update={"manifest": prepare_manifest(data)})})


def load_job_data(cfg: DataConfig) -> JobData:
    manifest = prepare_manifest(cfg)
    table = read_manifest(manifest)
    meta = manifest_meta(table)
    num_classes = int(meta["num_classes"])
    train_tf = train_transform(cfg.crop_size, cfg.scales)
    subsets = set(table["subset"].to_pylist())
    return JobData(
        labeled=SegmentationDataset(table, "labeled", num_classes, train_tf),
        unlabeled=SegmentationDataset(table, "unlabeled", num_classes, train_tf) if "unlabeled" in subsets else None,
        val=SegmentationDataset(table, "val", num_classes, eval_transform()),
        num_classes=num_classes,
        class_names=list(meta["class_names"]),
        manifest=manifest,
        dataset=str(meta["dataset"]),
        test=SegmentationDataset(table, "test", num_classes, eval_transform()) if "test" in subsets else None,
    )


def pad_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch images of different sizes: pad bottom/right, images with 0, labels with 255."""
    h = max(it["image"].shape[-2] for it in items)
    w = max(it["image"].shape[-1] for it in items)
    images = torch.stack(
        [F.pad(it["image"], (0, w - it["image"].shape[-1], 0, h - it["image"].shape[-2])) for it in items]
    )
    labels = torch.stack(
        [
            F.pad(it["label"], (0, w - it["label"].shape[-1], 0, h - it["label"].shape[-2]), value=IGNORE_INDEX)
            for it in items
        ]
    )
    return {"image": images, "label": labels, "id": [it["id"] for it in items]}


# ---------------------------------------------------------------------------- seeded streams
def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (stable across processes, unlike ``hash``)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class SeededView(Dataset):
    """Items keyed by (epoch, index): augmentation randomness is a function of (seed, epoch, index).

    So a sample looks the same whatever the rank, loader worker or restart that loads it — the
    property that makes resumed runs continue the same schedule and lets trials share teachers'
    signals.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone: the transforms draw nothing else. ``torch.manual_seed`` would
            # also queue a lazy CUDA seeding that formats the caller's stack trace, as costly inside
            # a Ray worker as decoding and augmenting the sample.
            torch.default_generator.manual_seed(derive_seed(self.seed, epoch, index))
            return self.dataset[index]


class StreamBatches:
    """Batches of keys for steps start_step, start_step+1, ... of one rank, forever.

    The global stream is the concatenation of per-epoch permutations (seeded by (seed, epoch));
    step k on rank r takes positions [(k·W + r)·B, (k·W + r + 1)·B). Small labeled sets simply
    wrap into their next epoch, as the official loaders repeat the labeled list.
    """

    def __init__(self, n: int, batch: int, seed: int, rank: int, world: int, start_step: int = 0):
        if n == 0:
            raise ValueError("StreamBatches: the dataset is empty")
        self.n, self.batch, self.seed = n, batch, seed
        self.rank, self.world, self.start_step = rank, world, start_step
        self._perms: dict[int, list[int]] = {}

    def _at(self, pos: int) -> tuple[int, int]:
        epoch, i = divmod(pos, self.n)
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            self._perms = {epoch: torch.randperm(self.n, generator=generator).tolist()}
        return epoch, self._perms[epoch][i]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            first = (step * self.world + self.rank) * self.batch
            yield [self._at(p) for p in range(first, first + self.batch)]
            step += 1


def stream(
    dataset: Dataset,
    batch: int,
    seed: int,
    env: DistEnv,
    start_step: int,
    workers: int,
    augment_seed: int | None = None,
) -> Iterator[dict[str, Any]]:
    """An endless iterator of collated batches for this rank, starting at ``start_step``: images in
    the order ``seed`` draws, augmented as ``augment_seed`` (default: ``seed``) decides."""
    sampler = StreamBatches(len(dataset), batch, seed, env.rank, env.world_size, start_step)  # type: ignore[arg-type]
    view = SeededView(dataset, seed if augment_seed is None else augment_seed)
    loader = DataLoader(view, batch_sampler=sampler, num_workers=workers, pin_memory=env.device.type == "cuda")
    return iter(loader)


@dataclass
class Batch:
    """One step's inputs, named as in the method section."""

    x_l: torch.Tensor
    y: torch.Tensor
    u0: torch.Tensor | None = None
    u1: torch.Tensor | None = None
    m: torch.Tensor | None = None
    ids: dict[str, list[str]] = field(default_factory=dict)  # the image ids drawn: labeled, unlabeled (u0 + u1)

    @property
    def x_mix(self) -> torch.Tensor:
        """CutMix of the two unlabeled batches: u0·(1−m) + u1·m."""
        return cutmix(self.u0, self.u1, self.m)


def batches(
    data: JobData, schedule: ScheduleConfig, workers: int, env: DistEnv, start: int, unlabeled: bool
) -> Iterator[Batch]:
    """Labeled batch, and two unlabeled batches with a CutMix mask, per step.

    The two unlabeled streams are drawn independently, unless ``schedule.unlabeled_draw`` asks for
    the official loaders' shared sampler seed (the same images in the same order, each augmented
    on its own), which mostly mixes two views of one image (method notes).
    """
    seed = schedule.seed
    lab = stream(data.labeled, schedule.batch_labeled, derive_seed(seed, 0), env, start, workers)
    u0s = u1s = None
    if unlabeled:
        if data.unlabeled is None:
            raise DatasetError(
                f"{data.manifest}: this job trains on unlabeled images, and every training image keeps its label; "
                "choose a partition (1/8, labeled: N) or add unlabeled images"
            )
        u0s = stream(data.unlabeled, schedule.batch_unlabeled, derive_seed(seed, 1), env, start, workers)
        u1_order = derive_seed(seed, 1 if schedule.unlabeled_draw == "shared_order" else 2)
        u1s = stream(data.unlabeled, schedule.batch_unlabeled, u1_order, env, start, workers, derive_seed(seed, 2))
    step = start
    while True:
        b = next(lab)
        batch = Batch(b["image"].to(env.device, non_blocking=True), b["label"].to(env.device, non_blocking=True))
        batch.ids["labeled"] = list(b["id"])
        if u0s is not None and u1s is not None:
            u0, u1 = next(u0s), next(u1s)
            batch.u0 = u0["image"].to(env.device, non_blocking=True)
            batch.u1 = u1["image"].to(env.device, non_blocking=True)
            batch.ids["unlabeled"] = list(u0["id"]) + list(u1["id"])
            n, _, h, w = batch.u0.shape
            # Masks are drawn for the global batch and sliced, so N workers see the masks one worker would.
            gen = torch.Generator().manual_seed(derive_seed(seed, 3, step))
            batch.m = box_mask(n * env.world_size, h, w, gen)[env.rank * n : (env.rank + 1) * n].to(env.device)
        yield batch
        step += 1
