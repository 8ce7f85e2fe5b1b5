"""MLflow: where every study, teacher, trial and baseline is recorded (and found again).

Runs are addressed by a deterministic ``mgd_ray.key`` tag rather than by remembering run ids, so a
resumed study or a restarted trial finds its run instead of creating a duplicate, and a later study
finds a teacher pretrained by an earlier one. Only the driver and rank 0 of a job write here.
"""

from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mgd_ray.config import absolute_sqlite_url

KEY_TAG = "mgd_ray.key"
STUDY_TAG = "mgd_ray.study"
KIND_TAG = "mgd_ray.kind"  # study | pretrain | teacher | trial | baseline | repeat
STATE_TAG = "mgd_ray.state"  # running | finished | stopped_early | failed
TEACHER_KEY_TAG = "mgd_ray.teacher_key"
PRETRAIN_KEY_TAG = "mgd_ray.pretrain_key"
PRETRAIN_ARTIFACT = "pretrain/backbone.pt"
CHECKPOINT_ARTIFACT = "checkpoint/model.pt"


def resolve_tracking_uri(uri: str, base: Path) -> str:
    """Make a relative ``sqlite:///x.db`` / ``file:x`` / bare-path store absolute, so workers agree on it."""
    if uri.startswith("sqlite:///"):
        return absolute_sqlite_url(uri, base)
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return "file:" + str((base / uri.removeprefix("file:")).resolve())
    if "://" not in uri and not uri.startswith("file:") and not uri.startswith("databricks"):
        return str((base / uri).resolve())
    return uri


class TrackingError(RuntimeError):
    """The tracking store cannot be used; raised before any Ray or training work starts."""


def require_reachable(uri: str, wait_s: float = 15.0, attempt_timeout_s: float = 5.0) -> None:
    """Fail fast, with one line naming ``uri``, when an HTTP(S) tracking server does not answer.

    MLflow's own client retries a dead server for minutes (7 tries with exponential backoff), which
    is what lets a study ride through a restarting server, but it turns a wrong URI into minutes of
    silence and a traceback. So before a study starts, ask the server's ``/health`` endpoint, retrying
    for ``wait_s`` (a server that is still starting), each try bounded by ``attempt_timeout_s``.
    Local stores (sqlite, file paths) need no server and pass.
    """
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    deadline, tries, delay = time.monotonic() + wait_s, 0, 0.5
    while True:
        tries += 1
        try:
            with urllib.request.urlopen(url, timeout=attempt_timeout_s) as answer:
                if 200 <= answer.status < 300:
                    return
                problem = f"answered HTTP {answer.status}"
        except urllib.error.HTTPError as err:  # the server answered, but not as MLflow's does
            problem = f"answered HTTP {err.code}: is this an MLflow tracking server?"
            break
        except (urllib.error.URLError, OSError) as err:
            problem = str(getattr(err, "reason", err))
        if time.monotonic() + delay > deadline:
            break
        time.sleep(delay)
        delay = min(2 * delay, 4.0)
    raise TrackingError(
        f"MLflow tracking server {uri} is unreachable: GET {url} {problem} "
        f"({tries} {'try' if tries == 1 else 'tries'} in {wait_s:.0f} s). Start it "
        "(`mlflow server --host 127.0.0.1 --port 5000`), or point the study elsewhere: mlflow.tracking_uri in the "
        "study file or --tracking-uri (sqlite:///mlflow.db keeps a local store and needs no server)."
    )


def client_for(uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # another study created it since (two studies starting at once)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
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


def logged_steps(client: MlflowClient, run_id: str, key: str = "val/mIoU") -> set[int]:
    """The steps at which ``run_id`` already has ``key``: the evaluations a restarted job must not log twice."""
    return {step for step, _ in metric_history(client, run_id, key)}


def find_finished(client: MlflowClient, tag: str, key: str) -> Any | None:
    """The newest finished run tagged ``tag = key`` in *any* experiment: studies share teachers and pretrainings."""
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return None
    runs = client.search_runs(
        ids,
        filter_string=f"tags.`{tag}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def find_teacher(client: MlflowClient, teacher_key: str) -> Any | None:
    return find_finished(client, TEACHER_KEY_TAG, teacher_key)


def download_checkpoint(uri: str, run_id: str, dest: Path, artifact: str = CHECKPOINT_ARTIFACT) -> Path:
    """The run's ``checkpoint/model.pt`` (or another ``artifact``) as a local file under ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=artifact, dst_path=str(dest), tracking_uri=uri
    )
    return Path(local)


def log_files(client: MlflowClient, run_id: str, files: Iterable[Path], artifact_path: str | None = None) -> None:
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path)
