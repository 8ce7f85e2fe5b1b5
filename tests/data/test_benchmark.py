"""VOC and Cityscapes beyond the shipped lists: any share or count, a labeled list, extra unlabeled
images, a selection set; the shipped protocol unchanged; every list problem reported at once."""

from pathlib import Path

import numpy as np
import pytest

from mgd_ray.config import DataConfig, parse_job_config
from mgd_ray.data.benchmark import benchmark_roles, is_shipped
from mgd_ray.data.datasets import DatasetError, load_mask, read_id_list
from mgd_ray.data.partitions import manifest_meta, read_manifest, split_list_path, standard_split
from mgd_ray.data.stream import prepare_manifest


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    """Every id of VOC's train (1,464) and val (1,449) lists: empty JPEGs, and real 4×4 masks for train
    (a generated partition reads them) whose classes follow the id's position: class k+1 in every 20th."""
    from PIL import Image

    root = tmp_path_factory.mktemp("voc") / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClassAug").mkdir()
    train = read_id_list(split_list_path("voc", "train.txt"))
    for index, sample_id in enumerate(train):
        (root / "JPEGImages" / f"{sample_id}.jpg").touch()
        mask = np.zeros((4, 4), np.uint8)
        mask[:2] = 1 + index % 20
        Image.fromarray(mask).save(root / "SegmentationClassAug" / f"{sample_id}.png")
    for sample_id in read_id_list(split_list_path("voc", "val.txt")):
        (root / "JPEGImages" / f"{sample_id}.jpg").touch()
        (root / "SegmentationClassAug" / f"{sample_id}.png").touch()
    return root


def cfg(**fields) -> DataConfig:
    return DataConfig(dataset="voc", protocol="pseudoseg", **fields)


def test_the_shipped_protocol_is_unchanged(voc):
    shipped = cfg(root=voc, partition="1/8")
    assert is_shipped(shipped)
    path = prepare_manifest(shipped)
    assert path.name == "manifest_voc_pseudoseg_1-8.parquet"
    subsets = read_manifest(path)["subset"].to_pylist()
    assert (subsets.count("labeled"), subsets.count("unlabeled"), subsets.count("val")) == (183, 1281, 1449)


def test_any_fraction_is_a_seeded_class_covering_draw(voc):
    train = read_id_list(split_list_path("voc", "train.txt"))
    roles, names = benchmark_roles(cfg(root=voc, partition="1/64"))
    assert len(roles.labeled) == 23  # floor(1464 / 64 + 0.5)
    assert len(roles.unlabeled) == 1464 - 23 and len(roles.val) == 1449 and roles.test == []
    assert names[0] == "background" and len(names) == 21
    covered = {int(c) for s in roles.labeled for c in np.unique(load_mask(s.label, 21))}
    assert covered == set(range(21))  # 23 images suffice to hold all 20 foreground classes and background
    assert all(s.label is None for s in roles.unlabeled)
    again, _ = benchmark_roles(cfg(root=voc, partition="1/64"))
    other, _ = benchmark_roles(cfg(root=voc, partition="1/64", partition_seed=1))
    assert [s.id for s in again.labeled] == [s.id for s in roles.labeled]
    assert [s.id for s in other.labeled] != [s.id for s in roles.labeled]
    assert [s.id for s in roles.labeled] == [i for i in train if i in {s.id for s in roles.labeled}]  # list order

    counted, _ = benchmark_roles(cfg(root=voc, labeled=92))
    assert (len(counted.labeled), len(counted.unlabeled)) == (92, 1372)
    path = prepare_manifest(cfg(root=voc, labeled=92))
    meta = manifest_meta(read_manifest(path))
    assert meta["partition"] == "generated" and meta["fraction"] == pytest.approx(92 / 1464)
    assert meta["roles"]["labeled"] == 92 and path.name.startswith("manifest_voc_")


def test_a_selection_set_searches_on_other_images_than_the_report(voc):
    roles, _ = benchmark_roles(cfg(root=voc, partition="1/8", selection=100))
    labeled, unlabeled = standard_split("voc", "pseudoseg", "1/8")
    assert {s.id for s in roles.labeled} == set(labeled) and len(roles.labeled) == 183  # the shipped list, untouched
    selection = {s.id for s in roles.val}
    assert len(selection) == 100 and selection <= set(unlabeled)
    assert all(s.label is not None for s in roles.val)  # the hidden labels of the held-out images
    assert {s.id for s in roles.unlabeled} == set(unlabeled) - selection  # held out: they train on nothing
    assert [s.id for s in roles.test] == read_id_list(split_list_path("voc", "val.txt"))
    again, _ = benchmark_roles(cfg(root=voc, partition="1/8", selection=100))
    moved, _ = benchmark_roles(cfg(root=voc, partition="1/8", selection=100, split_seed=1))
    assert {s.id for s in again.val} == selection != {s.id for s in moved.val}
    share, _ = benchmark_roles(cfg(root=voc, partition="1/8", selection=0.1))
    assert len(share.val) == 128  # floor(0.1 · 1281 + 0.5)
    table = read_manifest(prepare_manifest(cfg(root=voc, partition="1/8", selection=100)))
    subsets = table["subset"].to_pylist()
    assert (subsets.count("val"), subsets.count("test"), subsets.count("unlabeled")) == (100, 1449, 1181)


def test_labeled_list_and_extra_unlabeled_problems_are_reported_together(voc, tmp_path):
    train = read_id_list(split_list_path("voc", "train.txt"))
    val = read_id_list(split_list_path("voc", "val.txt"))
    listed = tmp_path / "labeled.txt"
    listed.write_text(f"{train[0]}\n{train[5]}\n{train[0]}\nnot_an_id\n{val[0]}\n")
    frames = voc / "frames"
    frames.mkdir()
    (frames / "f1.jpg").touch()
    extra = tmp_path / "extra.txt"
    extra.write_text("frames/f1.jpg\nframes/missing.jpg\n")
    with pytest.raises(DatasetError) as err:
        benchmark_roles(cfg(root=voc, labeled_list=listed, unlabeled=(extra, tmp_path / "nowhere")))
    text = str(err.value)
    assert "5 problem(s)" in text
    assert f"labeled.txt line 3: id {train[0]!r} appears twice" in text
    assert "labeled.txt line 4: id 'not_an_id' is not a training image of voc" in text
    assert f"labeled.txt line 5: {val[0]!r} is an image of the official val set" in text
    assert "extra.txt line 2: image" in text and "missing.jpg does not exist" in text
    assert "nowhere: no such unlabeled folder or list of image paths" in text

    listed.write_text(f"{train[0]}\n{train[5]}\n")
    extra.write_text("frames/f1.jpg\n")
    roles, _ = benchmark_roles(cfg(root=voc, labeled_list=listed, unlabeled=(extra,)))
    assert [s.id for s in roles.labeled] == [train[0], train[5]]
    assert len(roles.unlabeled) == 1464 - 2 + 1 and roles.unlabeled[-1].id == "frames/f1.jpg"
    meta = manifest_meta(read_manifest(prepare_manifest(cfg(root=voc, labeled_list=listed, unlabeled=(extra,)))))
    assert meta["partition"] == "listed"


def test_cityscapes_extra_lists_in_the_pair_format(cityscapes_root, tmp_path, monkeypatch):
    """The official MGD train_extra lists pair each image with a label path: the label column is ignored."""
    from PIL import Image

    import mgd_ray.data.benchmark as benchmark

    for folder, name in (("images", "lindau_000000_000019.png"), ("segmentation", "lindau_000000_000019_gtFine.png")):
        (cityscapes_root / folder / "val").mkdir(parents=True)
        Image.new("L", (8, 8)).save(cityscapes_root / folder / "val" / name)
    val_list = cityscapes_root / "val_list.txt"
    val_list.write_text("/images/val/lindau_000000_000019.png\t/segmentation/val/lindau_000000_000019_gtFine.png\n")
    lists = {"train.txt": cityscapes_root / "train_list.txt", "val.txt": val_list}
    monkeypatch.setattr(benchmark, "split_list_path", lambda dataset, name: lists[name])

    for name in ("erfurt_000000_000019", "erfurt_000001_000019"):
        path = cityscapes_root / "images" / "train_extra" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(path)
    extra = tmp_path / "train_extra_3000.txt"
    extra.write_text(
        "/images/train_extra/erfurt_000000_000019.png\t/segmentation/train_extra/erfurt_000000_000019_gtCoarse.png\n"
        "images/train_extra/erfurt_000001_000019.png\n"
    )
    listed = tmp_path / "labeled.txt"
    listed.write_text("/images/train/aachen_000000_000019.png\t/segmentation/train/aachen_000000_000019_gtFine.png\n")
    data = DataConfig(dataset="cityscapes", root=cityscapes_root, labeled_list=listed, unlabeled=(extra,))
    roles, names = benchmark_roles(data)
    assert [s.id for s in roles.labeled] == ["aachen_000000_000019"]
    assert [s.id for s in roles.unlabeled] == [
        "bremen_000001_000019",
        "images/train_extra/erfurt_000000_000019.png",
        "images/train_extra/erfurt_000001_000019.png",
    ]
    assert names[0] == "road"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dataset": "voc", "val": "v.txt"}, "val: voc evaluates on its official val set"),
        ({"dataset": "cityscapes", "test": 0.1}, "test: cityscapes evaluates on its official val set"),
        ({"dataset": "voc", "partition": "all"}, "partition: voc keeps a share of its labels"),
        ({"dataset": "folder", "selection": 10}, "selection: applies to voc and cityscapes"),
        ({"dataset": "builtin", "labeled_list": "x.txt"}, "labeled_list: applies to folder, voc and cityscapes"),
        ({"dataset": "voc", "selection": 1.5}, "selection"),
    ],
)
def test_settings_a_dataset_cannot_take_are_refused_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        parse_job_config("baseline", {"data": fields})


def test_benchmark_extensions_validate():
    data = parse_job_config(
        "baseline", {"data": {"dataset": "voc", "partition": "1/64", "selection": 500, "unlabeled": ["x.txt"]}}
    ).data
    assert (data.partition, data.selection, data.unlabeled) == ("1/64", 500, (Path("x.txt"),))
    assert parse_job_config("baseline", {"data": {"dataset": "cityscapes", "labeled": 92}}).data.labeled == 92
