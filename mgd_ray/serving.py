"""The registered student as an MLflow model that serves images: an encoded image in, its mask out.

A client of ``mlflow models serve`` sends JPEG/PNG files (base64 in JSON, as MLflow encodes a
binary column) and gets one PNG per image back: the class id of every pixel, in the checkpoint's
palette, at the image's own size. It runs ``mgd-ray predict``'s code on the student's checkpoint
(normalisation, sliding window beyond the training crop), so the server and the CLI cannot
disagree, and a client needs to know nothing of mean, std or crop.

The ``mgd_ray`` package travels inside the model (MLflow ``code_paths``), and the requirements list
only public packages, pinned to this environment: serving needs neither this checkout nor an
``mgd-ray`` from an index, where anyone could publish that name.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema
from PIL import Image

from mgd_ray.checkpoint import MODEL_FILE
from mgd_ray.predict import Segmenter, load_checkpoint, mask_image, predict_labels
from mgd_ray.tracking import client_for

PACKAGE = Path(__file__).parent
SERVED_NAME = "best_student"
IMAGE_COLUMN = "image"
MASK_COLUMN = "mask"
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]), outputs=Schema([ColSpec("binary", MASK_COLUMN)])
)
# The distributions the mgd_ray modules a served model loads import themselves (mlflow is added by
# MLflow); tests/test_serving.py checks that they cover every module loading imports.
SERVED_DISTRIBUTIONS = (
    "torch",
    "torchvision",
    "numpy",
    "pillow",
    "pandas",
    "pydantic",
    "pyyaml",
    "pyarrow",
    "matplotlib",
    "tqdm",
    "cloudpickle",  # the pickled ImageSegmenter: the same version reads it back
)


class ImageSegmenter(mlflow.pyfunc.PythonModel):
    """pyfunc model: rows of encoded images (column ``image``) → rows of class-id PNGs (column ``mask``)."""

    def load_context(self, context: Any) -> None:
        self.segmenter: Segmenter = load_checkpoint(Path(context.artifacts["checkpoint"]), allow_teacher=True)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if IMAGE_COLUMN not in model_input:
            raise MlflowException(
                f"the input has columns {list(model_input.columns)}; send one column {IMAGE_COLUMN!r} of encoded "
                "JPEG/PNG files (base64 in JSON)",
                INVALID_PARAMETER_VALUE,
            )
        images = [decode_image(data, row) for row, data in enumerate(model_input[IMAGE_COLUMN])]
        masks = predict_labels(self.segmenter, images)
        return pd.DataFrame({MASK_COLUMN: [encode_mask(m, self.segmenter.palette) for m in masks]})


def decode_image(data: bytes, row: int) -> np.ndarray:
    """H×W×3 uint8 of an encoded image; an undecodable one is refused naming its row (HTTP 400)."""
    try:
        with Image.open(io.BytesIO(bytes(data))) as image:
            return np.array(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, TypeError) as err:
        raise MlflowException(
            f"row {row}: column {IMAGE_COLUMN!r} is not a readable image ({err}); send the bytes of a JPEG or PNG "
            "file, base64-encoded in JSON",
            INVALID_PARAMETER_VALUE,
        ) from err


def encode_mask(labels: np.ndarray, palette: Any) -> bytes:
    """A P-mode PNG of class ids (as ``mgd-ray predict`` writes it), as bytes."""
    buffer = io.BytesIO()
    mask_image(labels, palette).save(buffer, format="PNG")
    return buffer.getvalue()


def served_requirements() -> list[str]:
    """Public packages only, pinned to this environment's versions (given, so MLflow infers nothing)."""
    return [f"{dist}=={version(dist)}" for dist in SERVED_DISTRIBUTIONS]


def copy_package(dest: Path) -> Path:
    """The mgd_ray package's Python files (no caches, no split lists) under ``dest``: the model's code."""
    return Path(shutil.copytree(PACKAGE, dest / "mgd_ray", ignore=shutil.ignore_patterns("__pycache__", "splits")))


def example_image(size: int) -> bytes:
    """A size×size PNG for the model's input example (what ``mlflow models serve`` documents and checks)."""
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    rgb = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[::-1][None, :]), axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def log_served_model(uri: str, run_id: str, checkpoint: Path, size: int, registered_name: str | None, card: str) -> str:
    """Log ``checkpoint`` as a servable pyfunc model to ``run_id``; register it with a model card.

    Returns the model URI (``models:/name/version`` when registered, else the logged model's URI).
    """
    if Path(checkpoint).name != MODEL_FILE:
        raise ValueError(f"{checkpoint}: the served model takes a segmenter checkpoint named {MODEL_FILE}")
    with fluent_uris(uri), tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=SERVED_NAME,
            python_model=ImageSegmenter(),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(copy_package(Path(tmp)))],
            signature=SIGNATURE,
            input_example=pd.DataFrame({IMAGE_COLUMN: [example_image(size)]}),
            pip_requirements=served_requirements(),
        )
    if registered_name is None:
        return info.model_uri
    client = client_for(uri)
    with fluent_uris(uri):
        registered = mlflow.register_model(info.model_uri, registered_name)
    client.update_model_version(registered_name, registered.version, description=card)
    return f"models:/{registered_name}/{registered.version}"


URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def fluent_uris(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``pyfunc.log_model``, ``register_model``) aimed at ``uri``, and the
    process's tracking and registry URIs as they were afterwards.

    ``mlflow.set_tracking_uri``/``set_registry_uri`` also export ``MLFLOW_TRACKING_URI`` and
    ``MLFLOW_REGISTRY_URI``, which every later MlflowClient without an explicit registry and every
    child process (a study's Ray workers, a test's next study) would inherit: a model registered
    later would land in this study's store.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    saved_env = {name: os.environ.get(name) for name in URI_VARIABLES}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])  # type: ignore[arg-type]  (None: unset, as MLflow allows)
        registry_utils._registry_uri = saved[1]
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
