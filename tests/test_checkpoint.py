"""The model.pt record: written by ``segmenter_record``, read back by its one reader, refused with the fix."""

import pytest
import torch

from mgd_ray.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_segmenter,
    read_segmenter,
    rebuild,
    segmenter_record,
)
from mgd_ray.config import ModelConfig
from mgd_ray.data.datasets import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, voc_palette
from mgd_ray.models.deeplab import build_segmenter


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_job_data):
    """A seeded mobilenet_v2 student saved with metrics and a confusion matrix, as ``fit`` saves it."""
    torch.manual_seed(3)
    cfg = ModelConfig(backbone="mobilenet_v2", output_stride=8)
    net = build_segmenter(cfg, tiny_job_data.num_classes)
    record = segmenter_record(net, cfg, tiny_job_data, 32, "baseline/cps:branch2") | {
        "metrics": {"val/mIoU": 0.25, "step": 4},
        "confusion": [[3, 1], [0, 2]],
    }
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(record, path)
    return path, net, cfg


def test_the_record_reads_back_as_written(saved, tiny_job_data):
    path, net, cfg = saved
    record, weights = read_segmenter(path)
    assert record.path == path and record.role == "baseline/cps:branch2" and not record.is_teacher
    assert record.model_cfg == cfg and record.num_classes == tiny_job_data.num_classes
    assert record.class_names == tiny_job_data.class_names and record.crop_size == 32 and record.dataset == "builtin"
    assert record.mean == (0.485, 0.456, 0.406) and record.std == (0.229, 0.224, 0.225)
    assert record.palette == list(voc_palette(tiny_job_data.num_classes))
    assert record.metrics == {"val/mIoU": 0.25, "step": 4} and record.confusion == [[3, 1], [0, 2]]
    rebuilt = rebuild(record, weights)
    assert rebuilt.output_stride == 8
    for (k, a), (k2, b) in zip(net.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k


def test_a_record_without_palette_gets_its_datasets_palette(tmp_path, saved):
    raw = torch.load(saved[0], weights_only=True)
    old = {k: v for k, v in raw.items() if k not in ("palette", "dataset", "metrics", "confusion")}
    old["class_names"] = list(CITYSCAPES_CLASSES)
    torch.save(old, tmp_path / "old.pt")
    record, _ = read_segmenter(tmp_path / "old.pt")
    assert record.palette == [tuple(c) for c in CITYSCAPES_PALETTE]  # recognised by its classes
    assert record.dataset is None and record.metrics == {} and record.confusion is None


def test_unusable_files_are_refused_naming_the_file_and_the_fix(tmp_path, saved):
    with pytest.raises(CheckpointError, match=r"teacher T_D .*nope\.pt: no such checkpoint file; check the path"):
        read_segmenter(tmp_path / "nope.pt", "teacher T_D")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a readable PyTorch checkpoint"):
        read_segmenter(tmp_path / "junk.pt")
    torch.save({"format": "something/else"}, tmp_path / "other.pt")
    with pytest.raises(
        CheckpointError, match=rf"other\.pt: not an mgd_ray segmenter checkpoint \({CHECKPOINT_FORMAT}\)"
    ):
        read_segmenter(tmp_path / "other.pt")
    raw = torch.load(saved[0], weights_only=True)
    torch.save(raw | {"model": {"backbone": "resnet9"}}, tmp_path / "bad_model.pt")
    with pytest.raises(CheckpointError, match=r"bad_model\.pt: its model description is invalid"):
        read_segmenter(tmp_path / "bad_model.pt")
    torch.save(raw | {"model": {"backbone": "resnet18"}}, tmp_path / "wrong_weights.pt")
    with pytest.raises(CheckpointError, match=r"wrong_weights\.pt: weights do not fit a resnet18 segmenter"):
        rebuild(*read_segmenter(tmp_path / "wrong_weights.pt"))


def test_load_segmenter_checks_what_the_job_expects(saved, tiny_job_data):
    path, net, cfg = saved
    loaded = load_segmenter(path, cfg, tiny_job_data.num_classes)
    assert torch.equal(next(iter(loaded.state_dict().values())), next(iter(net.state_dict().values())))
    assert load_segmenter(path, None, tiny_job_data.num_classes).output_stride == 8  # any architecture
    with pytest.raises(
        CheckpointError, match=r"holds a mobilenet_v2 \(output stride 8, stem plain\) but the config expects"
    ):
        load_segmenter(path, cfg.model_copy(update={"output_stride": 16}), tiny_job_data.num_classes, "teacher T_W")
