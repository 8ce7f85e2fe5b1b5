"""What a teacher-signal cache is valid for: its key, the signals each teacher stores, its files."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mgd_ray.config import DistillJobConfig
from mgd_ray.data.stream import JobData
from mgd_ray.teachers import TeacherRoles, teacher_roles

FORMAT = "mgd_ray.teacher_cache/1"
# Fields of the key that must equal the job's for the cache to serve it, and how errors name them.
KEY_LABELS = {
    "manifest_sha256": "data manifest (file contents)",
    "data_files": "training files (names and sizes)",
    "seed": "schedule seed",
    "batch_labeled": "labeled batch size",
    "batch_unlabeled": "unlabeled batch size",
    "unlabeled_draw": "unlabeled draw (independent or shared order)",
    "crop_size": "crop size",
    "scales": "augmentation scales",
    "teacher_mode": "teacher mode",
    "teacher_precision": "teacher precision",
    "teacher_channels_last": "teacher channels_last",
    "world_size": "world size",
    "rank": "rank",
    "teachers": "teachers (names, architectures, checkpoint file hashes)",
}
KEY_FIELDS = tuple(KEY_LABELS)


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
    for ds in (d for d in (data.labeled, data.unlabeled) if d is not None):
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
        "unlabeled_draw": cfg.schedule.unlabeled_draw,
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


def stored_signals(roles: TeacherRoles, names: Iterable[str], pool_sizes: Iterable[int]) -> dict[str, list[str]]:
    """The signals (column names without the teacher) each teacher contributes in its roles."""
    out: dict[str, list[str]] = {}
    for name in names:
        signals = [
            s
            for s, role in (
                ("pl_l", roles.pixel_labeled),
                ("pl_mix", roles.pixel_unlabeled),
                ("logits_mix", roles.image),
            )
            if name in role
        ]
        out[name] = signals + ([f"feats_mix@{p}" for p in pool_sizes] if name in roles.region else [])
    return out


def needed_signals(cfg: DistillJobConfig) -> dict[str, list[str]]:
    """The signals each teacher contributes to this job's losses (at its pool size)."""
    return stored_signals(teacher_roles(cfg), cfg.teachers, [cfg.losses.pool_size])


def cache_files(directory: Path, rank: int, world_size: int) -> tuple[Path, Path]:
    stem = f"rank{rank}-of-{world_size}"
    return Path(directory) / f"{stem}.parquet", Path(directory) / f"{stem}.json"


def read_key(directory: Path | str, rank: int, world_size: int) -> dict[str, Any] | None:
    _, key_file = cache_files(Path(directory), rank, world_size)
    if not key_file.is_file():
        return None
    return json.loads(key_file.read_text())
