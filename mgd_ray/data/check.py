"""Read every file of a dataset once, before anything trains: every problem in one report, with the fix.

``check_manifest`` decodes each image and mask of a manifest (a truncated file fails to decode),
checks each mask's mode, values and size against its image, and finds ids and images that appear
twice or in two roles. It counts the pixels of each class per role (labeled, val, test) and warns
about classes val cannot measure. Files are read in threads (Pillow decodes without the GIL), and
each file's verdict is cached by path, size and modification time, so a second check of the same
folder reads nothing it has read before.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from mgd_ray.config import DataConfig
from mgd_ray.data.datasets import IGNORE_INDEX, DatasetError, load_mask
from mgd_ray.data.partitions import manifest_meta, read_manifest
from mgd_ray.data.stream import prepare_manifest
from mgd_ray.files import atomic_write

CACHE_FORMAT = "mgd_ray.data_check/1"
CACHE_FILE = ".mgd_ray_check.json"
ROLES = ("labeled", "unlabeled", "val", "test")
# A class with fewer labeled pixels than this share of a split's can be counted but not measured.
FEW_PIXELS = 1e-3


@dataclass(frozen=True)
class FileVerdict:
    """One manifest row's problems (each naming the file and the fix) and its mask's pixels per class."""

    problems: tuple[str, ...] = ()
    pixels: tuple[int, ...] | None = None


@dataclass
class DataReport:
    """What ``check_manifest`` found: problems (each one a line to fix), warnings, and the counts."""

    manifest: Path
    class_names: list[str]
    images: dict[str, int]  # role -> images
    pixels: dict[str, list[int]]  # role -> labeled pixels per class
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    read: int = 0  # rows whose files were read (the others came from the cache)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        """The report as a user reads it: counts, the pixel table, warnings, then every problem."""
        counts = ", ".join(f"{role} {n}" for role, n in self.images.items() if n)
        lines = [
            f"data check of {self.manifest}: {counts} images; {self.read} read, the rest cached ({self.seconds:.1f} s)"
        ]
        roles = [r for r in ("labeled", "val", "test") if self.images.get(r)]
        width = max(len(n) for n in self.class_names)
        lines.append(f"  {'pixels per class':{width}s} " + " ".join(f"{r:>12s}" for r in roles))
        for c, name in enumerate(self.class_names):
            lines.append(f"  {name:{width}s} " + " ".join(f"{self.pixels[r][c]:12,d}" for r in roles))
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.problems:
            lines.append(f"  {len(self.problems)} problem(s); nothing trains until they are fixed:")
            lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def check_file(image: str, label: str | None, num_classes: int) -> FileVerdict:
    """Decode ``image`` and its ``label`` mask; their problems and the mask's pixels per class."""
    problems = []
    size = None
    try:
        with Image.open(image) as im:
            size = im.size
            im.load()  # decodes every byte: a truncated or corrupt file fails here, not hours into training
    except (OSError, SyntaxError, ValueError) as err:
        problems.append(f"{image}: cannot decode image ({err}); replace the file or remove its id from the dataset")
    if label is None:
        return FileVerdict(tuple(problems))
    try:
        mask = load_mask(Path(label), num_classes)
    except DatasetError as err:
        return FileVerdict((*problems, str(err)))
    if size is not None and (mask.shape[1], mask.shape[0]) != size:
        problems.append(
            f"{label}: mask is {mask.shape[1]}×{mask.shape[0]} but its image {image} is {size[0]}×{size[1]} (W×H); "
            "masks must have their image's size"
        )
    pixels = np.bincount(mask[mask != IGNORE_INDEX].ravel(), minlength=num_classes)
    return FileVerdict(tuple(problems), tuple(int(p) for p in pixels))


def _stamp(path: str | None) -> list[int] | None:
    """(size, mtime in ns) of a file, or None when it has no file (an unlabeled row's mask)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return [-1, -1]  # missing: never a cache hit, and check_file says what is wrong
    return [st.st_size, st.st_mtime_ns]


class VerdictCache:
    """Verdicts by (image, mask, their sizes and mtimes, class count), in a JSON file beside the manifest."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path is not None and path.is_file():
            try:
                raw = json.loads(path.read_text())
                if raw.get("format") == CACHE_FORMAT:
                    self.entries = raw["entries"]
            except (OSError, ValueError):
                self.entries = {}  # an unreadable cache is rebuilt

    @staticmethod
    def key(image: str, label: str | None, num_classes: int) -> str:
        return json.dumps([image, _stamp(image), label, _stamp(label), num_classes])

    def get(self, key: str) -> FileVerdict | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        return FileVerdict(tuple(entry["problems"]), None if entry["pixels"] is None else tuple(entry["pixels"]))

    def put(self, key: str, verdict: FileVerdict) -> None:
        self.entries[key] = {"problems": list(verdict.problems), "pixels": verdict.pixels}

    def save(self) -> None:
        """Written atomically; a read-only dataset folder just goes without a cache."""
        if self.path is None:
            return
        text = json.dumps({"format": CACHE_FORMAT, "entries": self.entries})
        try:
            atomic_write(self.path, lambda temporary: temporary.write_text(text))
        except OSError:
            pass


def _duplicates(table: pa.Table) -> list[str]:
    """Ids listed twice, and one image file under two ids or in two roles."""
    problems = []
    ids, images, roles = table["id"].to_pylist(), table["image_path"].to_pylist(), table["subset"].to_pylist()
    by_id: dict[str, list[str]] = defaultdict(list)
    by_image: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for sample_id, image, role in zip(ids, images, roles, strict=True):
        by_id[sample_id].append(role)
        by_image[os.path.realpath(image)].append((sample_id, role))
    for sample_id, where in by_id.items():
        if len(where) > 1:
            problems.append(f"id {sample_id!r} appears {len(where)} times ({', '.join(where)}); keep it in one role")
    for image, uses in by_image.items():
        if len(uses) > 1:
            named = ", ".join(f"{i!r} ({r})" for i, r in uses)
            problems.append(f"{image}: one image file under {named}; an image may appear once, in one role")
    return problems


def _class_warnings(pixels: dict[str, list[int]], class_names: Sequence[str]) -> list[str]:
    warnings = []
    for role in ("val", "test"):
        counts = pixels.get(role)
        if not counts or not sum(counts):
            continue
        total = sum(counts)
        for name, n in zip(class_names, counts, strict=True):
            if n == 0:
                warnings.append(f"class {name!r} has no pixel in {role}: its IoU is undefined and left out of the mean")
            elif n < FEW_PIXELS * total:
                warnings.append(
                    f"class {name!r} has {n:,} pixels in {role} ({100 * n / total:.3f}% of its labeled pixels): "
                    "too few to measure its IoU reliably; add images that show it"
                )
    return warnings


def check_manifest(
    table: pa.Table,
    manifest: Path,
    num_classes: int,
    class_names: Sequence[str],
    cache: Path | None = None,
    threads: int | None = None,
) -> DataReport:
    """Check every row of a manifest (see the module docstring); ``cache``: the verdict cache file."""
    start = time.perf_counter()
    store = VerdictCache(cache)
    rows = list(
        zip(table["image_path"].to_pylist(), table["label_path"].to_pylist(), table["subset"].to_pylist(), strict=True)
    )
    keys = [store.key(image, label, num_classes) for image, label, _ in rows]
    verdicts: list[FileVerdict | None] = [store.get(k) for k in keys]
    todo = [i for i, v in enumerate(verdicts) if v is None]
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        for i, verdict in zip(
            todo, pool.map(lambda i: check_file(rows[i][0], rows[i][1], num_classes), todo), strict=True
        ):
            verdicts[i] = verdict
            store.put(keys[i], verdict)
    if todo:
        store.save()
    report = DataReport(
        manifest=Path(manifest),
        class_names=list(class_names),
        images={role: 0 for role in ROLES},
        pixels={role: [0] * num_classes for role in ROLES},
        problems=_duplicates(table),
        read=len(todo),
    )
    for (_, _, role), verdict in zip(rows, verdicts, strict=True):
        assert verdict is not None
        report.images[role] += 1
        report.problems += verdict.problems
        if verdict.pixels is not None:
            report.pixels[role] = [a + b for a, b in zip(report.pixels[role], verdict.pixels, strict=True)]
    report.warnings = _class_warnings(report.pixels, report.class_names)
    report.seconds = time.perf_counter() - start
    return report


def check_data(cfg: DataConfig, threads: int | None = None) -> DataReport:
    """``check_manifest`` of the configured dataset's manifest (built if needed), cached beside it."""
    manifest = prepare_manifest(cfg)
    table = read_manifest(manifest)
    meta = manifest_meta(table)
    return check_manifest(
        table, manifest, int(meta["num_classes"]), meta["class_names"], manifest.parent / CACHE_FILE, threads
    )


def require_clean(report: DataReport) -> DataReport:
    """The report, or a ``DatasetError`` carrying it whole when it found problems."""
    if not report.ok:
        raise DatasetError(report.text())
    return report
