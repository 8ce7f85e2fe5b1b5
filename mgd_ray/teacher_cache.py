"""Teacher-signal cache: the frozen teachers' contributions to every step, computed once per study.

Every trial of a study draws the same batch stream (``jobs.common.batches``: data order,
augmentation and CutMix masks are functions of the schedule seed, step, rank and world size only,
never of the global RNG), so the frozen teachers' signals at step k are the same in every trial.
``build_cache`` replays that stream, runs each teacher exactly as ``run_distill`` does
(``teacher_signals``, same inputs, same batching) and stores per step:

- ``pl_l`` and ``pl_mix``: pixel pseudo labels (uint8; 255 = ignore would be kept as is),
- ``logits_mix``: the teacher's logits on x_mix after global average pooling, (N, C) float32 —
  all the image-level term uses of them (``losses.image_level_loss`` takes pooled logits),
- ``feats_mix@H``: the teacher's decoder features on x_mix adaptive-average-pooled to H×H and
  flattened, (N, 256, H²) float32, for every H_v in ``pool_sizes`` — all the region-level term uses
  (``losses.region_level_loss`` takes pooled vectors).

Layout of a cache directory, one pair of files per rank of the world size it was built for::

    rank{r}-of-{W}.parquet   one row per step: "step" (0-based stream position = fit step - 1)
                             and one binary column per (teacher, signal), raw little-endian
                             array bytes, zstd-compressed, ``ROWS_PER_GROUP`` steps per row group
    rank{r}-of-{W}.json      the key: what the file is valid for (``KEY_FIELDS``), steps covered,
                             pool sizes, signals per teacher, column dtypes/shapes, sizes

A job reads it through ``open_cache``: when every key field matches the job and the cache holds
every signal the job's losses need, steps are served from the cache (``TeacherCache.signals``);
otherwise the job runs its teachers and the returned ``CacheStatus.reason`` says why. The
``.json`` key is written last, so a half-built cache is never taken for a valid one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from mgd_ray import losses
from mgd_ray.config import DistillJobConfig
from mgd_ray.distributed import DistEnv
from mgd_ray.jobs.common import JobData, batches, load_job_data, prepare_manifest
from mgd_ray.metrics import IGNORE_INDEX

FORMAT = "mgd_ray.teacher_cache/1"
ROWS_PER_GROUP = 16
COMPRESSION = "zstd"
# Fields of the key that must equal the job's for the cache to serve it.
KEY_FIELDS = (
    "manifest_sha256",
    "data_files",
    "seed",
    "batch_labeled",
    "batch_unlabeled",
    "crop_size",
    "scales",
    "teacher_mode",
    "teacher_precision",
    "teacher_channels_last",
    "world_size",
    "rank",
    "teachers",
)
KEY_LABELS = {
    "manifest_sha256": "data manifest (file contents)",
    "data_files": "training files (names and sizes)",
    "seed": "schedule seed",
    "batch_labeled": "labeled batch size",
    "batch_unlabeled": "unlabeled batch size",
    "crop_size": "crop size",
    "scales": "augmentation scales",
    "teacher_mode": "teacher mode",
    "teacher_precision": "teacher precision",
    "teacher_channels_last": "teacher channels_last",
    "world_size": "world size",
    "rank": "rank",
    "teachers": "teachers (names, architectures, checkpoint file hashes)",
}


# ---------------------------------------------------------------------------- keys
def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_HASHES: dict[tuple[str, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    """``file_sha256`` memoised on (path, size, mtime): a trial hashes a teacher checkpoint once."""
    st = os.stat(path)
    k = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if k not in _HASHES:
        _HASHES[k] = file_sha256(path)
    return _HASHES[k]


def _data_files_fingerprint(data: JobData) -> str:
    """SHA-256 of the training files' paths and sizes (cheap: one stat per file, no reads)."""
    h = hashlib.sha256()
    for ds in (data.labeled, data.unlabeled):
        for image, label in zip(ds.images, ds.labels, strict=True):
            for p in (image, label):
                if p is not None:
                    h.update(f"{p}\0{os.stat(p).st_size}\n".encode())
    return h.hexdigest()


def job_key(cfg: DistillJobConfig, data: JobData, world_size: int, rank: int) -> dict[str, Any]:
    """What a cache must have been built for to serve this job on this rank."""
    return {
        "manifest_sha256": _cached_sha256(data.manifest),
        "data_files": _data_files_fingerprint(data),
        "seed": cfg.schedule.seed,
        "batch_labeled": cfg.schedule.batch_labeled,
        "batch_unlabeled": cfg.schedule.batch_unlabeled,
        "crop_size": cfg.data.crop_size,
        "scales": [float(s) for s in cfg.data.scales],
        "teacher_mode": cfg.teacher_mode,
        "teacher_precision": cfg.teacher_precision,
        "teacher_channels_last": cfg.teacher_channels_last,
        "world_size": world_size,
        "rank": rank,
        "teachers": {
            name: {"model": ref.model.model_dump(mode="json"), "checkpoint_sha256": _cached_sha256(ref.checkpoint)}
            for name, ref in sorted(cfg.teachers.items())
        },
    }


def needed_signals(cfg: DistillJobConfig) -> dict[str, list[str]]:
    """The signals each teacher contributes to this job's losses (column names without the teacher)."""
    lc = cfg.losses
    pixel = set(lc.pixel_teachers if lc.pixel_teachers is not None else cfg.teachers)
    out: dict[str, list[str]] = {}
    for name in cfg.teachers:
        sig = []
        if name in pixel and lc.pixel_labeled:
            sig.append("pl_l")
        if name in pixel and lc.pixel_unlabeled:
            sig.append("pl_mix")
        if name in lc.image_teachers:
            sig.append("logits_mix")
        if name in lc.region_teachers:
            sig.append(f"feats_mix@{lc.pool_size}")
        out[name] = sig
    return out


def cache_files(directory: Path, rank: int, world_size: int) -> tuple[Path, Path]:
    stem = f"rank{rank}-of-{world_size}"
    return Path(directory) / f"{stem}.parquet", Path(directory) / f"{stem}.json"


# ---------------------------------------------------------------------------- building
def _encode(t: Tensor, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype, copy=False)).tobytes()


def step_columns(
    teachers: dict[str, nn.Module], b: Any, stored: dict[str, list[str]], pool_sizes: list[int], batched: bool
) -> dict[str, Tensor]:
    """One step's cached columns: ``teacher_signals`` with the flags of the job, then pooled."""
    from mgd_ray.jobs.distill import teacher_signals

    cols: dict[str, Tensor] = {}
    for name, t in teachers.items():
        sig = stored[name]
        pixel = "pl_l" in sig or "pl_mix" in sig
        image = "logits_mix" in sig
        region = any(s.startswith("feats_mix@") for s in sig)
        s = teacher_signals(t, b, pixel=pixel, image=image, region=region, batched=batched)
        if "pl_l" in sig:
            cols[f"{name}/pl_l"] = s.pl_l
        if "pl_mix" in sig:
            cols[f"{name}/pl_mix"] = s.pl_mix
        if image:
            cols[f"{name}/logits_mix"] = losses.global_semantic_vector(s.logits_mix)
        for hv in pool_sizes:
            if f"feats_mix@{hv}" in sig:
                cols[f"{name}/feats_mix@{hv}"] = losses.region_vectors(s.feats_mix, hv)
    return cols


def build_cache(
    cfg: DistillJobConfig,
    out_dir: Path | str,
    pool_sizes: Iterable[int] | None = None,
    iterations: int | None = None,
    world_size: int = 1,
    ranks: Iterable[int] | None = None,
    signals: str = "job",
    device: torch.device | str | None = None,
    rows_per_group: int = ROWS_PER_GROUP,
    verbose: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Replay the batch stream of ``cfg``'s distillation job and store its teachers' signals.

    ``pool_sizes``: every H_v trials may use (default: ``cfg.losses.pool_size``); ``iterations``:
    steps covered (default ``cfg.schedule.iterations``; trials with fewer steps are served too);
    ``world_size``/``ranks``: the DDP layout of the trials, one file per rank (``ranks`` lets
    several tasks build one rank each); ``signals``: ``"job"`` stores what ``cfg``'s losses use
    (its teacher roles; λ1, λ2 and H_v may differ across trials), ``"all"`` every signal of every
    teacher (for studies that also vary which teacher plays which role; exact up to float
    rounding when a trial's teacher then runs on a different set of inputs).

    Returns a summary (files, bytes on disk, bytes per step and per training image, seconds) and
    prints it. ``threads``: torch's intra-op threads while building (the caller's setting is
    restored after); a study gives the build every CPU its search will use, as nothing else runs
    then. The global RNG is left as it was.
    """
    from mgd_ray.jobs.distill import load_teachers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    iterations = int(iterations or cfg.schedule.iterations)
    pools = sorted({int(p) for p in (pool_sizes if pool_sizes is not None else [cfg.losses.pool_size])})
    if not pools:
        raise ValueError("build_cache: give at least one pool size")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank_list = list(range(world_size)) if ranks is None else sorted(set(ranks))
    if any(not 0 <= r < world_size for r in rank_list):
        raise ValueError(f"build_cache: ranks {rank_list} outside world size {world_size}")
    if signals not in ("job", "all"):
        raise ValueError(f"build_cache: signals must be 'job' or 'all', got {signals!r}")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"manifest": prepare_manifest(cfg.data)})})
    data = load_job_data(cfg.data)
    if data.num_classes > IGNORE_INDEX:
        raise ValueError(f"build_cache: {data.num_classes} classes do not fit uint8 pseudo labels (255 = ignore)")
    base = ["pl_l", "pl_mix", "logits_mix"]
    if signals == "all":
        stored = {name: base + [f"feats_mix@{p}" for p in pools] for name in cfg.teachers}
    else:
        need = needed_signals(cfg)
        stored = {
            name: [s for s in base if s in sig] + ([f"feats_mix@{p}" for p in pools] if any(s.startswith("feats") for s in sig) else [])
            for name, sig in need.items()
        }
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"directory": str(out), "files": [], "bytes": 0, "iterations": iterations, "pool_sizes": pools}
    caller_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            teachers = load_teachers(cfg, data.num_classes, dev)
            for rank in rank_list:
                env = DistEnv(rank, world_size, dev)
                summary["bytes"] += _build_rank(cfg, data, teachers, env, out, stored, pools, iterations, rows_per_group, summary)
    finally:
        torch.set_num_threads(caller_threads)
    seconds = time.perf_counter() - t0
    n_unlabeled = max(len(data.unlabeled), 1)
    steps_per_epoch = n_unlabeled / (cfg.schedule.batch_unlabeled * world_size)  # one pass over the unlabeled set
    per_step = summary["bytes"] / (iterations * len(rank_list))  # one rank's step
    summary |= {
        "seconds": seconds,
        "bytes_per_step": per_step,
        "bytes_per_epoch": per_step * steps_per_epoch * world_size,
        "bytes_per_training_image": per_step * steps_per_epoch * world_size / n_unlabeled,
        "steps_per_epoch": steps_per_epoch,
        "signals": stored,
    }
    if verbose:
        print(
            f"[teacher_cache] {out}: {iterations} steps × {len(rank_list)} rank(s), pool sizes {pools}, "
            f"{summary['bytes'] / 2**20:.2f} MiB on disk = {per_step / 1024:.1f} KiB/step, "
            f"{summary['bytes_per_epoch'] / 2**20:.2f} MiB/epoch ({summary['bytes_per_training_image'] / 1024:.1f} "
            f"KiB per training image), built in {seconds:.1f}s",
            flush=True,
        )
    return summary


def write_steps(path: Path, steps: Iterable[dict[str, Tensor]], rows_per_group: int = ROWS_PER_GROUP) -> dict[str, dict[str, Any]]:
    """Write one row per step (columns as ``step_columns`` makes them) to a Parquet file.

    Pseudo labels as uint8, the rest float32, each a binary cell of raw array bytes; zstd. Returns
    each column's dtype and shape (the same at every step: crops and batches have fixed sizes).
    """
    columns: dict[str, dict[str, Any]] = {}
    writer: pq.ParquetWriter | None = None
    rows: dict[str, list[Any]] = {}

    def flush() -> None:
        nonlocal writer
        if not rows.get("step"):
            return
        table = pa.table({"step": pa.array(rows["step"], pa.int32())} | {c: pa.array(rows[c], pa.binary()) for c in columns})
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression=COMPRESSION, use_dictionary=False)
        writer.write_table(table, row_group_size=rows_per_group)
        for v in rows.values():
            v.clear()

    try:
        for k, cols in enumerate(steps):
            if not columns:
                columns = {
                    c: {"dtype": "uint8" if c.split("/")[-1].startswith("pl_") else "float32", "shape": list(t.shape)}
                    for c, t in cols.items()
                }
                rows = {"step": []} | {c: [] for c in columns}
            rows["step"].append(k)
            for c, spec in columns.items():
                rows[c].append(_encode(cols[c], np.dtype(spec["dtype"])))
            if len(rows["step"]) == rows_per_group:
                flush()
        flush()
    finally:
        if writer is not None:
            writer.close()
    return columns


def _build_rank(
    cfg: DistillJobConfig,
    data: JobData,
    teachers: dict[str, nn.Module],
    env: DistEnv,
    out: Path,
    stored: dict[str, list[str]],
    pools: list[int],
    iterations: int,
    rows_per_group: int,
    summary: dict[str, Any],
) -> int:
    parquet, key_file = cache_files(out, env.rank, env.world_size)
    key_file.unlink(missing_ok=True)  # invalid while rebuilding
    tmp = parquet.with_suffix(".parquet.tmp")
    stream = batches(data, cfg.schedule, cfg.data.loader_workers, env, 0, True)
    batched = cfg.teacher_mode == "eval"
    steps = (step_columns(teachers, next(stream), stored, pools, batched) for _ in range(iterations))
    columns = write_steps(tmp, steps, rows_per_group)
    tmp.replace(parquet)
    size = parquet.stat().st_size
    key = {
        "format": FORMAT,
        "key": job_key(cfg, data, env.world_size, env.rank),
        "iterations": iterations,
        "pool_sizes": pools,
        "signals": stored,
        "columns": columns,
        "num_classes": data.num_classes,
        "file": parquet.name,
        "bytes": size,
        "info": {"torch": torch.__version__, "device": str(env.device), "built": time.strftime("%Y-%m-%dT%H:%M:%S")},
    }
    key_file.write_text(json.dumps(key, indent=1))
    summary["files"].append(str(parquet))
    return size


# ---------------------------------------------------------------------------- reading
@dataclass
class CacheStatus:
    """Whether a job's steps come from the cache; ``reason`` says why not (or what it covers)."""

    hit: bool
    reason: str
    steps: int = 0  # steps the cache covers (fit steps 1..steps)
    directory: str | None = None
    mismatches: list[str] = field(default_factory=list)


class TeacherCache:
    """One rank's cached teacher signals, read one row group at a time."""

    def __init__(self, parquet: Path, meta: dict[str, Any], device: torch.device, teachers: Iterable[str]):
        self.file = pq.ParquetFile(parquet)
        self.meta = meta
        self.device = device
        self.teachers = list(teachers)
        self.steps = int(meta["iterations"])
        self._group: int | None = None
        self._rows: dict[int, int] = {}
        self._table: pa.Table | None = None
        starts, pos = [], 0
        for g in range(self.file.num_row_groups):
            starts.append(pos)
            pos += self.file.metadata.row_group(g).num_rows
        self._starts = starts

    def _load(self, index: int) -> None:
        g = int(np.searchsorted(self._starts, index, side="right")) - 1
        if g != self._group:
            self._table = self.file.read_row_group(g)
            self._rows = {int(s): i for i, s in enumerate(self._table["step"].to_pylist())}
            self._group = g

    def signals(self, index: int, pool_size: int) -> dict[str, Any] | None:
        """Teacher signals of stream step ``index`` (= fit step - 1) as ``TeacherSignals``, or None."""
        from mgd_ray.jobs.distill import TeacherSignals

        if not 0 <= index < self.steps:
            return None
        self._load(index)
        assert self._table is not None
        row = self._rows[index]
        out = {}
        for name in self.teachers:
            s = TeacherSignals()
            for col, attr in (("pl_l", "pl_l"), ("pl_mix", "pl_mix"), ("logits_mix", "logits_mix"), (f"feats_mix@{pool_size}", "feats_mix")):
                full = f"{name}/{col}"
                spec = self.meta["columns"].get(full)
                if spec is None:
                    continue
                raw = self._table[full][row].as_py()
                t = torch.from_numpy(np.frombuffer(raw, dtype=spec["dtype"]).reshape(spec["shape"]).copy())
                if spec["dtype"] == "uint8":
                    t = t.long()  # the dtype a live teacher's argmax has
                setattr(s, attr, t.to(self.device))
            out[name] = s
        return out


def _describe(v: Any) -> str:
    text = json.dumps(v, sort_keys=True) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:16] + "…"


def read_key(directory: Path | str, rank: int, world_size: int) -> dict[str, Any] | None:
    _, key_file = cache_files(Path(directory), rank, world_size)
    if not key_file.is_file():
        return None
    return json.loads(key_file.read_text())


def check_cache(
    cfg: DistillJobConfig, data: JobData | None = None, rank: int = 0, world_size: int = 1, start_step: int = 0
) -> tuple[CacheStatus, dict[str, Any] | None]:
    """Whether ``cfg.teacher_cache`` can serve this job on ``rank``; the status and the key read.

    Cheap enough for a driver to call before a trial starts (hashes the manifest and the teacher
    checkpoints; runs nothing), e.g. to tag the trial's MLflow run with ``status.reason``.
    """
    directory = cfg.teacher_cache
    if directory is None:
        return CacheStatus(False, "no teacher cache configured"), None
    if data is None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"manifest": prepare_manifest(cfg.data)})})
        data = load_job_data(cfg.data)
    meta = read_key(directory, rank, world_size)
    parquet, key_file = cache_files(Path(directory), rank, world_size)
    if meta is None:
        found = sorted(p.name for p in Path(directory).glob("rank*-of-*.json")) if Path(directory).is_dir() else []
        return CacheStatus(
            False,
            f"teacher cache {directory}: no key file {key_file.name} for rank {rank} of world size {world_size}"
            + (f" (found {', '.join(found)})" if found else " (the cache is missing or was not finished)"),
            directory=str(directory),
        ), None
    if meta.get("format") != FORMAT or not parquet.is_file():
        return CacheStatus(False, f"teacher cache {directory}: {key_file.name} is not a {FORMAT} key or its Parquet file is missing", directory=str(directory)), None
    want = job_key(cfg, data, world_size, rank)
    have = meta["key"]
    mismatches = [
        f"{KEY_LABELS[f]} differs (cache {_describe(have.get(f))}, job {_describe(want[f])})"
        for f in KEY_FIELDS
        if f != "teachers" and have.get(f) != want[f]
    ]
    # A cache of several teachers serves a job that uses some of them (a study's teacher choices).
    cached_teachers = have.get("teachers") or {}
    mismatches += [
        f"{KEY_LABELS['teachers']} differs for {name} (cache {_describe(cached_teachers.get(name))}, job {_describe(entry)})"
        for name, entry in want["teachers"].items()
        if cached_teachers.get(name) != entry
    ]
    if mismatches:
        return CacheStatus(
            False, f"teacher cache {directory} was built for another stream or teachers: " + "; ".join(mismatches), directory=str(directory), mismatches=mismatches
        ), meta
    missing = []
    for name, sig in needed_signals(cfg).items():
        for s in sig:
            if f"{name}/{s}" not in meta["columns"]:
                what = f"pool size {s.split('@')[1]} (cached: {meta['pool_sizes']})" if s.startswith("feats") else s
                missing.append(f"{name} {what}")
    if missing:
        return CacheStatus(False, f"teacher cache {directory} lacks signals this job needs: {', '.join(missing)}", directory=str(directory), mismatches=missing), meta
    steps = int(meta["iterations"])
    need = cfg.schedule.iterations
    if steps <= start_step:
        return CacheStatus(False, f"teacher cache {directory} covers steps 1..{steps}, the job starts at step {start_step + 1}", steps, str(directory)), meta
    reason = f"teacher cache {directory}: serving steps 1..{min(steps, need)}"
    if steps < need:
        reason += f"; steps {steps + 1}..{need} run the teachers (the cache covers {steps})"
    return CacheStatus(True, reason, steps, str(directory)), meta


def open_cache(cfg: DistillJobConfig, data: JobData, env: DistEnv, start_step: int = 0) -> tuple[TeacherCache | None, CacheStatus]:
    """The reader for this rank when the cache can serve the job, else None; and the status."""
    status, meta = check_cache(cfg, data, env.rank, env.world_size, start_step)
    if not status.hit or meta is None:
        return None, status
    parquet, _ = cache_files(Path(cfg.teacher_cache), env.rank, env.world_size)  # type: ignore[arg-type]
    return TeacherCache(parquet, meta, env.device, cfg.teachers), status
