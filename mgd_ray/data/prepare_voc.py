"""PASCAL VOC 2012 + SBD: download, extract, SBD .mat labels → PNG (train_aug), verify, manifest.

The "train_aug" set of the literature is VOC 2012's segmentation labels plus the SBD labels
(Hariharan et al., ICCV 2011) of the images VOC did not label: SBD `cls/<id>.mat` files are converted
to palette PNGs in `SegmentationClassAug/`, and where VOC and SBD both label an image VOC's PNG wins.
Every shipped split list is then checked against the files, so a training job never starts on a
silently incomplete dataset. The shared pieces (`Prepared`, `verify_lists`, `download`) are used by
`prepare_cityscapes` as well.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

from mgd_ray.data import partitions
from mgd_ray.data.datasets import VOC_CLASSES, DatasetError, read_id_list, voc_palette

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
SBD_URL = "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
VOC_DIR = Path("VOCdevkit/VOC2012")  # inside --root, as the VOC tar extracts
SBD_CLS_DIR = Path("benchmark_RELEASE/dataset/cls")  # inside --root, as benchmark.tgz extracts
AUG_DIR = "SegmentationClassAug"
VOC_EXPECTED = {"train_aug.txt": 10_582, "train.txt": 1_464, "val.txt": 1_449}
CHUNK = 1 << 20


@dataclass(frozen=True)
class Prepared:
    """What a `prepare_*` call produced, and the lines of its verification summary."""

    dataset: str
    data_root: Path  # what a study's `data.root` points to
    manifest: Path
    verified: dict[str, int]  # list file name → entries whose files are all present
    subsets: dict[str, int]  # labeled / unlabeled / val rows of the manifest
    data_config: str  # the study's `data:` section for this manifest, as YAML flow text
    steps: list[str] = field(default_factory=list)  # what was downloaded, extracted, converted

    def summary(self) -> str:
        lines = [f"{self.dataset} ready in {self.data_root}"]
        lines += [f"  {step}" for step in self.steps]
        lines.append(
            f"  verified {len(self.verified)} split lists, every entry present: "
            + ", ".join(f"{name} {count:,}" for name, count in self.verified.items())
        )
        lines.append(f"  manifest: {self.manifest} (" + ", ".join(f"{k} {v:,}" for k, v in self.subsets.items()) + ")")
        lines.append(f"  in a study: data: {self.data_config}")
        return "\n".join(lines)


def download(url: str, dest: Path, *, timeout: float = 60.0, progress: bool = True) -> Path:
    """Fetch `url` to `dest`; an interrupted download continues from `dest`.part (HTTP Range).

    No checksum (the hosts publish none); the file must have the size the server announced. An
    existing `dest` is taken as complete.
    """
    dest = Path(dest)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    retry = f"run the same command again to resume into {part}"
    try:
        response = _open_range(url, offset, timeout)
    except urllib.error.HTTPError as err:
        total = _range_total(err.headers.get("Content-Range", ""))
        if err.code == 416 and offset and total == offset:  # the previous run had fetched every byte
            part.replace(dest)
            return dest
        if err.code == 416:
            part.unlink()
            return download(url, dest, timeout=timeout, progress=progress)
        raise DatasetError(f"{url}: HTTP {err.code} {err.reason}; check the address, or {retry}") from err
    except (OSError, http.client.HTTPException) as err:
        raise DatasetError(f"{url}: cannot connect ({err}); check the network, or {retry}") from err
    with response:
        if response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if _range_start(content_range) != offset:
                raise DatasetError(
                    f"{url}: asked for bytes {offset}- but got {content_range!r}; delete {part} and run again"
                )
            total, mode = _range_total(content_range), "ab"
        else:  # the server ignored the Range request: start over
            length = response.headers.get("Content-Length")
            offset, total, mode = 0, int(length) if length else None, "wb"
        try:
            with (
                open(part, mode) as out,
                tqdm(
                    total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name, disable=not progress
                ) as bar,
            ):
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            raise DatasetError(f"{url}: download interrupted ({err}); {retry}") from err
    size = part.stat().st_size
    if total is not None and size != total:
        raise DatasetError(f"{url}: received {size:,} of {total:,} bytes; {retry}")
    part.replace(dest)
    return dest


def _open_range(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    """The only network call: GET `url` from byte `offset` on."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _range_start(content_range: str) -> int | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", content_range.strip())
    return int(match[1]) if match else None


def _range_total(content_range: str) -> int | None:
    match = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", content_range.strip())
    return int(match[1]) if match else None


def extract_tar(archive: Path, into: Path, *, progress: bool = True) -> list[Path]:
    """Extract a tar(.gz) next to its final place, then move its top-level entries into `into`.

    An interrupted extraction leaves only a hidden `.<archive>.partial` folder behind (removed by the
    next run), never a half-filled dataset folder. Returns the top-level paths created.
    """
    archive, into = Path(archive), Path(into)
    staging = into / f".{archive.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with (
            tqdm.wrapattr(
                open(archive, "rb"),
                "read",
                total=archive.stat().st_size,
                desc=f"extract {archive.name}",
                disable=not progress,
            ) as raw,
            tarfile.open(fileobj=raw, mode="r|*") as tar,
        ):
            tar.extractall(staging, filter="data")
    except (tarfile.TarError, OSError, EOFError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise DatasetError(
            f"{archive}: cannot extract ({err}); the archive is damaged: delete it and download it again"
        ) from err
    created = []
    for entry in sorted(staging.iterdir()):
        target = into / entry.name
        if target.exists():
            raise DatasetError(f"{archive}: cannot extract, {target} exists already; move it away or delete it")
        entry.replace(target)
        created.append(target)
    staging.rmdir()
    return created


def fetch(root: Path, url: str, expect: Path, *, allow_download: bool, progress: bool = True) -> list[str]:
    """Make `root`/`expect` exist: extract the archive named by `url` found in root, downloading it first if allowed."""
    archive = root / url.rsplit("/", 1)[1]
    steps = []
    if not archive.is_file():
        if not allow_download:
            raise DatasetError(
                f"{root}: neither {expect} nor the archive {archive.name} is there; pass --download to fetch "
                f"{url}, or download it into {root} yourself"
            )
        download(url, archive, progress=progress)
        steps.append(f"downloaded {url}")
    extract_tar(archive, root, progress=progress)
    steps.append(f"extracted {archive}")
    if not (root / expect).exists():
        raise DatasetError(
            f"{archive}: extracted, but it holds no {expect}; it is not the file served at {url}: delete it and run again"
        )
    return steps


def sbd_class_map(path: Path) -> np.ndarray:
    """The H×W uint8 class map of an SBD `cls/<id>.mat` file (struct GTcls, field Segmentation)."""
    fix = "the file is damaged: delete the benchmark_RELEASE folder and run again to re-extract benchmark.tgz"
    try:
        segmentation = np.asarray(scipy.io.loadmat(path)["GTcls"][0, 0]["Segmentation"])
    except (
        scipy.io.matlab.MatReadError,
        OSError,
        ValueError,
        KeyError,
        IndexError,
        TypeError,
        NotImplementedError,
    ) as err:
        raise DatasetError(f"{path}: cannot read SBD class labels as GTcls.Segmentation ({err!r}); {fix}") from err
    if segmentation.ndim != 2:
        raise DatasetError(f"{path}: GTcls.Segmentation has shape {segmentation.shape}, expected H×W; {fix}")
    bad = (segmentation < 0) | ((segmentation >= len(VOC_CLASSES)) & (segmentation != 255))
    if bad.any():
        raise DatasetError(
            f"{path}: class ids {np.unique(segmentation[bad]).tolist()} outside 0..{len(VOC_CLASSES) - 1}; {fix}"
        )
    return segmentation.astype(np.uint8)


def save_palette_png(mask: np.ndarray, path: Path, palette: Sequence[tuple[int, int, int]]) -> None:
    """Write a P-mode PNG whose indices are the class ids, atomically."""
    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))
    image.putpalette([c for colour in palette for c in colour])
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` that replaces it when the block succeeds, so no half-written file remains."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def build_train_aug(voc_root: Path, sbd_cls: Path, *, progress: bool = True) -> tuple[int, int]:
    """Fill voc_root/SegmentationClassAug: SBD labels converted, then VOC's own PNGs over them.

    SBD PNGs already there are kept (an interrupted run resumes); VOC's are always copied, so VOC wins.
    Returns (labels from SBD, labels from VOC).
    """
    aug = voc_root / AUG_DIR
    voc_labels = {p.stem: p for p in (voc_root / "SegmentationClass").glob("*.png")}
    sbd_files = sorted(p for p in sbd_cls.glob("*.mat") if p.stem not in voc_labels)
    palette = voc_palette(256)
    for mat in tqdm(sbd_files, desc="SBD .mat → PNG", unit="label", disable=not progress):
        target = aug / f"{mat.stem}.png"
        if not target.is_file():
            save_palette_png(sbd_class_map(mat), target, palette)
    for sample_id, source in tqdm(sorted(voc_labels.items()), desc="VOC labels", unit="label", disable=not progress):
        with atomic_path(aug / f"{sample_id}.png") as temporary:
            shutil.copyfile(source, temporary)
    return len(sbd_files), len(voc_labels)


def verify_lists(
    entries: Mapping[str, Sequence[tuple[str, Sequence[Path]]]],
    expected: Mapping[str, int],
    fix: str,
) -> dict[str, int]:
    """Check every (id, files) entry of every list has all its files, and the expected list sizes.

    `entries` maps a list file name to its entries; `expected` maps some list names to their size
    (checked first, in its order).
    Raises DatasetError naming the list, the count, the first missing ids and files, and `fix`.
    """
    present: dict[Path, bool] = {}
    verified = {}
    order = [n for n in expected if n in entries] + [n for n in entries if n not in expected]
    for name in order:  # the lists with a known size first: their count is the headline
        rows = entries[name]
        missing = []
        for sample_id, paths in rows:
            absent = [p for p in paths if present.setdefault(p, p.is_file()) is False]
            if absent:
                missing.append(f"{sample_id} ({absent[0]})")
        found = len(rows) - len(missing)
        want = expected.get(name, len(rows))
        if missing or len(rows) != want:
            first = f"; first missing: {', '.join(missing[:5])}" if missing else ""
            raise DatasetError(
                f"{name}: {found:,} of the expected {want:,} samples present ({len(rows):,} listed){first}; {fix}"
            )
        verified[name] = found
    return verified


def _voc_entries(voc_root: Path) -> dict[str, list[tuple[str, list[Path]]]]:
    """Every shipped VOC list → [(id, [image, label])] in the train_aug layout."""
    lists = sorted((partitions.SPLITS_DIR / "voc").glob("*.txt"))
    return {
        path.name: [
            (i, [voc_root / "JPEGImages" / f"{i}.jpg", voc_root / AUG_DIR / f"{i}.png"]) for i in read_id_list(path)
        ]
        for path in lists
    }


def subset_counts(table) -> dict[str, int]:
    subsets = table.column("subset").to_pylist()
    return {name: subsets.count(name) for name in ("labeled", "unlabeled", "val")}


def prepare_voc(
    root: Path,
    fraction: str | float = "1/16",
    protocol: partitions.Protocol = "classic",
    *,
    download: bool = False,
    expected: Mapping[str, int] = VOC_EXPECTED,
    progress: bool = True,
) -> Prepared:
    """Make root/VOCdevkit/VOC2012 a verified train_aug dataset and write its manifest there.

    Uses what is already in `root` (extracted folders, or the two archives); with `download` fetches
    what is missing. An existing SegmentationClassAug without SBD in root is verified as it is.
    """
    root = Path(root).absolute()
    voc_root = root / VOC_DIR
    steps = []
    if not (voc_root / "JPEGImages").is_dir():
        steps += fetch(root, VOC_URL, VOC_DIR / "JPEGImages", allow_download=download, progress=progress)
    sbd_cls = root / SBD_CLS_DIR
    sbd_archive = root / SBD_URL.rsplit("/", 1)[1]
    if not sbd_cls.is_dir() and (download or sbd_archive.is_file() or not (voc_root / AUG_DIR).is_dir()):
        steps += fetch(root, SBD_URL, SBD_CLS_DIR, allow_download=download, progress=progress)
    if sbd_cls.is_dir():
        from_sbd, from_voc = build_train_aug(voc_root, sbd_cls, progress=progress)
        steps.append(
            f"{AUG_DIR}/: {from_sbd:,} labels converted from SBD .mat, {from_voc:,} copied from VOC "
            "SegmentationClass (VOC's label wins where both exist)"
        )
    else:
        steps.append(f"{AUG_DIR}/ used as found (no {SBD_CLS_DIR} in {root})")
    verified = verify_lists(
        _voc_entries(voc_root),
        expected,
        f"restore the files (run again with --download, or re-extract the archives into {root})",
    )
    table = partitions.voc_manifest(voc_root, protocol, fraction)
    name, _ = partitions.parse_fraction(fraction)
    manifest = partitions.write_manifest(table, voc_root / f"manifest_voc_{protocol}_{name}.parquet")
    return Prepared(
        dataset="PASCAL VOC 2012 + SBD (train_aug)",
        data_root=voc_root,
        manifest=manifest,
        verified=verified,
        subsets=subset_counts(table),
        data_config=f"{{dataset: voc, root: {voc_root}, protocol: {protocol}, partition: {name.replace('-', '/')}}}",
        steps=steps,
    )
