"""Reading a teacher-signal cache: whether it can serve a job, and its signals step by step."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from mgd_ray.config import DistillJobConfig
from mgd_ray.data.stream import JobData, load_job_data, with_manifest
from mgd_ray.distributed import DistEnv
from mgd_ray.teacher_cache.key import FORMAT, KEY_FIELDS, KEY_LABELS, cache_files, job_key, needed_signals, read_key
from mgd_ray.teachers import TeacherSignals


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

    def signals(self, index: int, pool_size: int) -> dict[str, TeacherSignals] | None:
        """Every teacher's signals at stream step ``index`` (= fit step - 1), or None past the cache's end."""
        if not 0 <= index < self.steps:
            return None
        self._load(index)
        assert self._table is not None
        row = self._rows[index]
        out = {}
        for name in self.teachers:
            s = TeacherSignals()
            for col, attr in (
                ("pl_l", "pl_l"),
                ("pl_mix", "pl_mix"),
                ("logits_mix", "logits_mix"),
                (f"feats_mix@{pool_size}", "feats_mix"),
            ):
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


def _key_mismatches(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """The key fields where the cache (``have``) was built for another stream or teachers than the job's."""
    mismatches = [
        f"{KEY_LABELS[f]} differs (cache {_describe(have.get(f))}, job {_describe(want[f])})"
        for f in KEY_FIELDS
        if f != "teachers" and have.get(f) != want[f]
    ]
    # A cache of several teachers serves a job that uses some of them (a study's teacher choices).
    cached_teachers = have.get("teachers") or {}
    return mismatches + [
        f"{KEY_LABELS['teachers']} differs for {name} (cache {_describe(cached_teachers.get(name))}, job {_describe(entry)})"
        for name, entry in want["teachers"].items()
        if cached_teachers.get(name) != entry
    ]


def _missing_signals(cfg: DistillJobConfig, meta: dict[str, Any]) -> list[str]:
    missing = []
    for name, signals in needed_signals(cfg).items():
        for s in signals:
            if f"{name}/{s}" not in meta["columns"]:
                what = f"pool size {s.split('@')[1]} (cached: {meta['pool_sizes']})" if s.startswith("feats") else s
                missing.append(f"{name} {what}")
    return missing


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
        cfg = with_manifest(cfg)
        data = load_job_data(cfg.data)
    meta = read_key(directory, rank, world_size)
    parquet, key_file = cache_files(Path(directory), rank, world_size)
    where = str(directory)
    if meta is None:
        found = sorted(p.name for p in Path(directory).glob("rank*-of-*.json")) if Path(directory).is_dir() else []
        return CacheStatus(
            False,
            f"teacher cache {directory}: no key file {key_file.name} for rank {rank} of world size {world_size}"
            + (f" (found {', '.join(found)})" if found else " (the cache is missing or was not finished)"),
            directory=where,
        ), None
    if meta.get("format") != FORMAT or not parquet.is_file():
        reason = f"teacher cache {directory}: {key_file.name} is not a {FORMAT} key or its Parquet file is missing"
        return CacheStatus(False, reason, directory=where), None
    mismatches = _key_mismatches(meta["key"], job_key(cfg, data, world_size, rank))
    if mismatches:
        reason = f"teacher cache {directory} was built for another stream or teachers: " + "; ".join(mismatches)
        return CacheStatus(False, reason, directory=where, mismatches=mismatches), meta
    missing = _missing_signals(cfg, meta)
    if missing:
        reason = f"teacher cache {directory} lacks signals this job needs: {', '.join(missing)}"
        return CacheStatus(False, reason, directory=where, mismatches=missing), meta
    steps = int(meta["iterations"])
    need = cfg.schedule.iterations
    if steps <= start_step:
        reason = f"teacher cache {directory} covers steps 1..{steps}, the job starts at step {start_step + 1}"
        return CacheStatus(False, reason, steps, where), meta
    reason = f"teacher cache {directory}: serving steps 1..{min(steps, need)}"
    if steps < need:
        reason += f"; steps {steps + 1}..{need} run the teachers (the cache covers {steps})"
    return CacheStatus(True, reason, steps, where), meta


def open_cache(
    cfg: DistillJobConfig, data: JobData, env: DistEnv, start_step: int = 0
) -> tuple[TeacherCache | None, CacheStatus]:
    """The reader for this rank when the cache can serve the job, else None; and the status."""
    status, meta = check_cache(cfg, data, env.rank, env.world_size, start_step)
    if not status.hit or meta is None:
        return None, status
    parquet, _ = cache_files(Path(cfg.teacher_cache), env.rank, env.world_size)  # type: ignore[arg-type]
    return TeacherCache(parquet, meta, env.device, cfg.teachers), status
