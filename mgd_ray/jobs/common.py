"""What every training job shares: ranks, seeded data streams, optimiser, evaluation, checkpoints.

Jobs are plain functions of a typed config, a ``Reporter`` and an optional checkpoint to resume
from; they know nothing of Ray, so the same loop runs under Ray Train (``mgd_ray.train``), under
torchrun, or in a test. Distributed code lives here; the jobs read as if single-process.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mgd_ray.config import DataConfig, ModelConfig, OptimConfig, ScheduleConfig
from mgd_ray.data.datasets import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    SegmentationDataset,
    voc_palette,
)
from mgd_ray.data.partitions import (
    cityscapes_manifest,
    manifest_meta,
    prepare_builtin,
    prepare_folder,
    read_manifest,
    voc_manifest,
    write_manifest,
)
from mgd_ray.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    box_mask,
    cutmix,
    eval_transform,
    train_transform,
)
from mgd_ray.distributed import DistEnv, all_reduce_mean, replica_spread, unwrap
from mgd_ray.metrics import IGNORE_INDEX, ConfusionMatrix, sliding_window_logits
from mgd_ray.models.deeplab import DeepLabV3Plus, build_segmenter

CHECKPOINT_FORMAT = "mgd_ray.segmenter/1"
STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
# Every evaluation's metrics so far, in each checkpoint: Ray Train V2's ``Result.metrics_dataframe``
# holds only the checkpoints it kept (``num_to_keep``), not the whole curve.
HISTORY_FILE = "history.json"

# Reporter(metrics, checkpoint_dir or None): called on every rank at every evaluation.
Reporter = Callable[[dict[str, Any], Path | None], None]


# ---------------------------------------------------------------------------- seeds and data streams
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
            # also queue a lazy CUDA seeding that formats the caller's stack trace, which cost
            # 3.6 ms per sample inside a Ray worker, as much as decoding and augmenting it.
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
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch))).tolist()}
        return epoch, self._perms[epoch][i]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            first = (step * self.world + self.rank) * self.batch
            yield [self._at(p) for p in range(first, first + self.batch)]
            step += 1


def stream(
    dataset: Dataset, batch: int, seed: int, env: DistEnv, start_step: int, workers: int
) -> Iterator[dict[str, Any]]:
    """An endless iterator of collated batches for this rank, starting at ``start_step``."""
    sampler = StreamBatches(len(dataset), batch, seed, env.rank, env.world_size, start_step)  # type: ignore[arg-type]
    loader = DataLoader(
        SeededView(dataset, seed), batch_sampler=sampler, num_workers=workers, pin_memory=env.device.type == "cuda"
    )
    return iter(loader)


@dataclass
class JobData:
    """The datasets of a job, built from the Parquet manifest every worker reads."""

    labeled: SegmentationDataset
    unlabeled: SegmentationDataset
    val: SegmentationDataset
    num_classes: int
    class_names: list[str]
    manifest: Path
    dataset: str = "folder"  # the manifest's dataset name: builtin, voc, cityscapes or folder


def prepare_manifest(cfg: DataConfig) -> Path:
    """The Parquet manifest of the configured dataset + partition, built if needed.

    Built once by the driver; every worker then reads the same file (``cfg.manifest``).
    """
    if cfg.manifest is not None:
        return cfg.manifest
    root = Path(cfg.root)
    if cfg.dataset == "builtin":
        b = cfg.builtin
        return prepare_builtin(
            root, cfg.partition_seed, cfg.partition, num_train=b.num_train, num_val=b.num_val, size=b.size, num_classes=b.num_classes
        )
    if cfg.dataset == "folder":
        return prepare_folder(root, cfg.partition, cfg.partition_seed)
    if cfg.dataset == "voc":
        table = voc_manifest(root, cfg.protocol, cfg.partition)
    else:
        table = cityscapes_manifest(root, cfg.partition)
    name = f"manifest_{cfg.dataset}_{cfg.protocol}_{cfg.partition.replace('/', '-')}.parquet"
    return write_manifest(table, root / name)


def load_job_data(cfg: DataConfig) -> JobData:
    manifest = prepare_manifest(cfg)
    table = read_manifest(manifest)
    meta = manifest_meta(table)
    num_classes = int(meta["num_classes"])
    train_tf = train_transform(cfg.crop_size, cfg.scales)
    return JobData(
        labeled=SegmentationDataset(table, "labeled", num_classes, train_tf),
        unlabeled=SegmentationDataset(table, "unlabeled", num_classes, train_tf),
        val=SegmentationDataset(table, "val", num_classes, eval_transform()),
        num_classes=num_classes,
        class_names=list(meta["class_names"]),
        manifest=manifest,
        dataset=str(meta["dataset"]),
    )


# ---------------------------------------------------------------------------- optimisation
def make_optimizer(
    params: Any, cfg: OptimConfig, iterations: int, env: DistEnv
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD (or AdamW) + poly LR (power 0.9, no warm-up), base LR × world size as the official code scales it."""
    lr = cfg.lr * (env.world_size if cfg.scale_lr_with_world_size else 1)
    # The fused kernels (CPU and CUDA) compute the same update as the per-tensor loop, within
    # floating-point tolerance, in one pass over all parameters: ~10x faster for AdamW on CPU.
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (1 - min(step, iterations) / iterations) ** cfg.poly_power)
    return opt, sched


def build_model(cfg: ModelConfig, num_classes: int) -> DeepLabV3Plus:
    return build_segmenter(cfg.backbone, num_classes, cfg.output_stride, pretrained=cfg.pretrained or False, stem=cfg.stem)


# ---------------------------------------------------------------------------- evaluation
def pad_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch images of different sizes: pad bottom/right, images with 0, labels with 255."""
    h = max(it["image"].shape[-2] for it in items)
    w = max(it["image"].shape[-1] for it in items)
    images = torch.stack([F.pad(it["image"], (0, w - it["image"].shape[-1], 0, h - it["image"].shape[-2])) for it in items])
    labels = torch.stack(
        [F.pad(it["label"], (0, w - it["label"].shape[-1], 0, h - it["label"].shape[-2]), value=IGNORE_INDEX) for it in items]
    )
    return {"image": images, "label": labels, "id": [it["id"] for it in items]}


@torch.no_grad()
def evaluate(model: nn.Module, data: JobData, env: DistEnv, batch: int, window: int | None = None) -> ConfusionMatrix:
    """Confusion matrix over the whole val split, each rank a shard, summed across ranks."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    indices = list(range(env.rank, len(data.val), env.world_size))
    loader = DataLoader(torch.utils.data.Subset(data.val, indices), batch_size=batch, collate_fn=pad_collate)
    cm = ConfusionMatrix(data.num_classes, device=env.device)
    for b in loader:
        x = b["image"].to(env.device)
        if window is None:
            logits = net(x).logits
        else:
            logits = sliding_window_logits(lambda t: net(t).logits, x, data.num_classes, window)
        cm.update(logits.argmax(1), b["label"].to(env.device))
    cm.all_reduce()
    net.train(was_training)
    return cm


def eval_metrics(cm: ConfusionMatrix, class_names: list[str], prefix: str = "val") -> dict[str, float]:
    out = {f"{prefix}/mIoU": cm.miou()}
    for name, iou in zip(class_names, cm.iou(), strict=True):
        out[f"{prefix}/IoU/{name}"] = iou
    return out


# ---------------------------------------------------------------------------- checkpoints
def dataset_palette(dataset: str | None, class_names: list[str]) -> list[tuple[int, int, int]]:
    """Colour per class id: Cityscapes' palette for Cityscapes, else the VOC colour map.

    The VOC map is VOC's own and the deterministic one the built-in masks are written with; a record
    without a dataset name (written before it was stored) is recognised as Cityscapes by its classes.
    """
    if dataset == "cityscapes" or (dataset is None and tuple(class_names) == CITYSCAPES_CLASSES):
        return [tuple(c) for c in CITYSCAPES_PALETTE]
    return list(voc_palette(len(class_names)))


def segmenter_record(model: nn.Module, cfg: ModelConfig, data: JobData, crop_size: int, role: str) -> dict[str, Any]:
    """A self-describing model record: enough to rebuild, check and use the network later."""
    return {
        "format": CHECKPOINT_FORMAT,
        "role": role,
        "model": cfg.model_dump(mode="json"),
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "crop_size": crop_size,
        "dataset": data.dataset,
        "palette": [list(c) for c in dataset_palette(data.dataset, data.class_names)],
        "state_dict": unwrap(model).state_dict(),
    }


def load_segmenter(path: Path, expect: ModelConfig, num_classes: int, what: str = "teacher") -> DeepLabV3Plus:
    """Rebuild a frozen network from a checkpoint, refusing a different architecture or class count."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint {path} does not exist; train it first or fix the path")
    record = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{what} checkpoint {path} is not an mgd_ray segmenter checkpoint ({CHECKPOINT_FORMAT})")
    saved = ModelConfig.model_validate(record["model"])
    if (saved.backbone, saved.output_stride, saved.stem) != (expect.backbone, expect.output_stride, expect.stem):
        raise ValueError(
            f"{what} checkpoint {path} holds a {saved.backbone} (output stride {saved.output_stride}, stem "
            f"{saved.stem}) but the config expects {expect.backbone} (output stride {expect.output_stride}, stem "
            f"{expect.stem}); point the config at the right checkpoint or change its model"
        )
    if record["num_classes"] != num_classes:
        raise ValueError(
            f"{what} checkpoint {path} predicts {record['num_classes']} classes but the dataset has {num_classes}"
        )
    model = build_segmenter(saved.backbone, num_classes, saved.output_stride, stem=saved.stem)
    model.load_state_dict(record["state_dict"])
    return model


def save_state(directory: Path, state: dict[str, Any]) -> Path:
    """Write the training state atomically (temp file then rename) into ``directory``.

    ``state["history"]`` goes to ``HISTORY_FILE`` (JSON, readable without torch), the rest to
    ``STATE_FILE``, written last.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / HISTORY_FILE).write_text(json.dumps(state.get("history", []), indent=1))
    tmp = directory / (STATE_FILE + ".tmp")
    torch.save({k: v for k, v in state.items() if k != "history"}, tmp)
    tmp.replace(directory / STATE_FILE)
    return directory


def load_state(directory: Path) -> dict[str, Any]:
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    history = directory / HISTORY_FILE
    return state | {"history": json.loads(history.read_text()) if history.is_file() else []}


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------- progress
class Progress:
    """A progress line every ``every`` steps on rank 0: step, loss terms, images/s, ETA."""

    def __init__(self, name: str, total: int, start: int, env: DistEnv, lines: int = 20):
        self.name, self.total, self.start, self.env = name, total, start, env
        self.every = max(1, total // lines)
        self.t0 = time.perf_counter()

    def step(self, step: int, terms: dict[str, float]) -> None:
        if not self.env.is_main or (step % self.every and step != self.total):
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        loss_text = " ".join(f"{k}={v:.4f}" for k, v in terms.items() if math.isfinite(v))
        print(f"[{self.name}] step {step}/{self.total} {loss_text} eta {eta:.0f}s", flush=True)


# ---------------------------------------------------------------------------- the shared loop
@dataclass
class Batch:
    """One step's inputs, named as in the method section."""

    x_l: torch.Tensor
    y: torch.Tensor
    u0: torch.Tensor | None = None
    u1: torch.Tensor | None = None
    m: torch.Tensor | None = None

    @property
    def x_mix(self) -> torch.Tensor:
        """CutMix of the two unlabeled batches: u0·(1−m) + u1·m."""
        return cutmix(self.u0, self.u1, self.m)


def mixed_pseudo_labels(logits_u0: torch.Tensor, logits_u1: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Hard labels for x_mix from predictions on its sources: argmax(T(u0)·(1−m) + T(u1)·m)."""
    return cutmix(logits_u0, logits_u1, m).argmax(dim=1)


def batches(data: JobData, schedule: ScheduleConfig, workers: int, env: DistEnv, start: int, unlabeled: bool) -> Iterator[Batch]:
    """Labeled batch, and two independently drawn unlabeled batches with a CutMix mask, per step.

    The two unlabeled streams have different seeds, unlike the official loaders whose shared
    sampler seed often mixes two views of one image (method notes).
    """
    seed = schedule.seed
    lab = stream(data.labeled, schedule.batch_labeled, derive_seed(seed, 0), env, start, workers)
    u0s = u1s = None
    if unlabeled:
        u0s = stream(data.unlabeled, schedule.batch_unlabeled, derive_seed(seed, 1), env, start, workers)
        u1s = stream(data.unlabeled, schedule.batch_unlabeled, derive_seed(seed, 2), env, start, workers)
    step = start
    while True:
        b = next(lab)
        batch = Batch(b["image"].to(env.device, non_blocking=True), b["label"].to(env.device, non_blocking=True))
        if u0s is not None and u1s is not None:
            batch.u0 = next(u0s)["image"].to(env.device, non_blocking=True)
            batch.u1 = next(u1s)["image"].to(env.device, non_blocking=True)
            n, _, h, w = batch.u0.shape
            # Masks are drawn for the global batch and sliced, so N workers see the masks one worker would.
            gen = torch.Generator().manual_seed(derive_seed(seed, 3, step))
            batch.m = box_mask(n * env.world_size, h, w, gen)[env.rank * n : (env.rank + 1) * n].to(env.device)
        yield batch
        step += 1


StepFn = Callable[[Batch, int], dict[str, torch.Tensor]]


@dataclass
class FitSpec:
    """What a job hands to ``fit``: the module to optimise and how to train, evaluate and export it.

    ``step`` returns the weighted loss terms of one step (their sum is optimised);
    ``evaluated`` names the networks to evaluate; ``export`` picks, from the evaluation metrics,
    the network saved as the job's model (e.g. the better CPS branch) and its role.
    """

    name: str
    module: nn.Module
    step: StepFn
    evaluated: Callable[[], dict[str, nn.Module]]
    export: Callable[[dict[str, float]], tuple[nn.Module, ModelConfig, str]]
    unlabeled: bool = True
    after_step: Callable[[int], None] | None = None
    extra_state: Callable[[], dict[str, Any]] | None = None
    load_extra_state: Callable[[dict[str, Any]], None] | None = None
    # Extra scalar metrics (averaged over ranks) added to every evaluation's metrics, e.g. cache/hit_rate.
    extra_metrics: Callable[[], dict[str, float]] | None = None


def fit(
    spec: FitSpec,
    data: JobData,
    data_cfg: DataConfig,
    optim: OptimConfig,
    schedule: ScheduleConfig,
    env: DistEnv,
    report: Reporter,
    checkpoint_root: Path,
    resume: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Iteration-based training with evaluation, reporting and checkpointing every ``eval_every``.

    A resumed run restores model, optimiser, scheduler, step and RNG state, and its data streams
    restart at the saved step, so it continues exactly the schedule of the interrupted run.
    """
    model = spec.module
    if resume is not None and resume.get("final"):  # killed after its last step: nothing left to train
        return dict(resume["history"][-1]) if resume["history"] else {}
    opt, sched = make_optimizer([p for p in model.parameters() if p.requires_grad], optim, schedule.iterations, env)
    start = 0
    if resume is not None:
        unwrap(model).load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"])
        if spec.load_extra_state is not None:
            spec.load_extra_state(resume["extra"])
        start = int(resume["step"])
    history: list[dict[str, float]] = list(resume["history"]) if resume is not None else []
    model.train()
    progress = Progress(spec.name, schedule.iterations, start, env)
    stream_ = batches(data, schedule, data_cfg.loader_workers, env, start, spec.unlabeled)
    metrics: dict[str, float] = {}
    sums: dict[str, float] = {}
    count = 0
    for step in range(start + 1, schedule.iterations + 1):
        terms = spec.step(next(stream_), step)
        loss = torch.stack(list(terms.values())).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if spec.after_step is not None:
            spec.after_step(step)
        values = {f"loss/{k}": float(v.detach()) for k, v in terms.items()} | {"loss/total": float(loss.detach())}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        progress.step(step, values)
        if step % schedule.eval_every and step != schedule.iterations:
            continue
        metrics = {"step": step, "lr": sched.get_last_lr()[0], "replica_spread": replica_spread(model, env)}
        metrics |= all_reduce_mean({k: v / count for k, v in sums.items()}, env)
        if spec.extra_metrics is not None:
            metrics |= all_reduce_mean(spec.extra_metrics(), env)
        sums, count = {}, 0
        evaluated = spec.evaluated()
        confusion: dict[str, ConfusionMatrix] = {}
        for label, net in evaluated.items():
            prefix = f"val/{label}" if label else "val"
            confusion[label] = evaluate(net, data, env, schedule.eval_batch, data_cfg.eval_window)
            metrics |= eval_metrics(confusion[label], data.class_names, prefix)
        if "val/mIoU" not in metrics:  # several networks evaluated (CPS): report the best one's
            metrics["val/mIoU"] = max(v for k, v in metrics.items() if k.startswith("val/") and k.endswith("/mIoU"))
        history.append(metrics)
        ckpt_dir = None
        if env.is_main:
            chosen, model_cfg, role = spec.export(metrics)
            ckpt_dir = checkpoint_root / f"step_{step:08d}"
            if step == schedule.iterations:
                # The last checkpoint resumes nothing: model.pt (below) and the history are all a
                # restarted job needs, and the model + optimiser state would be most of its disk
                # (a CPS teacher's two branches with AdamW's moments: ~6x the exported network).
                save_state(ckpt_dir, {"step": step, "final": True, "history": history})
            else:
                save_state(
                    ckpt_dir,
                    {
                        "step": step,
                        "model": unwrap(model).state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "rng": rng_state(),
                        "extra": spec.extra_state() if spec.extra_state is not None else {},
                        "history": history,
                    },
                )
            record = segmenter_record(chosen, model_cfg, data, data_cfg.crop_size, role)
            # The exported network's val confusion matrix (all ranks' pixels), for the run's plots.
            label = next(k for k, net in evaluated.items() if unwrap(net) is unwrap(chosen))
            record |= {"metrics": metrics, "confusion": confusion[label].matrix.cpu().tolist()}
            torch.save(record, ckpt_dir / MODEL_FILE)
        report(metrics, ckpt_dir)
    return metrics
