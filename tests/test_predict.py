"""predict: checkpoint records and their loading, MLflow look-up, masks and overlays, bad inputs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mgd_ray.checkpoint import dataset_palette, segmenter_record
from mgd_ray.cli import main
from mgd_ray.config import ModelConfig
from mgd_ray.data.datasets import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    VOC_CLASSES,
    VOC_PALETTE,
    voc_palette,
)
from mgd_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from mgd_ray.metrics import sliding_window_logits
from mgd_ray.models.deeplab import build_segmenter
from mgd_ray.plots import overlay
from mgd_ray.predict import (
    CheckpointError,
    ImageError,
    load_checkpoint,
    predict_files,
    predict_labels,
    resolve_model,
)


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory, tiny_job_data) -> Path:
    torch.manual_seed(0)
    model = build_segmenter("resnet18", tiny_job_data.num_classes)
    path = tmp_path_factory.mktemp("student") / "model.pt"
    torch.save(segmenter_record(model, ModelConfig(), tiny_job_data, 32, "student"), path)
    return path


@pytest.fixture(scope="module")
def seg(student_ckpt):
    return load_checkpoint(student_ckpt, device="cpu")


@pytest.fixture
def image_dir(tmp_path, tiny_job_data) -> Path:
    """Two 32-px val images and one 80×50 image (larger than the 32-px crop), as jpg and png."""
    folder = tmp_path / "in"
    folder.mkdir()
    for path in tiny_job_data.val.images[:2]:
        Image.open(path).save(folder / Path(path).name)
    big = Image.open(tiny_job_data.val.images[2]).resize((80, 50))
    big.save(folder / "big.jpg", quality=95)
    return folder


def _reference_labels(seg, image: np.ndarray, window: int | None) -> np.ndarray:
    """Class ids computed here: ImageNet normalisation by hand, whole image or windows of ``window``."""
    x = (image.astype(np.float32) / 255 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    x = torch.from_numpy(x).permute(2, 0, 1)[None]
    with torch.no_grad():
        if window is None:
            logits = seg.model(x).logits
        else:
            logits = sliding_window_logits(lambda t: seg.model(t).logits, x, seg.num_classes, window)
    return logits.argmax(1)[0].numpy()


def test_record_carries_palette_and_dataset_and_loads_them(student_ckpt, seg):
    record = torch.load(student_ckpt, weights_only=True)
    assert record["dataset"] == "builtin"
    assert record["palette"] == [list(c) for c in voc_palette(6)]
    assert seg.palette == list(voc_palette(6))
    assert (seg.role, seg.crop_size, seg.num_classes, seg.dataset) == ("student", 32, 6, "builtin")
    assert seg.describe().startswith("student resnet18 (output stride 16), 6 classes (builtin), crop 32")
    assert not seg.model.training


def test_dataset_palette_per_dataset_and_for_old_records(tmp_path, student_ckpt):
    assert dataset_palette("voc", list(VOC_CLASSES)) == list(VOC_PALETTE)
    assert dataset_palette("cityscapes", list(CITYSCAPES_CLASSES)) == [tuple(c) for c in CITYSCAPES_PALETTE]
    assert dataset_palette(None, list(CITYSCAPES_CLASSES)) == [tuple(c) for c in CITYSCAPES_PALETTE]
    assert dataset_palette("folder", ["a", "b", "c"]) == [(0, 0, 0), (128, 0, 0), (0, 128, 0)]
    old = torch.load(student_ckpt, weights_only=True)
    del old["palette"], old["dataset"]
    torch.save(old, tmp_path / "old.pt")
    loaded = load_checkpoint(tmp_path / "old.pt", device="cpu")
    assert loaded.palette == list(voc_palette(6)) and loaded.dataset is None


def test_predict_files_writes_palette_masks_and_overlays_keeping_names(tmp_path, seg, image_dir):
    out = tmp_path / "out"
    written = predict_files(seg, [image_dir], out, batch_size=2, progress=False)
    names = sorted(p.name for p in image_dir.iterdir())
    assert [m.name for m, _ in written] == [f"{Path(n).stem}.png" for n in names]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{Path(n).stem}.png" for n in names] + [f"{Path(n).stem}_overlay.png" for n in names]
    )
    for source, (mask_path, overlay_path) in zip(sorted(image_dir.iterdir()), written, strict=True):
        image = np.array(Image.open(source).convert("RGB"))
        window = 32 if max(image.shape[:2]) > 32 else None  # "auto": windows of the crop for big.jpg only
        with Image.open(mask_path) as mask:
            assert mask.mode == "P"
            assert mask.getpalette()[: 6 * 3] == [c for rgb in voc_palette(6) for c in rgb]
            labels = np.array(mask)
        np.testing.assert_array_equal(labels, _reference_labels(seg, image, window))
        np.testing.assert_array_equal(np.array(Image.open(overlay_path)), overlay(image, labels, seg.palette))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_predict_labels_whole_image_without_window(seg, image_dir):
    image = np.array(Image.open(image_dir / "big.jpg").convert("RGB"))
    (labels,) = predict_labels(seg, [image], window=None)
    np.testing.assert_array_equal(labels, _reference_labels(seg, image, None))


def test_cli_predict_any_role_and_prints_it(tmp_path, student_ckpt, teacher_ckpt, image_dir, capsys):
    assert main(["predict", str(student_ckpt), str(image_dir), "--out", str(tmp_path / "s"), "--window", "none"]) == 0
    assert main(["predict", str(teacher_ckpt), str(image_dir / "big.jpg"), "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "model: student resnet18" in out and "model: teacher resnet18" in out
    assert len(list((tmp_path / "s").iterdir())) == 6
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["big.png", "big_overlay.png"]


def test_unreadable_image_is_named_and_nothing_is_written(tmp_path, seg, image_dir, capsys):
    (image_dir / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageError, match="zz_broken.png: cannot read image"):
        predict_files(seg, [image_dir], tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    assert main(["predict", str(seg.path), str(image_dir), "--out", str(existing)]) == 2
    assert "zz_broken.png" in capsys.readouterr().err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_missing_input_duplicate_stems_and_overwriting_inputs_are_refused(tmp_path, seg, image_dir):
    with pytest.raises(ImageError, match="nope.png: no such image"):
        predict_files(seg, [image_dir / "nope.png"], tmp_path / "o", progress=False)
    other = tmp_path / "other"
    other.mkdir()
    Image.open(image_dir / "big.jpg").save(other / "big.png")
    with pytest.raises(ImageError, match="would both write big.png"):
        predict_files(seg, [image_dir, other], tmp_path / "o", progress=False)
    with pytest.raises(ImageError, match="is an input image and would be overwritten"):
        predict_files(seg, [other], other, progress=False)
    assert not (tmp_path / "o").exists() and [p.name for p in other.iterdir()] == ["big.png"]


def test_checkpoint_of_other_class_list_is_refused(tmp_path, student_ckpt, image_dir, capsys):
    other = ["background", "cat", "dog", "bird", "car", "tree"]
    with pytest.raises(CheckpointError, match=r"predicts classes \['background', 'striped_disc'.*'cat', 'dog'"):
        load_checkpoint(student_ckpt, expect_classes=other)
    (tmp_path / "classes.txt").write_text("\n".join(other))
    args = [
        "predict",
        str(student_ckpt),
        str(image_dir),
        "--out",
        str(tmp_path / "o"),
        "--classes",
        str(tmp_path / "classes.txt"),
    ]
    assert main(args) == 2
    assert "expected" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="x.pt: not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    torch.save({"format": "something/else"}, tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match="y.pt: not an mgd_ray segmenter checkpoint"):
        load_checkpoint(tmp_path / "y.pt")


def test_resolve_model_paths_run_ids_and_registered_versions(tmp_path, student_ckpt):
    from mlflow.tracking import MlflowClient

    assert resolve_model(student_ckpt) == student_ckpt
    assert resolve_model(student_ckpt.parent) == student_ckpt
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        resolve_model(tmp_path / "missing" / "model.pt", "sqlite:///unused.db")
    with pytest.raises(CheckpointError, match="no MLflow store"):
        resolve_model("0123abcd", f"sqlite:///{tmp_path / 'absent.db'}")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("predict", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    client.log_artifact(run_id, str(student_ckpt), "checkpoint")
    served = tmp_path / "served"
    served.mkdir()
    (served / "MLmodel").write_text("flavors: {}\n")  # stands in for an MLflow PyTorch model: no model.pt
    client.log_artifact(run_id, str(served))
    client.create_registered_model("student")
    client.create_model_version("student", f"runs:/{run_id}/served", run_id=run_id)
    client.create_model_version("student", f"runs:/{run_id}/checkpoint", run_id=run_id)

    expected = student_ckpt.read_bytes()
    for i, ref in enumerate([run_id, "models:/student/1", "models:/student/2", f"runs:/{run_id}/checkpoint/model.pt"]):
        path = resolve_model(ref, uri, dest=tmp_path / f"dl{i}")
        assert path.name == "model.pt" and path.read_bytes() == expected, ref
    with pytest.raises(
        CheckpointError,
        match=f"no run {'f' * 32} with checkpoint/model.pt or best_student_checkpoint/model.pt or model/model.pt",
    ):
        resolve_model("f" * 32, uri, dest=tmp_path / "dl_missing")
    with pytest.raises(CheckpointError, match="models:/student/9: no such registered model version"):
        resolve_model("models:/student/9", uri, dest=tmp_path / "dl_missing")
