"""export: ONNX Runtime and TorchScript against PyTorch on the built-in val images, for both students;
dynamic batch and size; bad inputs leave no file behind."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import mgd_ray.export as export_module
from mgd_ray.checkpoint import segmenter_record
from mgd_ray.cli import main
from mgd_ray.config import ModelConfig
from mgd_ray.data.datasets import voc_palette
from mgd_ray.export import ExportError, export_model, export_onnx, export_torchscript
from mgd_ray.models.deeplab import build_segmenter
from mgd_ray.predict import CheckpointError

pytestmark = pytest.mark.slow  # torch.onnx's exporter and ONNX Runtime

STUDENTS = ("resnet18", "mobilenet_v2")


def _save_student(backbone: str, data, path: Path) -> Path:
    """Random weights with BatchNorm statistics moved off their (0, 1) start by a few train-mode passes."""
    torch.manual_seed(0)
    model = build_segmenter(backbone, data.num_classes)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32) * 1.5 + 0.3)
    model.eval()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    torch.save(segmenter_record(model, ModelConfig(backbone=backbone), data, 32, "student"), path)
    return path


@pytest.fixture(scope="module", params=STUDENTS)
def exported(request, tmp_path_factory, tiny_job_data) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp(request.param)
    ckpt = _save_student(request.param, tiny_job_data, folder / "model.pt")
    record = torch.load(ckpt, weights_only=True)
    model = build_segmenter(request.param, record["num_classes"])
    model.load_state_dict(record["state_dict"])
    return {
        "model": model.eval(),
        "onnx": export_onnx(ckpt, folder / "student.onnx"),
        "torchscript": export_torchscript(ckpt, folder / "student.ts"),
    }


@pytest.fixture(scope="module")
def val_batches(tiny_job_data) -> list[torch.Tensor]:
    """The val split (4 normalised 32×32 images) as one batch, and resized to 48×40 as a batch of 3."""
    x = torch.stack([item["image"] for item in tiny_job_data.val])
    return [x, F.interpolate(x[:3], size=(48, 40), mode="bilinear", align_corners=False)]


def _pytorch_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).logits.numpy()


def _assert_parity(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-3
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.999


def test_onnx_runtime_matches_pytorch_on_val_images_at_any_batch_and_size(exported, val_batches):
    session = ort.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape == ["batch", 3, "height", "width"]
    for x in val_batches:
        (logits,) = session.run(None, {"image": x.numpy()})
        assert logits.shape == (x.shape[0], 6, *x.shape[-2:])  # logits at the input resolution
        _assert_parity(logits, _pytorch_logits(exported["model"], x))


def test_torchscript_matches_pytorch_on_val_images_at_any_batch_and_size(exported, val_batches):
    with pytest.warns(FutureWarning, match="deprecated"):
        loaded = torch.jit.load(str(exported["torchscript"]), _extra_files=(extra := {"mgd_ray.json": ""}))
    assert json.loads(extra["mgd_ray.json"])["role"] == "student"
    for x in val_batches:
        with torch.no_grad():
            _assert_parity(loaded(x).numpy(), _pytorch_logits(exported["model"], x))


def test_onnx_file_describes_the_model(exported, tiny_job_data):
    model = onnx.load(str(exported["onnx"]))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["mgd_ray"])
    assert meta["class_names"] == tiny_job_data.class_names
    assert meta["palette"] == [list(c) for c in voc_palette(6)]
    assert (meta["crop_size"], meta["role"], meta["dataset"], meta["min_side"]) == (32, "student", "builtin", 17)
    assert model.opset_import[0].version == export_module.DEFAULT_OPSET
    assert not list(exported["onnx"].parent.glob("*.tmp")) and not list(exported["onnx"].parent.glob("*.data"))


def test_teacher_checkpoint_is_refused_unless_allowed(tmp_path, teacher_ckpt, capsys):
    with pytest.raises(CheckpointError, match=r"holds a teacher \(teacher, resnet18\) where a student is expected"):
        export_onnx(teacher_ckpt, tmp_path / "t.onnx")
    assert main(["export", str(teacher_ckpt), "--format", "torchscript", "--out", str(tmp_path / "t.ts")]) == 2
    assert "--allow-teacher" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    args = ["export", str(teacher_ckpt), "--format", "torchscript", "--out", str(tmp_path / "t.ts"), "--allow-teacher"]
    assert main(args) == 0 and (tmp_path / "t.ts").is_file()


def test_checkpoint_of_other_class_list_is_refused(tmp_path, teacher_ckpt, capsys):
    (tmp_path / "classes.txt").write_text("background\nroad\ncar\n")
    args = ["export", str(teacher_ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--allow-teacher"]
    assert main([*args, "--classes", str(tmp_path / "classes.txt")]) == 2
    err = capsys.readouterr().err
    assert str(teacher_ckpt) in err and "['background', 'road', 'car'] are expected" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classes.txt"]


def test_unknown_format_is_an_argparse_error_and_writes_nothing(tmp_path, teacher_ckpt, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(teacher_ckpt), "--format", "tflite", "--out", str(tmp_path / "m.tflite")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(ExportError, match="unknown export format 'tflite'; choose one of onnx, torchscript"):
        export_model(teacher_ckpt, tmp_path / "m.tflite", "tflite", allow_teacher=True)
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_no_file_and_keeps_an_older_one(tmp_path, teacher_ckpt, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_onnx(teacher_ckpt, tmp_path / "m.onnx", allow_teacher=True)
    assert list(tmp_path.iterdir()) == []

    def disagree(run, model, what):
        raise ExportError(f"the exported {what} model disagrees with PyTorch")

    monkeypatch.setattr(export_module, "_check", disagree)
    (tmp_path / "m.ts").write_bytes(b"previous export")
    with pytest.raises(ExportError, match="TorchScript model disagrees"):
        export_torchscript(teacher_ckpt, tmp_path / "m.ts", allow_teacher=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m.ts"] and (tmp_path / "m.ts").read_bytes() == b"previous export"
    with pytest.raises(ExportError, match="is a folder"):
        export_torchscript(teacher_ckpt, tmp_path, allow_teacher=True)
