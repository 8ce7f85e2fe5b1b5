"""`prepare_voc` on tiny VOC 2012 + SBD trees in the real layouts, and `download` against a loopback server."""

from __future__ import annotations

import functools
import re
import shutil
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.io
import scipy.sparse
from PIL import Image

from mgd_ray.cli import main
from mgd_ray.data import partitions, prepare_voc
from mgd_ray.data.datasets import VOC_PALETTE, DatasetError
from mgd_ray.data.prepare_voc import download, sbd_class_map

VOC_TRAIN = ["2007_000032", "2007_000039"]  # 2007_000032 is labelled by both VOC and SBD
VOC_VAL = ["2007_000033", "2007_000042"]
SBD_ONLY = ["2008_000002", "2008_000003", "2008_000007"]
TRAIN_AUG = VOC_TRAIN + SBD_ONLY
EXPECTED = {"train_aug.txt": 5, "train.txt": 2, "val.txt": 2}


def voc_mask(seed: int) -> np.ndarray:
    """A VOC-style 6×8 label: background, one object class, the 255 boundary VOC draws around it."""
    mask = np.zeros((6, 8), np.uint8)
    mask[1:5, 2:6] = 255
    mask[2:4, 3:5] = 1 + seed % 20
    return mask


def sbd_mask(seed: int) -> np.ndarray:
    """An SBD-style label: class ids only, no boundary."""
    mask = np.zeros((6, 8), np.uint8)
    mask[:, 4:] = 15
    mask[0, 0] = 1 + seed % 20
    return mask


def write_sbd_mat(path: Path, segmentation: np.ndarray) -> None:
    """The struct layout of SBD's cls/*.mat: GTcls with Boundaries (per-class sparse), Segmentation, CategoriesPresent."""
    boundaries = np.empty((20, 1), dtype=object)
    for index in range(20):
        boundaries[index, 0] = scipy.sparse.csc_matrix(segmentation.shape, dtype=np.uint8)
    present = np.unique(segmentation[(segmentation > 0) & (segmentation < 255)]).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(
        path, {"GTcls": {"Boundaries": boundaries, "Segmentation": segmentation, "CategoriesPresent": present}}
    )


def write_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask)
    image.putpalette([c for colour in VOC_PALETTE for c in colour])
    image.save(path)


def build_tree(root: Path) -> Path:
    """VOCdevkit/VOC2012 (JPEGImages, SegmentationClass, ImageSets) and benchmark_RELEASE/dataset (img, cls)."""
    rng = np.random.default_rng(0)
    voc = root / "VOCdevkit" / "VOC2012"
    for sample_id in TRAIN_AUG + VOC_VAL:
        (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{sample_id}.jpg")
    for seed, sample_id in enumerate(VOC_TRAIN + VOC_VAL):
        write_png(voc / "SegmentationClass" / f"{sample_id}.png", voc_mask(seed))
    sets = voc / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for name, ids in {"train": VOC_TRAIN, "val": VOC_VAL, "trainval": VOC_TRAIN + VOC_VAL}.items():
        (sets / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    sbd = root / "benchmark_RELEASE" / "dataset"
    for seed, sample_id in enumerate(["2007_000032"] + SBD_ONLY):
        write_sbd_mat(sbd / "cls" / f"{sample_id}.mat", sbd_mask(seed))
        (sbd / "img").mkdir(parents=True, exist_ok=True)
        (sbd / "img" / f"{sample_id}.jpg").write_bytes((voc / "JPEGImages" / f"{sample_id}.jpg").read_bytes())
    (sbd / "train.txt").write_text("".join(f"{i}\n" for i in ["2007_000032"] + SBD_ONLY))
    return root


@pytest.fixture
def tiny_lists(tmp_path: Path, monkeypatch) -> Path:
    """Shipped-list stand-ins for the tiny tree (the real lists name 10,582 + 1,449 ids)."""
    lists = tmp_path / "splits"
    (lists / "voc").mkdir(parents=True)
    files = {
        "train_aug.txt": TRAIN_AUG,
        "train.txt": VOC_TRAIN,
        "val.txt": VOC_VAL,
        "train_aug_labeled_1-16.txt": TRAIN_AUG[:1],
        "train_aug_unlabeled_1-16.txt": TRAIN_AUG[1:],
        "pseudoseg_labeled_1-16.txt": VOC_TRAIN[:1],
        "pseudoseg_unlabeled_1-16.txt": VOC_TRAIN[1:],
    }
    for name, ids in files.items():
        (lists / "voc" / name).write_text("".join(f"{i}\n" for i in ids))
    monkeypatch.setattr(partitions, "SPLITS_DIR", lists)
    return lists


@pytest.fixture
def tree(tmp_path: Path, tiny_lists: Path) -> Path:
    return build_tree(tmp_path / "data")


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "P"
        return np.array(image)


def test_sbd_mat_round_trips_through_the_struct_layout(tmp_path):
    mask = sbd_mask(3)
    write_sbd_mat(tmp_path / "x.mat", mask)
    np.testing.assert_array_equal(sbd_class_map(tmp_path / "x.mat"), mask)


def test_prepare_builds_train_aug_verifies_and_writes_the_manifest(tree):
    result = prepare_voc.prepare_voc(tree, "1/16", expected=EXPECTED, progress=False)
    aug = tree / "VOCdevkit" / "VOC2012" / "SegmentationClassAug"
    # SBD-only ids: the .mat class map, as palette indices with VOC's colours
    np.testing.assert_array_equal(png(aug / "2008_000002.png"), sbd_mask(1))
    with Image.open(aug / "2008_000002.png") as image:
        assert image.getpalette()[15 * 3 : 15 * 3 + 3] == [192, 128, 128]  # VOC colour of class 15, person
    # labelled by both: VOC's PNG (with its 255 boundary) wins over SBD's
    np.testing.assert_array_equal(png(aug / "2007_000032.png"), voc_mask(0))
    # val labels are there too, so every list reads from one folder
    np.testing.assert_array_equal(png(aug / "2007_000042.png"), voc_mask(3))
    assert sorted(p.stem for p in aug.glob("*.png")) == sorted(TRAIN_AUG + VOC_VAL)

    assert result.verified["train_aug.txt"] == 5 and result.verified["val.txt"] == 2
    assert result.subsets == {"labeled": 1, "unlabeled": 4, "val": 2}
    table = pq.read_table(result.manifest)
    assert result.manifest == tree / "VOCdevkit/VOC2012/manifest_voc_classic_1-16.parquet"
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["2007_000033"]["label_path"] == str(aug / "2007_000033.png")
    assert rows["2008_000007"]["label_path"] is None and rows["2008_000007"]["subset"] == "unlabeled"
    summary = result.summary()
    assert "train_aug.txt 5" in summary and "3 labels converted from SBD" in summary
    assert "4 copied from VOC" in summary
    assert f"root: {tree / 'VOCdevkit/VOC2012'}" in summary


def test_pseudoseg_protocol_manifest(tree):
    result = prepare_voc.prepare_voc(tree, "1-16", "pseudoseg", expected=EXPECTED, progress=False)
    assert result.subsets == {"labeled": 1, "unlabeled": 1, "val": 2}
    assert result.manifest.name == "manifest_voc_pseudoseg_1-16.parquet"


def test_a_second_run_keeps_converted_labels(tree):
    prepare_voc.prepare_voc(tree, expected=EXPECTED, progress=False)
    (tree / "benchmark_RELEASE/dataset/cls/2008_000003.mat").write_bytes(b"damaged after conversion")
    prepare_voc.prepare_voc(tree, expected=EXPECTED, progress=False)  # resumes: not read again


def test_unreadable_mat_names_the_file_and_the_fix(tree):
    bad = tree / "benchmark_RELEASE/dataset/cls/2008_000003.mat"
    bad.write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match=rf"{re.escape(str(bad))}: cannot read SBD class labels.*re-extract"):
        prepare_voc.prepare_voc(tree, expected=EXPECTED, progress=False)


def test_mat_without_gtcls_segmentation(tmp_path):
    scipy.io.savemat(tmp_path / "inst.mat", {"GTinst": {"Segmentation": np.zeros((2, 2), np.uint8)}})
    with pytest.raises(DatasetError, match=r"inst\.mat: cannot read SBD class labels as GTcls\.Segmentation"):
        sbd_class_map(tmp_path / "inst.mat")


def test_missing_image_reports_count_and_first_missing_ids(tree):
    (tree / "VOCdevkit/VOC2012/JPEGImages/2008_000003.jpg").unlink()
    with pytest.raises(
        DatasetError, match=r"train_aug\.txt: 4 of the expected 5 samples present.*first missing: 2008_000003"
    ):
        prepare_voc.prepare_voc(tree, expected=EXPECTED, progress=False)


def test_the_real_counts_are_the_default(tree):
    with pytest.raises(DatasetError, match=r"5 of the expected 10,582 samples present \(5 listed\)"):
        prepare_voc.prepare_voc(tree, progress=False)


def test_nothing_there_and_no_download_says_what_to_do(tmp_path, tiny_lists):
    with pytest.raises(DatasetError, match=r"VOCtrainval_11-May-2012\.tar.*pass --download"):
        prepare_voc.prepare_voc(tmp_path, expected=EXPECTED, progress=False)
    build_tree(tmp_path / "only_voc")
    shutil.rmtree(tmp_path / "only_voc" / "benchmark_RELEASE")
    with pytest.raises(DatasetError, match=r"benchmark\.tgz.*pass --download"):
        prepare_voc.prepare_voc(tmp_path / "only_voc", expected=EXPECTED, progress=False)


def pack(tree: Path, into: Path) -> tuple[Path, Path]:
    """The two archives as published: the VOC tar (VOCdevkit/...) and SBD's benchmark.tgz (benchmark_RELEASE/...)."""
    into.mkdir(parents=True, exist_ok=True)
    voc, sbd = into / "VOCtrainval_11-May-2012.tar", into / "benchmark.tgz"
    with tarfile.open(voc, "w") as tar:
        tar.add(tree / "VOCdevkit", arcname="VOCdevkit")
    with tarfile.open(sbd, "w:gz") as tar:
        tar.add(tree / "benchmark_RELEASE", arcname="benchmark_RELEASE")
    return voc, sbd


def test_prepare_from_the_archives(tree, tmp_path):
    root = tmp_path / "archives"
    pack(tree, root)
    result = prepare_voc.prepare_voc(root, expected=EXPECTED, progress=False)
    assert result.verified["train_aug.txt"] == 5
    assert not list(root.glob(".*.partial"))
    np.testing.assert_array_equal(png(root / "VOCdevkit/VOC2012/SegmentationClassAug/2008_000002.png"), sbd_mask(1))


def test_damaged_archive(tmp_path, tiny_lists):
    (tmp_path / "VOCtrainval_11-May-2012.tar").write_bytes(b"\0garbage" * 200)
    with pytest.raises(
        DatasetError, match=r"VOCtrainval_11-May-2012\.tar: (cannot extract|extracted, but it holds no)"
    ):
        prepare_voc.prepare_voc(tmp_path, expected=EXPECTED, progress=False)


# ------------------------------------------------------------------ downloads, from a server on 127.0.0.1
class RangeServer(ThreadingHTTPServer):
    files: dict[str, bytes]
    ranges: list[str | None]
    ignore_range: bool = False
    short_by: int = 0  # send this many bytes fewer than Content-Length announces


class RangeHandler(BaseHTTPRequestHandler):
    """Serves `server.files`, honouring `Range: bytes=N-` like the VOC and SBD hosts."""

    server: RangeServer

    def do_GET(self) -> None:
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        requested = self.headers.get("Range")
        self.server.ranges.append(requested)
        start = 0
        if requested and not self.server.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested)[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) - self.server.short_by])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[RangeServer]:
    httpd = RangeServer(("127.0.0.1", 0), RangeHandler)
    httpd.files, httpd.ranges = {}, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def url(server: RangeServer, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


PAYLOAD = bytes(range(256)) * 40  # 10,240 bytes


def test_download_fetches_the_file(server, tmp_path):
    server.files["/f.tar"] = PAYLOAD
    dest = download(url(server, "/f.tar"), tmp_path / "f.tar", progress=False)
    assert dest.read_bytes() == PAYLOAD and server.ranges == [None]
    assert not (tmp_path / "f.tar.part").exists()
    download(url(server, "/f.tar"), dest, progress=False)
    assert server.ranges == [None]  # a finished file is not fetched again


def test_download_resumes_a_partial_file(server, tmp_path):
    server.files["/f.tar"] = PAYLOAD
    (tmp_path / "f.tar.part").write_bytes(PAYLOAD[:3000])
    dest = download(url(server, "/f.tar"), tmp_path / "f.tar", progress=False)
    assert server.ranges == ["bytes=3000-"]
    assert dest.read_bytes() == PAYLOAD


def test_download_restarts_when_the_server_ignores_range(server, tmp_path):
    server.files["/f.tar"] = PAYLOAD
    server.ignore_range = True
    (tmp_path / "f.tar.part").write_bytes(b"x" * 3000)
    assert download(url(server, "/f.tar"), tmp_path / "f.tar", progress=False).read_bytes() == PAYLOAD


def test_a_short_download_fails_and_the_next_run_completes_it(server, tmp_path):
    server.files["/f.tar"] = PAYLOAD
    server.short_by = 1000
    with pytest.raises(DatasetError, match=r"received 9,240 of 10,240 bytes; run the same command again to resume"):
        download(url(server, "/f.tar"), tmp_path / "f.tar", progress=False)
    assert (tmp_path / "f.tar.part").stat().st_size == 9240 and not (tmp_path / "f.tar").exists()
    server.short_by = 0
    assert download(url(server, "/f.tar"), tmp_path / "f.tar", progress=False).read_bytes() == PAYLOAD
    assert server.ranges[-1] == "bytes=9240-"


def test_a_complete_part_file_is_finished_without_data(server, tmp_path):
    server.files["/f.tar"] = PAYLOAD
    (tmp_path / "f.tar.part").write_bytes(PAYLOAD)
    assert download(url(server, "/f.tar"), tmp_path / "f.tar", progress=False).read_bytes() == PAYLOAD
    assert server.ranges == ["bytes=10240-"]


def test_download_http_error_names_the_url(server, tmp_path):
    with pytest.raises(DatasetError, match=r"/missing\.tar: HTTP 404"):
        download(url(server, "/missing.tar"), tmp_path / "m.tar", progress=False)


def test_prepare_downloads_both_archives(server, tree, tmp_path, monkeypatch):
    voc, sbd = pack(tree, tmp_path / "served")
    server.files = {"/voc/" + voc.name: voc.read_bytes(), "/sbd/" + sbd.name: sbd.read_bytes()}
    monkeypatch.setattr(prepare_voc, "VOC_URL", url(server, "/voc/" + voc.name))
    monkeypatch.setattr(prepare_voc, "SBD_URL", url(server, "/sbd/" + sbd.name))
    root = tmp_path / "fresh"
    result = prepare_voc.prepare_voc(root, download=True, expected=EXPECTED, progress=False)
    assert (root / voc.name).read_bytes() == voc.read_bytes()
    assert result.verified["val.txt"] == 2
    assert any(step.startswith("downloaded http://127.0.0.1") for step in result.steps)


# ------------------------------------------------------------------ command line
def test_cli_prepare_voc_prints_the_summary(tree, monkeypatch, capsys):
    monkeypatch.setattr(prepare_voc, "prepare_voc", functools.partial(prepare_voc.prepare_voc, expected=EXPECTED))
    assert main(["data", "prepare", "voc", "--root", str(tree), "--fraction", "1/16"]) == 0
    out = capsys.readouterr().out
    assert "verified 7 split lists" in out and "labeled 1, unlabeled 4, val 2" in out
    assert (tree / "VOCdevkit/VOC2012/manifest_voc_classic_1-16.parquet").is_file()


def test_cli_reports_a_dataset_error_with_exit_code_2(tree, capsys):
    assert main(["data", "prepare", "voc", "--root", str(tree)]) == 2
    assert "5 of the expected 10,582 samples present" in capsys.readouterr().err
