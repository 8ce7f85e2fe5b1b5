"""A user's folder of partly labeled images: roles, carved and listed splits, counts, extra unlabeled images."""

from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pytest

from mgd_ray.checkpoint import read_segmenter
from mgd_ray.cli import main
from mgd_ray.config import DataConfig
from mgd_ray.data.datasets import DatasetError
from mgd_ray.data.folder import folder_roles, prepare_folder
from mgd_ray.data.partitions import manifest_meta, read_manifest
from mgd_ray.data.stream import load_job_data


def ids(table, role: str) -> list[str]:
    return table.filter(pc.equal(table["subset"], role))["id"].to_pylist()


@pytest.fixture
def partly_labeled(folder_root, files):
    """The ten masked images s0..s9 of ``folder_root`` and four without masks, u0..u3."""
    rng = np.random.default_rng(5)
    for i in range(4):
        files.image(folder_root / "images" / f"u{i}.png", rng.integers(0, 256, (8, 8, 3)))
    return folder_root


def cfg(root, **options) -> DataConfig:
    return DataConfig.model_validate({"dataset": "folder", "root": str(root), **options})


def test_images_without_masks_are_unlabeled_and_every_mask_trains_by_default(partly_labeled):
    table = read_manifest(prepare_folder(cfg(partly_labeled)))
    val, labeled, unlabeled = ids(table, "val"), ids(table, "labeled"), ids(table, "unlabeled")
    assert len(val) == 2 and len(labeled) == 8 and sorted(unlabeled) == ["u0", "u1", "u2", "u3"]
    assert set(val + labeled) == {f"s{i}" for i in range(10)} and ids(table, "test") == []
    assert table.filter(pc.equal(table["subset"], "unlabeled"))["label_path"].null_count == 4
    meta = manifest_meta(table)
    assert meta["partition"] == "all" and meta["roles"]["val"] == 0.2 and meta["fraction"] == pytest.approx(8 / 12)
    data = load_job_data(cfg(partly_labeled))
    assert len(data.labeled) == 8 and len(data.unlabeled) == 4 and len(data.val) == 2 and data.test is None


def test_carved_splits_are_seeded_disjoint_and_stay_put_when_the_partition_moves(partly_labeled):
    a = read_manifest(prepare_folder(cfg(partly_labeled, test=0.2, partition="1/2")))
    b = read_manifest(prepare_folder(cfg(partly_labeled, test=0.2, partition="1/2", partition_seed=3)))
    c = read_manifest(prepare_folder(cfg(partly_labeled, test=0.2, partition="1/2", split_seed=1)))
    assert len(ids(a, "val")) == 2 and len(ids(a, "test")) == 2 and not set(ids(a, "val")) & set(ids(a, "test"))
    assert (ids(a, "val"), ids(a, "test")) == (ids(b, "val"), ids(b, "test"))  # partition_seed: same splits
    assert (ids(a, "val"), ids(a, "test")) != (ids(c, "val"), ids(c, "test"))  # split_seed moves them
    assert len(ids(a, "labeled")) == 3 and len(ids(a, "unlabeled")) == 4 + 3  # 1/2 of 6 left; 3 lose their masks
    assert ids(a, "labeled") != ids(b, "labeled")
    data = load_job_data(cfg(partly_labeled, test=0.2, partition="1/2"))
    assert data.test is not None and data.test.ids == ids(a, "test")


def test_lists_and_counts(partly_labeled):
    (partly_labeled / "val.txt").write_text("s0\ns1\ns2\n")
    (partly_labeled / "test.txt").write_text("s9\n")
    (partly_labeled / "few.txt").write_text("s3\ns7\n")
    lists = {
        role: str(partly_labeled / f"{name}.txt")
        for role, name in (("val", "val"), ("test", "test"), ("labeled_list", "few"))
    }
    listed = read_manifest(prepare_folder(cfg(partly_labeled, **lists)))
    assert ids(listed, "val") == ["s0", "s1", "s2"] and ids(listed, "test") == ["s9"]
    assert ids(listed, "labeled") == ["s3", "s7"] and len(ids(listed, "unlabeled")) == 4 + 4
    counted = read_manifest(prepare_folder(cfg(partly_labeled, labeled=3)))
    assert len(ids(counted, "labeled")) == 3 and {"s3", "s7"} <= set(ids(counted, "labeled"))  # the rare classes
    with pytest.raises(DatasetError, match="labeled: 9 asked for, but only 8 labeled images are left"):
        prepare_folder(cfg(partly_labeled, labeled=9))


def test_every_list_problem_is_reported_at_once(partly_labeled):
    (partly_labeled / "val.txt").write_text("s0\nnope\nu1\n")
    (partly_labeled / "test.txt").write_text("s0\n")
    with pytest.raises(DatasetError, match="3 problem") as err:
        folder_roles(cfg(partly_labeled, val=str(partly_labeled / "val.txt"), test=str(partly_labeled / "test.txt")))
    text = str(err.value)
    assert "val.txt line 2: id 'nope' is not an image of the dataset" in text
    assert "val.txt line 3: val image 'u1' has no mask in labels/" in text
    assert "image 's0' is in both the val and the test list" in text


def test_extra_unlabeled_folders_and_lists(partly_labeled, files):
    rng = np.random.default_rng(6)
    for i in range(3):
        files.image(partly_labeled / "frames" / f"f{i}.jpg", rng.integers(0, 256, (8, 8, 3)))
        files.image(partly_labeled / "more" / f"m{i}.png", rng.integers(0, 256, (8, 8, 3)))
    (partly_labeled / "more.txt").write_text("more/m0.png\nmore/m2.png\n")
    table = read_manifest(
        prepare_folder(
            cfg(partly_labeled, unlabeled=[str(partly_labeled / "frames"), str(partly_labeled / "more.txt")])
        )
    )
    extra = [i for i in ids(table, "unlabeled") if not i.startswith("u")]
    assert extra == ["frames/f0", "frames/f1", "frames/f2", "more/m0.png", "more/m2.png"]
    (partly_labeled / "bad.txt").write_text("more/m0.png\nmore/gone.png\n")
    with pytest.raises(DatasetError, match=r"bad\.txt line 2: image .*gone\.png does not exist"):
        prepare_folder(
            cfg(partly_labeled, unlabeled=[str(partly_labeled / "bad.txt"), str(partly_labeled / "nowhere")])
        )


def test_the_options_are_checked_where_they_apply():
    from pydantic import ValidationError

    assert DataConfig(dataset="folder").partition == "all" and DataConfig().partition == "1/16"
    assert DataConfig(partition="1-64").partition == "1/64" and DataConfig(partition="0.03").partition == "0.03"
    for bad, message in (
        ({"dataset": "voc", "val": "v.txt"}, "val: voc evaluates on its official val set"),
        ({"val": 0.1}, "val: applies to folder datasets"),
        ({"dataset": "folder", "labeled": 3, "labeled_list": "a.txt"}, "give a count or a labeled_list, not both"),
        ({"partition": "3/2"}, "must be a fraction in"),
    ):
        with pytest.raises(ValidationError, match=message):
            DataConfig.model_validate(bad)


def test_data_check_of_a_folder_root(partly_labeled, capsys):
    assert main(["data", "check", str(partly_labeled)]) == 0
    out = capsys.readouterr().out
    assert "labeled 8, unlabeled 4, val 2 images" in out
    (partly_labeled / "labels" / "s5.png").write_bytes(b"broken")
    assert main(["data", "check", str(partly_labeled)]) == 1
    assert f"{partly_labeled / 'labels' / 's5.png'}: cannot read mask" in capsys.readouterr().out


def test_a_job_trains_on_labeled_and_unlabeled_images_and_never_on_val_or_test(tmp_path, files, monkeypatch):
    """A folder where 30% of the images have masks, with val and test lists: the images a job loads."""
    from mgd_ray.config import parse_job_config
    from mgd_ray.data.datasets import SegmentationDataset
    from mgd_ray.jobs.baselines import run_baseline

    root = tmp_path / "mine"
    rng = np.random.default_rng(7)
    for i in range(20):
        image = rng.integers(0, 256, (32, 32, 3))
        files.image(root / "images" / f"img{i:02d}.png", image)
        if i % 10 < 3:  # img00-02 and img10-12 have masks
            mask = np.zeros((32, 32), np.uint8)
            mask[: 8 + i] = 1 + i % 2
            files.mask(root / "labels" / f"img{i:02d}.png", mask)
    (root / "labels").mkdir(exist_ok=True)
    (root / "classes.txt").write_text("background\nthing\nstuff\n")
    (root / "val.txt").write_text("img10\nimg11\n")
    (root / "test.txt").write_text("img12\n")
    data = {"dataset": "folder", "root": str(root), "val": str(root / "val.txt"), "test": str(root / "test.txt")}
    data |= {"crop_size": 32, "scales": [1.0]}
    loaded: list[tuple[str, str]] = []
    original = SegmentationDataset.__getitem__

    def record(self, index):
        item = original(self, index)
        loaded.append((self.subset, item["id"]))
        return item

    monkeypatch.setattr(SegmentationDataset, "__getitem__", record)
    schedule = {"iterations": 6, "eval_every": 3, "batch_labeled": 2, "batch_unlabeled": 2, "eval_batch": 4}
    cfg = parse_job_config("baseline", {"method": "mean_teacher", "data": data, "schedule": schedule})
    run_baseline(cfg, lambda m, c: None, tmp_path / "ckpt")
    table = read_manifest(load_job_data(cfg.data).manifest)
    assert (len(ids(table, "labeled")), len(ids(table, "unlabeled")), ids(table, "val"), ids(table, "test")) == (
        3,
        14,
        ["img10", "img11"],
        ["img12"],
    )
    trained = {i for subset, i in loaded if subset in ("labeled", "unlabeled")}
    assert trained <= set(ids(table, "labeled")) | set(ids(table, "unlabeled"))
    assert {"img03", "img04"} & trained  # images without masks really train, as unlabeled ones
    assert {i for subset, i in loaded if subset == "val"} == {"img10", "img11"}  # evaluated, never trained on
    assert not {"img10", "img11", "img12"} & trained and "img12" not in {i for _, i in loaded}
    # The model's record of the images drawn to train it is what the datasets really served.
    record, _ = read_segmenter(sorted((tmp_path / "ckpt").glob("step_*/model.pt"))[-1])
    served = {s: Counter(i for subset, i in loaded if subset == s) for s in ("labeled", "unlabeled")}
    assert record.drawn == {s: dict(c) for s, c in served.items()}
    assert sum(record.drawn["labeled"].values()) == 6 * 2 and sum(record.drawn["unlabeled"].values()) == 6 * 2 * 2
