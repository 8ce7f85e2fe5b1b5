"""Earlier studies as a tracking store holds them: a finished study run, the study file it ran (its
``resolved_study.json`` artifact) and its child runs' figures. Warm starts and ``mgd-ray compare``
read studies back through here, so both see exactly what the study's own report saw.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from mgd_ray import tracking
from mgd_ray.config import ConfigError
from mgd_ray.study.config import StudyConfig, parse_study
from mgd_ray.study.results import StudyResults, child_runs, results_from_rows, run_row

RESOLVED_ARTIFACT = "study/resolved_study.json"


class StudyRecordError(LookupError):
    """A named study is not in the tracking store, or its record cannot be read."""


@dataclass
class StudyRecord:
    """One finished study instance: its parent run, the study it ran and what its child runs say."""

    run: Any  # the parent run (mlflow.entities.Run)
    study: StudyConfig
    results: StudyResults

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def name(self) -> str:
        return self.study.name

    def metric(self, key: str) -> float | None:
        return self.run.data.metrics.get(key)


def _study_runs(client: MlflowClient) -> list[Any]:
    """Every finished whole-study parent run of the store, newest first (``mgd-ray pretrain``'s runs
    ran one stage only and are left out)."""
    ids = [e.experiment_id for e in client.search_experiments()]
    if not ids:
        return []
    runs = client.search_runs(
        ids,
        filter_string=f"tags.`{tracking.KIND_TAG}` = 'study' and attributes.status = 'FINISHED'",
        order_by=["attributes.end_time DESC"],
        max_results=5000,
    )
    return [r for r in runs if "mgd_ray.only" not in r.data.tags]


def find_study_run(client: MlflowClient, ref: str, uri: str) -> Any:
    """The finished study run ``ref`` names: a study name (its newest finished run) or a parent run id."""
    runs = _study_runs(client)
    for run in runs:
        if run.info.run_id == ref or run.data.tags.get(tracking.STUDY_TAG) == ref:
            return run
    known = sorted({r.data.tags.get(tracking.STUDY_TAG, "?") for r in runs})
    raise StudyRecordError(
        f"no finished study {ref!r} in the tracking store {uri} "
        f"(finished studies there: {', '.join(known) or 'none'}); give a study name or its parent run id, "
        "and the --tracking-uri (or mlflow.tracking_uri) it ran with"
    )


def recorded_study(run: Any, uri: str) -> StudyConfig:
    """The study the run ran, as resolved by its driver (the ``study/resolved_study.json`` it logged)."""
    name = run.data.tags.get(tracking.STUDY_TAG, run.info.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path=RESOLVED_ARTIFACT, dst_path=tmp, tracking_uri=uri
            )
            raw = json.loads(Path(local).read_text())
        except Exception as err:  # noqa: BLE001 - a missing or unreadable artifact, whatever MLflow raises
            raise StudyRecordError(
                f"study {name} (run {run.info.run_id}): cannot read its {RESOLVED_ARTIFACT} ({err}); "
                "was it run by mgd-ray run?"
            ) from err
    try:
        return parse_study(raw, f"{name} (run {run.info.run_id}) {RESOLVED_ARTIFACT}")
    except ConfigError as err:
        raise StudyRecordError(str(err)) from err


def load_record(client: MlflowClient, uri: str, ref: str | Any) -> StudyRecord:
    """The record of ``ref``: a study name or parent run id (``find_study_run``), or the run itself."""
    run = find_study_run(client, ref, uri) if isinstance(ref, str) else ref
    study = recorded_study(run, uri)
    rows = [run_row(client, r) for r in child_runs(client, run.info.experiment_id, run.info.run_id)]
    return StudyRecord(run, study, results_from_rows(rows))
