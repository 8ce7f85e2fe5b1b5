"""Building a teacher-signal cache: replay a job's batch stream and store its teachers' signals."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor, nn

from mgd_ray import losses
from mgd_ray.config import DistillJobConfig
from mgd_ray.data.stream import Batch, JobData, batches, load_job_data, with_manifest
from mgd_ray.distributed import DistEnv
from mgd_ray.metrics import IGNORE_INDEX
from mgd_ray.teacher_cache.key import FORMAT, cache_files, job_key, stored_signals
from mgd_ray.teachers import TeacherRoles, load_teachers, step_signals, teacher_roles

ROWS_PER_GROUP = 16
COMPRESSION = "zstd"


def step_columns(
    teachers: dict[str, nn.Module], b: Batch, roles: TeacherRoles, pool_sizes: list[int], batched: bool
) -> dict[str, Tensor]:
    """One step's cached columns: ``step_signals`` for the teachers' roles, pooled as the losses use them."""
    cols: dict[str, Tensor] = {}
    for name, s in step_signals(teachers, b, roles, batched).items():
        if name in roles.pixel_labeled:
            cols[f"{name}/pl_l"] = s.pl_l
        if name in roles.pixel_unlabeled:
            cols[f"{name}/pl_mix"] = s.pl_mix
        if name in roles.image:
            cols[f"{name}/logits_mix"] = losses.global_semantic_vector(s.logits_mix)
        if name in roles.region:
            for hv in pool_sizes:
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    iterations = int(iterations or cfg.schedule.iterations)
    pools = sorted({int(p) for p in (pool_sizes if pool_sizes is not None else [cfg.losses.pool_size])})
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank_list = list(range(world_size)) if ranks is None else sorted(set(ranks))
    _check_request(pools, rank_list, world_size, signals)
    cfg = with_manifest(cfg)
    data = load_job_data(cfg.data)
    if data.num_classes > IGNORE_INDEX:
        raise ValueError(f"build_cache: {data.num_classes} classes do not fit uint8 pseudo labels (255 = ignore)")
    roles = TeacherRoles.every(tuple(cfg.teachers)) if signals == "all" else teacher_roles(cfg)
    t0 = time.perf_counter()
    with _intra_op_threads(threads), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        teachers = load_teachers(cfg, data.num_classes, dev)
        files = [
            _build_rank(
                cfg, data, teachers, DistEnv(rank, world_size, dev), out, roles, pools, iterations, rows_per_group
            )
            for rank in rank_list
        ]
    summary: dict[str, Any] = {"directory": str(out), "files": [str(f) for f in files], "iterations": iterations}
    summary |= {"pool_sizes": pools, "bytes": sum(f.stat().st_size for f in files)}
    summary |= _sizes(summary["bytes"], iterations, len(rank_list), world_size, cfg, data)
    summary |= {"seconds": time.perf_counter() - t0, "signals": stored_signals(roles, cfg.teachers, pools)}
    if verbose:
        print(f"[teacher_cache] {out}: {iterations} steps × {len(rank_list)} rank(s), {_describe(summary)}", flush=True)
    return summary


@contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (when given) inside, the caller's again after."""
    caller = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(caller)


def _describe(summary: dict[str, Any]) -> str:
    return (
        f"pool sizes {summary['pool_sizes']}, {summary['bytes'] / 2**20:.2f} MiB on disk = "
        f"{summary['bytes_per_step'] / 1024:.1f} KiB/step, {summary['bytes_per_epoch'] / 2**20:.2f} MiB/epoch "
        f"({summary['bytes_per_training_image'] / 1024:.1f} KiB per training image), built in {summary['seconds']:.1f}s"
    )


def _check_request(pools: list[int], ranks: list[int], world_size: int, signals: str) -> None:
    if not pools:
        raise ValueError("build_cache: give at least one pool size")
    if any(not 0 <= r < world_size for r in ranks):
        raise ValueError(f"build_cache: ranks {ranks} outside world size {world_size}")
    if signals not in ("job", "all"):
        raise ValueError(f"build_cache: signals must be 'job' or 'all', got {signals!r}")


def _sizes(
    total: int, iterations: int, ranks: int, world_size: int, cfg: DistillJobConfig, data: JobData
) -> dict[str, float]:
    """Bytes per rank's step, and per epoch (one pass over the unlabeled set) and training image."""
    n_unlabeled = max(len(data.unlabeled) if data.unlabeled is not None else 0, 1)
    steps_per_epoch = n_unlabeled / (cfg.schedule.batch_unlabeled * world_size)
    per_step = total / (iterations * ranks)
    return {
        "bytes_per_step": per_step,
        "bytes_per_epoch": per_step * steps_per_epoch * world_size,
        "bytes_per_training_image": per_step * steps_per_epoch * world_size / n_unlabeled,
        "steps_per_epoch": steps_per_epoch,
    }


def _encode(t: Tensor, dtype: np.dtype) -> bytes:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(dtype, copy=False)).tobytes()


def write_steps(
    path: Path, steps: Iterable[dict[str, Tensor]], rows_per_group: int = ROWS_PER_GROUP
) -> dict[str, dict[str, Any]]:
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
        table = pa.table(
            {"step": pa.array(rows["step"], pa.int32())} | {c: pa.array(rows[c], pa.binary()) for c in columns}
        )
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
    roles: TeacherRoles,
    pools: list[int],
    iterations: int,
    rows_per_group: int,
) -> Path:
    """One rank's Parquet file, then its key (written last: a half-built cache has none)."""
    parquet, key_file = cache_files(out, env.rank, env.world_size)
    key_file.unlink(missing_ok=True)  # invalid while rebuilding
    tmp = parquet.with_suffix(".parquet.tmp")
    stream = batches(data, cfg.schedule, cfg.data.loader_workers, env, 0, True)
    batched = cfg.teacher_mode == "eval"
    steps = (step_columns(teachers, next(stream), roles, pools, batched) for _ in range(iterations))
    columns = write_steps(tmp, steps, rows_per_group)
    tmp.replace(parquet)
    key = {
        "format": FORMAT,
        "key": job_key(cfg, data, env.world_size, env.rank),
        "iterations": iterations,
        "pool_sizes": pools,
        "signals": stored_signals(roles, cfg.teachers, pools),
        "columns": columns,
        "num_classes": data.num_classes,
        "file": parquet.name,
        "bytes": parquet.stat().st_size,
        "info": {"torch": torch.__version__, "device": str(env.device), "built": time.strftime("%Y-%m-%dT%H:%M:%S")},
    }
    key_file.write_text(json.dumps(key, indent=1))
    return parquet
