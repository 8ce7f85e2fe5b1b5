import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mgd_ray.data.datasets import DatasetError, Sample, folder_samples, read_id_list
from mgd_ray.data.partitions import (
    build_manifest,
    cityscapes_manifest,
    generate_partition,
    labeled_count,
    manifest_meta,
    parse_fraction,
    prepare_builtin,
    read_manifest,
    split_list_path,
    standard_split,
    voc_manifest,
    write_manifest,
)

VOC_CLASSIC = {"1/16": 662, "1/8": 1323, "1/4": 2646, "1/2": 5291}
VOC_PSEUDOSEG = {"1/16": 92, "1/8": 183, "1/4": 366, "1/2": 732}
CITYSCAPES = {"1/16": 186, "1/8": 372, "1/4": 744, "1/2": 1488}


def meta(**overrides) -> dict:
    base = {
        "dataset": "folder",
        "root": "/r",
        "num_classes": 4,
        "class_names": ["bg", "one", "two", "three"],
        "partition": "generated",
        "fraction": 0.25,
        "seed": 7,
    }
    return {**base, **overrides}


# ---------------------------------------------------------------- shipped lists
@pytest.mark.parametrize(
    "dataset, protocol, counts, train_list, train_size",
    [
        ("voc", "classic", VOC_CLASSIC, "train_aug.txt", 10582),
        ("voc", "pseudoseg", VOC_PSEUDOSEG, "train.txt", 1464),
        ("cityscapes", "classic", CITYSCAPES, "train.txt", 2975),
    ],
)
def test_shipped_splits_have_the_published_counts(dataset, protocol, counts, train_list, train_size):
    path = split_list_path(dataset, train_list)
    lines = path.read_text().splitlines()
    train = read_id_list(path) if dataset == "voc" else [Path(line.split("\t")[0]).stem for line in lines]
    assert len(train) == len(set(train)) == train_size
    for fraction, count in counts.items():
        labeled, unlabeled = standard_split(dataset, protocol, fraction)
        assert len(labeled) == len(set(labeled)) == count
        assert not set(labeled) & set(unlabeled)
        assert set(labeled) | set(unlabeled) == set(train)
        assert len(unlabeled) == train_size - count


def test_shipped_val_lists():
    assert len(read_id_list(split_list_path("voc", "val.txt"))) == 1449
    assert len(split_list_path("cityscapes", "val.txt").read_text().splitlines()) == 500


def test_pseudoseg_overlap_goes_to_labeled():
    """The raw PseudoSeg 1/16 lists share id 2008_004822 (last labeled line, no final newline)."""
    raw_unlabeled = read_id_list(split_list_path("voc", "pseudoseg_unlabeled_1-16.txt"))
    assert "2008_004822" in raw_unlabeled
    labeled, unlabeled = standard_split("voc", "pseudoseg", "1-16")
    assert labeled[-1] == "2008_004822" and "2008_004822" not in unlabeled
    assert labeled[0] == "2007_000733"  # CRLF stripped


def test_standard_split_rejects_unknown_protocols_and_fractions():
    with pytest.raises(DatasetError, match="no shipped 'pseudoseg' protocol for dataset 'cityscapes'"):
        standard_split("cityscapes", "pseudoseg", "1/8")
    with pytest.raises(DatasetError, match="no shipped voc/classic partition for '1/3'"):
        standard_split("voc", "classic", "1/3")
    with pytest.raises(DatasetError, match="no such shipped list"):
        split_list_path("voc", "nope.txt")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1/16", ("1-16", 0.0625)),
        ("1-8", ("1-8", 0.125)),
        (0.25, ("1-4", 0.25)),
        ("0.3", ("0.3", 0.3)),
        (1, ("1-1", 1.0)),
    ],
)
def test_parse_fraction(text, expected):
    assert parse_fraction(text) == expected


@pytest.mark.parametrize("text", ["0", "1/0", "half", "2", "-0.5"])
def test_parse_fraction_errors(text):
    with pytest.raises(DatasetError, match="labeled fraction"):
        parse_fraction(text)


# ---------------------------------------------------------------- generated partitions
def test_labeled_count_rounds_half_up_and_keeps_one():
    cases = [(1 / 8, 20), (1 / 16, 8), (1 / 16, 24), (0.5, 7), (1.0, 5)]
    assert [labeled_count(f, n) for f, n in cases] == [3, 1, 2, 4, 5]


def test_generated_partition_covers_rare_classes(folder_root):
    samples, _ = folder_samples(folder_root)
    for seed in range(6):
        labeled, unlabeled = generate_partition(samples, "1/5", seed, num_classes=4)
        assert len(labeled) == 2 and set(labeled) == {"s3", "s7"}  # the only images with classes 2 and 3
        assert unlabeled == [s.id for s in samples if s.id not in {"s3", "s7"}]


def test_generated_partition_is_seeded_and_complete(folder_root):
    samples, _ = folder_samples(folder_root)
    first = generate_partition(samples, 0.5, seed=11, num_classes=4)
    assert first == generate_partition(samples, 0.5, seed=11, num_classes=4)
    labeled, unlabeled = first
    assert len(labeled) == 5 and {"s3", "s7"} <= set(labeled)
    assert sorted(labeled + unlabeled, key=lambda i: int(i[1:])) == [s.id for s in samples]
    draws = {tuple(generate_partition(samples, 0.5, seed, 4)[0]) for seed in range(12)}
    assert len(draws) > 3  # the non-covering part is random


def test_generated_partition_budget_smaller_than_coverage(folder_root):
    samples, _ = folder_samples(folder_root)
    labeled, unlabeled = generate_partition(samples, 0.1, seed=0, num_classes=4)
    assert len(labeled) == 1 and labeled[0] in {"s3", "s7"} and len(unlabeled) == 9


def test_generated_partition_checks_masks(folder_root, files):
    files.mask(folder_root / "labels" / "s5.png", np.full((8, 8), 6))
    samples, _ = folder_samples(folder_root)
    with pytest.raises(DatasetError, match=r"s5\.png: mask values \[6\]"):
        generate_partition(samples, 0.5, 0, num_classes=4)


# ---------------------------------------------------------------- manifests
def samples(n: int, root: Path = Path("/data")) -> list[Sample]:
    return [Sample(f"i{k}", root / f"i{k}.png", root / f"m{k}.png") for k in range(n)]


def test_manifest_round_trip_keeps_rows_nulls_and_metadata(tmp_path):
    train, val = samples(4), [Sample("v0", Path("/data/v0.png"), Path("/data/v0m.png"))]
    table = build_manifest(train, val, ["i2"], ["i0", "i1", "i3"], meta())
    path = write_manifest(table, tmp_path / "sub" / "m.parquet")
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.parquet"]
    back = read_manifest(path)
    assert back.to_pylist() == [
        {"id": "i0", "image_path": "/data/i0.png", "label_path": None, "split": "train", "subset": "unlabeled"},
        {"id": "i1", "image_path": "/data/i1.png", "label_path": None, "split": "train", "subset": "unlabeled"},
        {"id": "i2", "image_path": "/data/i2.png", "label_path": "/data/m2.png", "split": "train", "subset": "labeled"},
        {"id": "i3", "image_path": "/data/i3.png", "label_path": None, "split": "train", "subset": "unlabeled"},
        {"id": "v0", "image_path": "/data/v0.png", "label_path": "/data/v0m.png", "split": "val", "subset": "val"},
    ]
    assert back["label_path"].null_count == 3
    assert manifest_meta(back) == meta()
    assert json.loads(pq.read_schema(path).metadata[b"mgd_ray"])["seed"] == 7


def test_manifest_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = build_manifest(samples(2, Path("rel")), [], ["i0"], ["i1"], meta())
    assert table["image_path"].to_pylist() == [str(tmp_path / "rel/i0.png"), str(tmp_path / "rel/i1.png")]


@pytest.mark.parametrize(
    "labeled, unlabeled, message",
    [
        (["i0", "x9"], ["i1", "i2"], "labeled ids: 'x9' is not a training sample"),
        (["i0"], ["i1", "i2", "i1"], "unlabeled ids: 'i1' appears twice"),
        (["i0", "i1"], ["i1", "i2"], r"both labeled and unlabeled: \['i1'\]"),
        (["i0"], ["i1"], "training sample 'i2' .* is in neither"),
    ],
)
def test_manifest_partition_errors(labeled, unlabeled, message):
    with pytest.raises(DatasetError, match=message):
        build_manifest(samples(3), [], labeled, unlabeled, meta())


def test_manifest_meta_and_split_errors():
    with pytest.raises(DatasetError, match=r"lacks \['seed'\]"):
        build_manifest(samples(2), [], ["i0"], ["i1"], {k: v for k, v in meta().items() if k != "seed"})
    with pytest.raises(DatasetError, match="3 class names for num_classes=4"):
        build_manifest(samples(2), [], ["i0"], ["i1"], meta(class_names=["a", "b", "c"]))
    with pytest.raises(DatasetError, match="val sample 'i1' is also a training sample"):
        build_manifest(samples(2), samples(2)[1:], ["i0"], ["i1"], meta())
    with pytest.raises(DatasetError, match="labeled sample 'i0' has no label"):
        build_manifest([Sample("i0", Path("/a.png"), None)], [], ["i0"], [], meta())


def test_read_manifest_rejects_other_files(tmp_path):
    text = tmp_path / "notes.parquet"
    text.write_text("hello")
    with pytest.raises(DatasetError, match=f"{text}: cannot read as a Parquet manifest"):
        read_manifest(text)
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": ["a"]}), other)
    with pytest.raises(DatasetError, match=f"{other}: not a manifest, columns .*image_path"):
        read_manifest(other)
    no_meta = tmp_path / "no_meta.parquet"
    pq.write_table(build_manifest(samples(2), [], ["i0"], ["i1"], meta()).replace_schema_metadata(None), no_meta)
    with pytest.raises(DatasetError, match=f"{no_meta}: not a manifest, table has no mgd_ray metadata"):
        read_manifest(no_meta)
    leaky = tmp_path / "leaky.parquet"
    table = build_manifest(samples(2), [], ["i0"], ["i1"], meta())
    table = table.set_column(2, "label_path", pa.array(["/m0.png", "/m1.png"]))
    pq.write_table(table, leaky)
    with pytest.raises(DatasetError, match=f"{leaky}: row 'i1' \\(unlabeled\\) has a label path"):
        read_manifest(leaky)


# ---------------------------------------------------------------- prepare_* and shipped manifests
def test_prepare_builtin_writes_a_covering_manifest(tmp_path):
    path = prepare_builtin(tmp_path / "b", seed=3, fraction="1/8", num_train=32, num_val=8, size=48)
    assert path == (tmp_path / "b" / "manifest_1-8_seed3.parquet")
    table = read_manifest(path)
    subsets = table["subset"].to_pylist()
    assert subsets.count("labeled") == 4 and subsets.count("unlabeled") == 28 and subsets.count("val") == 8
    info = manifest_meta(table)
    assert info["num_classes"] == 6 and info["fraction"] == 0.125 and info["seed"] == 3
    assert info["class_names"][0] == "background" and info["dataset"] == "builtin"
    present = set()
    for label in table.filter(pa.compute.equal(table["subset"], "labeled"))["label_path"].to_pylist():
        present |= set(np.unique(np.array(Image.open(label))).tolist())
    assert present == set(range(6))
    assert prepare_builtin(tmp_path / "b", seed=3, fraction="1/8", num_train=32, num_val=8, size=48) == path


def touch_all(paths: list[Path]) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()


def test_voc_pseudoseg_manifest_from_shipped_lists(tmp_path):
    root = tmp_path / "VOC2012"
    ids = read_id_list(split_list_path("voc", "train.txt")) + read_id_list(split_list_path("voc", "val.txt"))
    touch_all([root / "JPEGImages" / f"{i}.jpg" for i in ids])
    touch_all([root / "SegmentationClassAug" / f"{i}.png" for i in ids])
    table = voc_manifest(root, "pseudoseg", "1/8")
    subsets = table["subset"].to_pylist()
    assert (subsets.count("labeled"), subsets.count("unlabeled"), subsets.count("val")) == (183, 1281, 1449)
    assert manifest_meta(table)["num_classes"] == 21 and manifest_meta(table)["partition"] == "pseudoseg"
    (root / "JPEGImages" / f"{ids[5]}.jpg").unlink()
    with pytest.raises(DatasetError, match=rf"voc/train\.txt line 6: image of id '{ids[5]}'"):
        voc_manifest(root, "pseudoseg", "1/8")


def test_cityscapes_manifest_from_shipped_lists(tmp_path):
    root = tmp_path / "city"
    lists = [split_list_path("cityscapes", name) for name in ("train.txt", "val.txt")]
    lines = [line for path in lists for line in path.read_text().splitlines()]
    touch_all([root / part.lstrip("/") for line in lines for part in line.split("\t")])
    table = cityscapes_manifest(root, "1-16")
    subsets = table["subset"].to_pylist()
    assert (subsets.count("labeled"), subsets.count("unlabeled"), subsets.count("val")) == (186, 2789, 500)
    row = table.slice(0, 1).to_pylist()[0]
    assert row["image_path"] == str(root / "images/train/jena_000078_000019.png")
    assert manifest_meta(table)["class_names"][0] == "road"
