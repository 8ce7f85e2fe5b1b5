"""MLflow: where every study, teacher, trial and baseline is recorded (and found again).

Runs are addressed by a deterministic ``mgd_ray.key`` tag rather than by remembering run ids, so a
resumed study or a restarted trial finds its run instead of creating a duplicate, and a later study
finds a teacher pretrained by an earlier one. Only the driver and rank 0 of a job write here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from torch import nn

KEY_TAG = "mgd_ray.key"
STUDY_TAG = "mgd_ray.study"
KIND_TAG = "mgd_ray.kind"  # study | teacher | trial | baseline | repeat
STATE_TAG = "mgd_ray.state"  # running | finished | stopped_early | failed
TEACHER_KEY_TAG = "mgd_ray.teacher_key"
CHECKPOINT_ARTIFACT = "checkpoint/model.pt"


def resolve_tracking_uri(uri: str, base: Path) -> str:
    """Make a relative ``sqlite:///x.db`` / ``file:x`` / bare-path store absolute, so workers agree on it."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str((base / uri.removeprefix("sqlite:///")).resolve())
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file:" + str((base / uri.removeprefix("file:")).resolve())
    if "://" not in uri and not uri.startswith("file:") and not uri.startswith("databricks"):
        return str((base / uri).resolve())
    return uri


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name)
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def find_run(client: MlflowClient, experiment_ids: list[str], key: str) -> Any | None:
    """The newest non-deleted run tagged with ``key``, or None."""
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"tags.`{KEY_TAG}` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def get_or_create_run(
    client: MlflowClient, experiment_id: str, key: str, name: str, tags: Mapping[str, str], parent_id: str | None = None
) -> tuple[str, bool]:
    """(run id, created): the run tagged ``key`` if there is one, else a new one under ``parent_id``."""
    found = find_run(client, [experiment_id], key)
    if found is not None:
        return found.info.run_id, False
    all_tags = {KEY_TAG: key, "mlflow.runName": name, **tags}
    if parent_id is not None:
        all_tags["mlflow.parentRunId"] = parent_id
    run = client.create_run(experiment_id, tags=all_tags, run_name=name)
    return run.info.run_id, True


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested config → flat ``a.b.c`` params (MLflow params are flat strings)."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for k, v in value.items():
            out |= flatten(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    if isinstance(value, list | tuple):
        return {prefix: ",".join(str(v) for v in value)}
    return {prefix: str(value)}


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params not logged yet (MLflow refuses to change a param, and a resumed run re-logs them)."""
    existing = client.get_run(run_id).data.params
    items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """Numeric metrics at ``step`` (non-numbers are skipped: they are not metrics; NaN stays NaN)."""
    ts = int(time.time() * 1000)
    items = [
        Metric(k, float(v), ts, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and not (isinstance(v, float) and math.isinf(v))
    ]
    for i in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[i : i + 500])


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def metric_history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def find_teacher(client: MlflowClient, teacher_key: str) -> Any | None:
    """A finished teacher pretraining with this key in *any* experiment: studies share teachers."""
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return None
    runs = client.search_runs(
        ids,
        filter_string=f"tags.`{TEACHER_KEY_TAG}` = '{teacher_key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def download_checkpoint(uri: str, run_id: str, dest: Path) -> Path:
    """The run's ``checkpoint/model.pt`` as a local file under ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=str(dest), tracking_uri=uri
    )
    return Path(local)


class LogitsOnly(nn.Module):
    """Serving wrapper: image batch (N,3,H,W) → logits (N,C,H,W), the one tensor MLflow's signature describes."""

    def __init__(self, segmenter: nn.Module) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmenter(x).logits


def served_requirements() -> list[str]:
    """What loading the served model needs, pinned to this environment's versions.

    Given explicitly, MLflow skips inferring them (it loads the model in a fresh Python process to
    see what gets imported). The inferred list held mgd-ray, torch, numpy and cloudpickle (plus
    pandas and colorama, which loading does not need); torchvision is added since mgd_ray's
    backbones import it.
    """
    from importlib.metadata import version

    return [f"{dist}=={version(dist)}" for dist in ("mgd-ray", "torch", "torchvision", "numpy", "cloudpickle")]


def log_served_model(uri: str, run_id: str, model: nn.Module, size: int, registered_name: str | None, card: str) -> str:
    """Log ``model`` as an MLflow PyTorch model with a signature; register it with a model card.

    Returns the model URI (``models:/name/version`` when registered, else ``runs:/…``).
    """
    from mlflow.models import infer_signature

    served = LogitsOnly(model).eval()
    example = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        out = served(example)
    signature = infer_signature(example.numpy(), out.numpy())
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(run_id=run_id):
        # "pickle" keeps dynamic batch and image sizes (MLflow's default "pt2" would fix the example's
        # shape); loading needs mgd_ray installed. The ONNX/TorchScript exports have no such need.
        info = mlflow.pytorch.log_model(
            served,
            name="best_student",
            signature=signature,
            input_example=example.numpy(),
            serialization_format="pickle",
            pip_requirements=served_requirements(),
        )
    if registered_name is None:
        return info.model_uri
    client = client_for(uri)
    version = mlflow.register_model(info.model_uri, registered_name)
    client.update_model_version(registered_name, version.version, description=card)
    return f"models:/{registered_name}/{version.version}"


def log_files(client: MlflowClient, run_id: str, files: Iterable[Path], artifact_path: str | None = None) -> None:
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path)
