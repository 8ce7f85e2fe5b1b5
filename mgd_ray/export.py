"""Export a segmenter for deployment: ONNX (opset 18 by default) or TorchScript, logits only.

The exported graph takes a normalised (N, 3, H, W) float batch of any batch size and spatial size
(ONNX: sides larger than the output stride) and returns (N, num_classes, H, W) logits; the checkpoint's description (classes, mean/std, crop,
palette) is stored in the file (ONNX metadata ``mgd_ray`` / TorchScript extra file ``mgd_ray.json``).
Each export is run once on a batch size and image size other than the traced ones and compared with
PyTorch before the file is renamed into place, so a file that exists is one that works.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.export import Dim

from mgd_ray.files import atomic_write
from mgd_ray.models.deeplab import DeepLabV3Plus, LogitsOnly
from mgd_ray.predict import Segmenter, load_checkpoint

FORMATS = ("onnx", "torchscript")
DEFAULT_OPSET = 18
METADATA_KEY = "mgd_ray"
TORCHSCRIPT_EXTRA = "mgd_ray.json"
TRACE_SHAPE = (2, 3, 64, 64)  # traced input; the check runs another batch size and H ≠ W
CHECK_SHAPE = (1, 3, 48, 80)
CHECK_TOLERANCE = 1e-3  # max |diff| allowed, relative to max(1, max |logit|)


class ExportError(ValueError):
    """An export that cannot be done or whose result disagrees with PyTorch."""


def _atomic_write(out: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(temporary)`` in ``out``'s folder and rename the result to ``out``; nothing is left on failure."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out}: is a folder; --out names the file to write")
    return atomic_write(out, write)


def _check(run: Callable[[np.ndarray], np.ndarray], model: nn.Module, what: str) -> None:
    """Compare the exported model with PyTorch on CHECK_SHAPE (not the traced shape).

    The tolerance scales with the logits: untrained deep networks reach |logit| ~ 1e4, where float32
    reordering alone moves the last digits.
    """
    x = torch.randn(*CHECK_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(x).numpy()
    got = run(x.numpy())
    if got.shape != expected.shape:
        detail = f"output shape {got.shape}, PyTorch's {expected.shape}"
    else:
        scale = max(1.0, float(np.abs(expected).max()))
        diff = float(np.abs(got - expected).max())
        if diff <= CHECK_TOLERANCE * scale:
            return
        detail = f"max |diff| {diff:.3g} for logits up to {scale:.3g}"
    raise ExportError(
        f"the exported {what} model disagrees with PyTorch on a {CHECK_SHAPE} input ({detail}); it is not "
        "usable at other sizes: report this with the torch and exporter versions"
    )


def write_onnx(
    model: DeepLabV3Plus,
    out: Path,
    *,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, Any] | None = None,
    check: bool = True,
) -> Path:
    """ONNX file of ``model``'s logits (torch.onnx's dynamo exporter) with dynamic batch, height and width."""
    net = LogitsOnly(model).eval()
    x = torch.zeros(*TRACE_SHAPE)

    def write(temporary: Path) -> None:
        # The graph branches on the coarsest feature map being 1×1, so sides start at output stride + 1.
        side = model.output_stride + 1
        dims = {0: Dim("batch", min=1), 2: Dim("height", min=side), 3: Dim("width", min=side)}
        program = torch.onnx.export(
            net, (x,), None, input_names=["image"], output_names=["logits"], opset_version=opset,
            dynamic_shapes={"x": dims}, dynamo=True, verbose=False,
        )  # fmt: skip
        if metadata is not None:
            program.model.metadata_props[METADATA_KEY] = json.dumps(metadata | {"min_side": side})
        program.save(str(temporary), external_data=False)
        if check:
            session = ort.InferenceSession(str(temporary), providers=["CPUExecutionProvider"])
            _check(lambda a: session.run(None, {"image": a})[0], net, "ONNX")

    return _atomic_write(out, write)


def write_torchscript(
    model: DeepLabV3Plus, out: Path, *, metadata: dict[str, Any] | None = None, check: bool = True
) -> Path:
    """Traced TorchScript of ``model``'s logits; sizes stay symbolic in the trace, so any N, H, W run."""
    net = LogitsOnly(model).eval()

    def write(temporary: Path) -> None:
        with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export, but still served
            warnings.filterwarnings("ignore", message=r"`torch\.jit", category=FutureWarning)
            with torch.no_grad():
                traced = torch.jit.trace(net, torch.zeros(*TRACE_SHAPE))
            extra = {TORCHSCRIPT_EXTRA: json.dumps(metadata)} if metadata is not None else {}
            torch.jit.save(traced, str(temporary), _extra_files=extra)
            if check:
                loaded = torch.jit.load(str(temporary), map_location="cpu")
                _check(lambda a: loaded(torch.from_numpy(a)).detach().numpy(), net, "TorchScript")

    return _atomic_write(out, write)


def _student(model_path: Path, allow_teacher: bool, expect_classes: Sequence[str] | None) -> Segmenter:
    return load_checkpoint(model_path, allow_teacher=allow_teacher, expect_classes=expect_classes, device="cpu")


def export_onnx(
    model_path: Path,
    out: Path,
    *,
    opset: int = DEFAULT_OPSET,
    allow_teacher: bool = False,
    expect_classes: Sequence[str] | None = None,
) -> Path:
    """Export a student checkpoint to ONNX (a teacher only with ``allow_teacher``)."""
    seg = _student(model_path, allow_teacher, expect_classes)
    return write_onnx(seg.model, out, opset=opset, metadata=seg.metadata())


def export_torchscript(
    model_path: Path, out: Path, *, allow_teacher: bool = False, expect_classes: Sequence[str] | None = None
) -> Path:
    """Export a student checkpoint to TorchScript (a teacher only with ``allow_teacher``)."""
    seg = _student(model_path, allow_teacher, expect_classes)
    return write_torchscript(seg.model, out, metadata=seg.metadata())


def export_model(model_path: Path, out: Path, fmt: str, **options: Any) -> Path:
    """``export_onnx`` or ``export_torchscript`` by format name."""
    if fmt == "onnx":
        return export_onnx(model_path, out, **options)
    if fmt == "torchscript":
        return export_torchscript(model_path, out, **options)
    raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
