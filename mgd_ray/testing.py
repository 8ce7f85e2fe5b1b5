"""Local services and a tiny built-in study, for the tests and the benchmarks.

Both start real ``mlflow server`` and ``ray start`` processes on 127.0.0.1 and stop them again.
Each runs in a process group of its own and is stopped by signalling that group only: ``ray stop``
would stop every Ray on the machine (another test suite's head, or the user's own cluster).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent  # the venv's mlflow, ray and mgd-ray


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(root: Path, port: int, env: dict[str, str] | None = None, workers: int = 1) -> subprocess.Popen:
    """An MLflow server on 127.0.0.1:``port`` over ``root``'s sqlite store and artifact folder.

    Started again on the same ``root`` and port it serves the same runs (a restarted server).
    """
    return subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
        + ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")]
        + ["--workers", str(workers)],
        env=env,
        stdout=(root / "mlflow.log").open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the server and its workers stop together
    )


def start_ray_head(
    log: Path, env: dict[str, str], gcs_port: int, dashboard_port: int, temp_dir: Path, **ports: int
) -> subprocess.Popen:
    """``ray start --head --block`` with 2 CPUs on 127.0.0.1, in a process group of its own.

    ``temp_dir`` is the head's own Ray temp dir (keep it short: Ray's socket paths live in it).
    With the default, /tmp/ray, a job submitted to this head runs its driver against whichever Ray
    last started on the machine: the job supervisor resolves the driver's address from
    ``<temp dir>/ray_current_cluster``, which every ``ray start`` there rewrites.
    ``ports`` adds ``--NAME=PORT`` flags (``dashboard_agent_listen_port=...``). The head is up when
    ``log`` says "Ray runtime started"; :func:`stop_group` stops it and only it.
    """
    flags = [f"--{name.replace('_', '-')}={port}" for name, port in ports.items()]
    return subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}"]
        + ["--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", *flags]
        + [f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_started(head: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Wait for :func:`start_ray_head`'s head to say it is up, as ``ray start`` without --block would."""
    deadline = time.time() + timeout
    while head.poll() is None and "Ray runtime started" not in log.read_text():
        if time.time() > deadline:
            raise TimeoutError(f"the Ray head did not start within {timeout:.0f}s; see {log}")
        time.sleep(1)
    if head.poll() is not None:
        raise RuntimeError(f"ray start failed (exit {head.returncode}): {log.read_text()[-2000:]}")


def train_worker_pids(session: int) -> list[int]:
    """Ray Train worker processes (Ray titles them ``ray::RayTrainWorker...``) of the Ray head whose
    ``ray start`` process leads session ``session`` (``start_ray_head`` gives the head one).

    Ray puts each worker in a process group of its own, but the workers stay in the head's session.
    Looking machine-wide found another test suite's workers, and a test that SIGKILLed one broke the
    other suite's job (found running two suites at once).
    """
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                if os.getsid(int(proc.name)) == session:
                    pids.append(int(proc.name))
        except OSError:  # it ended while we looked
            continue
    return sorted(pids)


def stop_group(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal ``process``'s process group (SIGKILL, as ``ray stop --force`` would) and wait for it."""
    with contextlib.suppress(ProcessLookupError):  # already gone: nothing to stop
        os.killpg(process.pid, sig)
    process.wait(timeout=60)


def tiny_builtin_study(name: str, root: Path, uri: str, schedule: dict[str, int], trials: int) -> dict[str, Any]:
    """A study file's dict: a ResNet-18 CPS teacher and ``trials`` MGD trials of a MobileNetV2
    student, on 16 built-in images of 32 px with 4 labeled; seconds a job. Callers add or replace keys.
    """
    return {
        "name": name,
        "data": {
            "dataset": "builtin",
            "root": str(root / "data"),
            "partition": "1/4",
            "builtin": {"num_train": 16, "num_val": 4, "size": 32, "num_classes": 4},
            "crop_size": 32,
            "scales": [1.0],
        },
        "teachers": {"T_D": {"model": {"backbone": "resnet18"}, "recipe": {"schedule": schedule}}},
        "student": {"backbone": "mobilenet_v2"},
        "schedule": schedule,
        "distill": {"losses": {"image_teachers": ["T_D"], "region_teachers": ["T_D"], "pool_size": 2}},
        "search": {
            "lambda_1": {"low": 1e-4, "high": 1e-2, "log": True},
            "lambda_2": {"low": 1, "high": 100, "log": True},
        },
        "searcher": {"num_samples": trials, "max_concurrent": 1, "seed": 0},
        "report": {"onnx": False},
        "mlflow": {"tracking_uri": uri},
        "storage_path": str(root / "runs"),
    }


def record_study(
    uri: str,
    raw: dict[str, Any],
    trials: list[tuple[dict[str, Any], list[float], str]],
    baselines: dict[str, list[float]] | None = None,
    repeats: list[float] = (),
    cost: dict[str, float] | None = None,
    student_costs: dict[str, dict[str, float]] | None = None,
) -> str:
    """Write a finished study's record into MLflow directly, as ``mgd-ray run`` leaves it, without
    training: the parent run (tags, ``study/resolved_study.json``, the report's cost metrics) and its
    child runs. ``trials``: (params, val mIoU per evaluation, state); ``baselines``: name → last val
    mIoU per seed; ``repeats``: the best finished trial's configuration on further seeds;
    ``student_costs``: architecture → its ``cost/*`` metrics, recorded on each trial whose params name
    that ``student`` (a study that searches its student). Returns the parent run id."""
    import json
    import tempfile

    from mlflow.entities import Metric

    from mgd_ray import tracking
    from mgd_ray.study.config import parse_study

    study = parse_study(raw)
    client = tracking.client_for(uri)
    exp = tracking.ensure_experiment(client, study.experiment)
    key = f"study/{study.name}/{time.time_ns()}"
    tags = {tracking.STUDY_TAG: study.name, tracking.KIND_TAG: "study"}
    parent, _ = tracking.get_or_create_run(client, exp, key, f"study {study.name}", tags)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "resolved_study.json"
        resolved.write_text(study.model_dump_json(indent=2))
        tracking.log_files(client, parent, [resolved], "study")
    if cost:
        tracking.log_metrics(client, parent, cost, step=0)

    def child(name: str, kind: str, state: str, params: dict[str, Any], history: list[float], extra: dict) -> None:
        run_id, _ = tracking.get_or_create_run(
            client, exp, f"{key}/{name}", name, {tracking.KIND_TAG: kind, "mgd_ray.params": json.dumps(params)}, parent
        )
        tracking.set_tags(client, run_id, {tracking.STATE_TAG: state, **extra})
        metrics = [Metric("val/mIoU", v, 1000 * step, step) for step, v in enumerate(history, 1)]
        arch = params.get("student")
        if student_costs and arch in student_costs:
            tracking.set_tags(client, run_id, {"mgd_ray.architecture": arch})
            metrics += [Metric(f"cost/{k}", v, 0, 0) for k, v in student_costs[arch].items()]
        client.log_batch(run_id, metrics=metrics)
        client.set_terminated(run_id, "FINISHED" if state == "finished" else "KILLED")

    for i, (params, history, state) in enumerate(trials):
        child(f"trial_{i}", "trial", state, params, history, {})
    for name, values in (baselines or {}).items():
        for seed, value in enumerate(values):
            child(
                f"{name}_{seed}", "baseline", "finished", {}, [value], {"mgd_ray.baseline": name, "mgd_ray.seed": seed}
            )
    finished = [(h[-1], p) for p, h, s in trials if s == "finished" and h]
    best = max(finished, key=lambda t: t[0])[1] if finished else {}
    for seed, value in enumerate(repeats, 1):
        child(f"repeat_{seed}", "repeat", "finished", best, [value], {"mgd_ray.seed": seed})
    tracking.set_tags(client, parent, {tracking.STATE_TAG: "finished"})
    client.set_terminated(parent, "FINISHED")
    return parent
