"""Whole studies as a user runs them: a real Ray head (`ray start`), `ray job submit`, a real MLflow
server over HTTP (sqlite backend), teacher reuse across studies, and `--resume` after the driver dies.

One scenario, in order: study A trains its teacher and searches; study B (another study, same
teacher recipe) is submitted as a Ray job, finds the teacher in MLflow instead of training it, is
stopped mid-search and resumed without re-running finished trials or duplicating MLflow runs.
Study C runs its trials as 2-worker DDP groups through three faults: a SIGKILLed worker, the MLflow
server killed for a minute and restarted, and the driver SIGKILLed mid-trial, then resumed.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import optuna
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from mgd_ray import tracking
from mgd_ray.predict import resolve_model
from mgd_ray.testing import BIN, free_port, start_mlflow, start_ray_head, stop_group, train_worker_pids, wait_started

pytestmark = pytest.mark.slow  # a real Ray head, an MLflow server and whole studies

TINY_SCHEDULE = {"iterations": 4, "eval_every": 2, "batch_labeled": 2, "batch_unlabeled": 2, "eval_batch": 4}


# A user's folder: 24 images of 32 px, 8 with masks (a third), 2 of those listed for val and 2 for test.
FOLDER_IMAGES, MASKED, VAL_IDS, TEST_IDS = 24, 8, ["img01", "img04"], ["img02", "img06"]


def make_folder(root: Path) -> Path:
    """images/imgNN.png with a red (class 1) and a green (class 2) box; labels/ for img00..img07."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(5)
    (root / "labels").mkdir(parents=True)
    (root / "images").mkdir()
    for i in range(FOLDER_IMAGES):
        image = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        for cls, channel in ((1, 0), (2, 1)):
            top, left = rng.integers(0, 20, 2)
            image[top : top + 12, left : left + 12, channel] = 220
            mask[top : top + 12, left : left + 12] = cls
        Image.fromarray(image).save(root / "images" / f"img{i:02d}.png")
        if i < MASKED:
            Image.fromarray(mask).save(root / "labels" / f"img{i:02d}.png")
    (root / "classes.txt").write_text("background\nred\ngreen\n")
    (root / "val.txt").write_text("".join(f"{i}\n" for i in VAL_IDS))
    (root / "test.txt").write_text("".join(f"{i}\n" for i in TEST_IDS))
    return root


def wait_for(predicate, timeout: float, what: str, poll: float = 2.0, progress=None):
    """Poll `predicate` until it is truthy; fail after `timeout` s, or, given `progress`, after
    `timeout` s in which `progress()` did not change.

    A study on a loaded machine is slow, not stuck: a fixed window that two suites at once overran
    (600 s for study B's first trial) says nothing, while "no MLflow run, status or metric changed
    for 600 s" is a hang.
    """
    since, last = time.time(), progress() if progress else None
    checked = since
    while time.time() < since + timeout:
        value = predicate()
        if value:
            return value
        if progress and time.time() > checked + 10:  # progress needs no finer grain than 10 s
            checked, now = time.time(), progress()
            if now != last:
                since, last = checked, now
        time.sleep(poll)
    stalled = " with no progress" if progress else ""
    raise TimeoutError(f"timed out after {timeout:.0f}s{stalled} waiting for {what}")


def mlflow_progress(client: MlflowClient, study: str):
    """Every run of a study's experiment, with its status and latest metrics: changes as it works."""
    return frozenset(
        (r.info.run_id, r.info.status, tuple(sorted(r.data.metrics.items()))) for r in study_runs(client, study)
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A Ray head and an MLflow server on 127.0.0.1, torn down after the module."""
    root = tmp_path_factory.mktemp("cluster")
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"  # Ray's default for local clusters; the token travels in the env
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    env["RAY_DISABLE_USAGE_STATS"] = "1"
    env.pop("RAY_ADDRESS", None)
    mlflow_port, gcs_port, dash_port, agent_port = free_port(), free_port(), free_port(), free_port()
    servers = [start_mlflow(root, mlflow_port, env)]
    uri = f"http://127.0.0.1:{mlflow_port}"
    # `ray start --block` in a process group of its own: the teardown stops this head's processes
    # only. (`ray stop --force` stops every Ray process on the machine: another suite's, or the
    # user's own cluster.)
    head_log = root / "ray_head.log"
    # A Ray temp dir of its own (short: Ray's sockets live there): with /tmp/ray, study B's job
    # driver connected to another suite's Ray, which had started later (found running two suites).
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-"))
    head = start_ray_head(head_log, env, gcs_port, dash_port, ray_tmp, dashboard_agent_listen_port=agent_port)
    try:
        wait_started(head, head_log, 180)
        client = MlflowClient(uri)
        wait_for(lambda: _alive(client), 120, "the MLflow server")
        yield {
            "env": env,
            "uri": uri,
            "mlflow_port": mlflow_port,
            "servers": servers,  # the MLflow server now running is the last (a test restarts it)
            "root": root,
            "client": client,
            "dashboard": f"http://127.0.0.1:{dash_port}",
            "agent": f"http://127.0.0.1:{agent_port}",
            "gcs": f"127.0.0.1:{gcs_port}",
            "session": head.pid,  # the head's session: its Ray workers', and no other suite's
        }
    finally:
        stop_group(head)
        stop_group(servers[-1], signal.SIGTERM)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _alive(client: MlflowClient) -> bool:
    try:
        client.search_experiments()
        return True
    except Exception:  # noqa: BLE001 (any failure means: not up yet)
        return False


def study_file(root: Path, name: str, uri: str, folder: str = ".", **extra) -> Path:
    raw = {
        "name": name,
        "data": {
            "dataset": "folder",
            "root": str(root / "mine"),
            "val": str(root / "mine" / "val.txt"),
            "test": str(root / "mine" / "test.txt"),
            "crop_size": 32,
            "scales": [1.0],
        },
        # Every network starts from the built-in corpus pretraining (a tiny one): study A pretrains
        # both backbones, study B finds them, and A's teacher, in MLflow.
        "teachers": {
            "T_D": {"model": {"backbone": "resnet18", "pretrained": "builtin"}, "recipe": {"schedule": TINY_SCHEDULE}}
        },
        "student": {"backbone": "mobilenet_v2", "pretrained": "builtin"},
        "pretrain": {
            "corpus": {"num_images": 40, "num_val": 8},
            "schedule": {"iterations": 4, "batch": 8, "eval_every": 2},
        },
        "schedule": TINY_SCHEDULE,
        "distill": {"losses": {"image_teachers": ["T_D"], "region_teachers": ["T_D"], "pool_size": 2}},
        "search": {
            "lambda_1": {"low": 1e-4, "high": 1e-2, "log": True},
            "lambda_2": {"low": 1, "high": 100, "log": True},
        },
        "searcher": {"num_samples": 2, "max_concurrent": 2, "seed": 0},
        "scheduler": {"type": "none"},
        "mlflow": {"tracking_uri": uri},
        "storage_path": str(root / "runs"),
    } | extra
    path = root / folder / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def study_runs(client: MlflowClient, study: str) -> list:
    """Every run of a study's experiment, its parent runs included."""
    exp = client.get_experiment_by_name(study)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


def child_runs(client: MlflowClient, study: str) -> list:
    return [r for r in study_runs(client, study) if r.data.tags.get(tracking.KIND_TAG) != "study"]


def mgd_ray(env: dict, command: str, path: Path, timeout: float) -> subprocess.CompletedProcess:
    """`mgd-ray COMMAND STUDY` as a driver connected to the Ray head; its exit status is asserted 0."""
    proc = subprocess.run(  # noqa: PLW1510 (the return code is asserted)
        [str(BIN / "mgd-ray"), command, str(path), "--address", env["gcs"]],
        env=env["env"],
        cwd=env["root"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def job_agent_ready(env: dict) -> bool:
    """The head's dashboard agent answers its health check (a public endpoint: no token)."""
    try:
        with urllib.request.urlopen(env["agent"] + "/api/healthz", timeout=5) as answer:
            return answer.status == 200
    except OSError:  # refused, reset or timed out: not up yet
        return False


def _job_api(env: dict, path: str) -> dict:
    """GET the head's job REST API (``/api/jobs/...``) with the cluster's token."""
    request = urllib.request.Request(
        f"{env['dashboard']}/api/jobs/{path}", headers={"Authorization": f"Bearer {env['env']['RAY_AUTH_TOKEN']}"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def job_status(env: dict, job_id: str) -> str:
    """PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED; UNKNOWN when the dashboard does not answer now."""
    try:
        return _job_api(env, job_id)["status"]
    except OSError:
        return "UNKNOWN"


def job_logs(env: dict, job_id: str) -> str:
    try:
        return _job_api(env, f"{job_id}/logs")["logs"][-3000:]
    except OSError as e:
        return f"(no logs: {e})"


def submit(env: dict, args: list[str], cwd: Path, wait: bool, job_id: str) -> subprocess.CompletedProcess:
    """`ray job submit`, once the head's job agent is up.

    Ray answers "No available agent to submit job, please try again later" (HTTP 500, no job
    created) until the head node's dashboard agent has started and registered its address, which on
    a loaded 2-core machine can come minutes after `ray start` returns. So the test waits for that
    readiness signal (the agent's own health check) with a generous deadline, rather than retrying
    the submission for a fixed window. The agent registers its address just after its HTTP server
    answers; the few retries left cover that gap.
    """
    wait_for(lambda: job_agent_ready(env), 600, f"the head's job agent ({env['agent']}/api/healthz)")
    cmd = [str(BIN / "ray"), "job", "submit", "--address", env["dashboard"], "--working-dir", str(cwd)]
    cmd += ["--submission-id", job_id]
    cmd += [] if wait else ["--no-wait"]
    for _ in range(5):
        proc = subprocess.run(
            [*cmd, "--", *args], check=False, env=env["env"], capture_output=True, text=True, timeout=900
        )
        if proc.returncode == 0 or "No available agent to submit job" not in proc.stderr:
            break
        time.sleep(2)
    return proc


@pytest.fixture(scope="module")
def study_a(env):
    """Study A, run by the CLI as a driver connected to the Ray head, logging over HTTP."""
    make_folder(env["root"] / "mine")
    path = study_file(env["root"], "study-a", env["uri"], baselines=[{"method": "supervised"}])
    return mgd_ray(env, "run", path, timeout=900)


def test_study_logs_everything_to_an_mlflow_server(env, study_a):
    client: MlflowClient = env["client"]
    exp = client.get_experiment_by_name("study-a")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(tracking.KIND_TAG) == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    kinds = Counter(r.data.tags.get(tracking.KIND_TAG) for r in runs if r is not parent)
    assert kinds == {"pretrain": 2, "teacher": 1, "baseline": 1, "trial": 2}
    pretrained = {r.data.tags["mgd_ray.backbone"]: r for r in runs if r.data.tags.get(tracking.KIND_TAG) == "pretrain"}
    assert set(pretrained) == {"resnet18", "mobilenet_v2"}
    for run in pretrained.values():
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert [s for s, _ in tracking.metric_history(client, run.info.run_id, "pretrain/label_accuracy")] == [2, 4]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "pretrain")] == ["pretrain/backbone.pt"]
    runs = [r for r in runs if r.data.tags.get(tracking.KIND_TAG) != "pretrain"]
    # Sup-only needs no teacher: it ran in the teachers' Tune stage, beside the teacher, not after it.
    teacher = next(r for r in runs if r.data.tags.get(tracking.KIND_TAG) == "teacher")
    baseline = next(r for r in runs if r.data.tags.get(tracking.KIND_TAG) == "baseline")
    assert baseline.info.start_time < teacher.info.end_time
    for run in runs:
        if run is parent:
            continue
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags[tracking.STATE_TAG] == "finished"
        history = tracking.metric_history(client, run.info.run_id, "val/mIoU")
        assert [s for s, _ in history] == [2, 4]  # one value per evaluation, at its step
        assert all(0.0 <= v <= 1.0 for _, v in history)
        assert any(k.startswith("val/") and "/IoU/" in k for k in run.data.metrics)  # per-class IoU
        assert any(k.startswith("loss/") for k in run.data.metrics)
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
        arts |= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert {"checkpoint/model.pt", "plots/confusion_matrix.png", "plots/predictions.png"} <= arts
    trials = [r for r in runs if r.data.tags.get(tracking.KIND_TAG) == "trial"]
    assert all(float(r.data.params["losses.lambda_1"]) > 0 for r in trials)
    # Each job started from its backbone's pretrained weights, the file the pretrain stage wrote.
    assert teacher.data.params["model.pretrained"].endswith("pretrained/resnet18/backbone.pt")
    for run in [*trials, baseline]:
        assert run.data.params["student.pretrained"].endswith("pretrained/mobilenet_v2/backbone.pt")
    # The folder's roles, as the manifest logged to the parent run has them.
    manifest_art = [a.path for a in client.list_artifacts(parent.info.run_id, "data") if a.path.endswith(".parquet")]
    manifest = pq.read_table(client.download_artifacts(parent.info.run_id, manifest_art[0], str(env["root"])))
    role = {r["id"]: r["subset"] for r in manifest.to_pylist()}
    assert Counter(role.values()) == {"labeled": MASKED - 4, "unlabeled": FOLDER_IMAGES - MASKED, "val": 2, "test": 2}
    assert sorted(i for i, r in role.items() if r == "val") == VAL_IDS
    assert sorted(i for i, r in role.items() if r == "test") == TEST_IDS
    # The images each job drew to train (recorded by its loop): no val or test image ever, and the
    # images without masks really trained the MGD trials (and the teacher's CPS), as unlabeled ones.
    for run in runs:
        if run is parent:
            continue
        local = client.download_artifacts(run.info.run_id, "data/images_drawn.csv", str(env["root"] / run.info.run_id))
        with open(local, newline="") as f:
            drawn = list(csv.DictReader(f))
        assert drawn and not {d["id"] for d in drawn} & set(VAL_IDS + TEST_IDS)
        assert {d["id"] for d in drawn if int(d["labeled"])} <= {i for i, r in role.items() if r == "labeled"}
        unlabeled = {d["id"] for d in drawn if int(d.get("unlabeled") or 0)}
        assert unlabeled <= {i for i, r in role.items() if r == "unlabeled"}
        if run in trials or run is teacher:
            assert unlabeled, run.data.tags[tracking.KIND_TAG]
        else:
            assert not unlabeled  # Sup-only draws labeled images only
    assert {r.data.tags["mgd_ray.ray_train"] for r in runs if r is not parent} == {"worker group"}
    # The teachers ran once for the whole search: every trial read their signals from the cache.
    assert [r.data.tags["mgd_ray.teacher_cache"] for r in trials] == ["hit", "hit"], [
        r.data.tags.get("mgd_ray.teacher_cache_reason") for r in trials
    ]
    assert all(r.data.metrics["cache/hit_rate"] == 1.0 for r in trials)
    assert float(parent.data.tags["teacher_cache.bytes_per_epoch"]) > 0
    assert len({r.data.params["losses.lambda_1"] for r in trials}) == 2  # Optuna proposed two configurations
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {
        "report/report.md",
        "report/miou_vs_gflops.png",
        "report/miou_vs_latency.png",
        "report/predictions.png",
    } <= report
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "best_student_onnx")] == [
        "best_student_onnx/best_student.onnx"
    ]
    # The final evaluation read test once per reported model: the teacher, Sup-only and the best trial.
    tested = [r for r in runs if r is not parent and "test/mIoU" in r.data.metrics]
    best = max(trials, key=lambda r: r.data.metrics["val/mIoU"])
    assert {r.info.run_id for r in tested} == {teacher.info.run_id, baseline.info.run_id, best.info.run_id}
    assert all(0.0 <= r.data.metrics["test/mIoU"] <= 1.0 for r in tested)
    assert all(any(k.startswith("test/IoU/") for k in r.data.metrics) for r in tested)
    text = Path(client.download_artifacts(parent.info.run_id, "report/report.md", str(env["root"]))).read_text()
    assert "| supervised |" in text and "MGD (best searched configuration)" in text
    assert "| method | val mIoU (%) | test mIoU (%) |" in text and "On the test split:" in text
    assert f"{100 * best.data.metrics['test/mIoU']:.2f}" in text
    assert "Teacher-signal cache:" in text and "it served 2 of 2 MGD runs" in text
    versions = client.search_model_versions("name = 'study-a-student'")
    assert len(versions) == 1 and "val mIoU" in versions[0].description
    # The registered model is what a user predicts with and exports after a study: it resolves to
    # the checkpoint of one of the study's trials, byte for byte.
    ckpt = resolve_model(f"models:/study-a-student/{versions[0].version}", env["uri"], env["root"] / "registered")
    trial_ckpts = []
    for r in trials:
        dest = env["root"] / "trial_ckpt" / r.info.run_id
        dest.mkdir(parents=True)
        trial_ckpts.append(
            Path(client.download_artifacts(r.info.run_id, "checkpoint/model.pt", str(dest))).read_bytes()
        )
    assert ckpt.read_bytes() in trial_ckpts


def test_job_submit_reuses_teacher_and_resumes_after_the_driver_dies(env, study_a):
    client: MlflowClient = env["client"]
    # The job's working directory holds only the study file (Ray uploads it); paths inside are absolute.
    path = study_file(
        env["root"],
        "study-b",
        env["uri"],
        folder="job",
        searcher={
            "num_samples": 3,
            "max_concurrent": 2,
            "seed": 1,
            "storage": f"sqlite:///{env['root'] / 'optuna.db'}",
        },
        # Jobs in their trial's process (Ray Train's local mode): resumed from Tune's checkpoints.
        ray_train={"in_trial": True},
        report={"onnx": False},
    )
    # `mgd-ray pretrain` alone: study B's one backbone to pretrain (its student's: its teacher is
    # study A's) is found in MLflow, where study A left it; nothing is trained.
    pre = mgd_ray(env, "pretrain", path, timeout=600)
    pretrain_a = next(
        r
        for r in child_runs(client, "study-a")
        if r.data.tags.get(tracking.KIND_TAG) == "pretrain" and r.data.tags["mgd_ray.backbone"] == "mobilenet_v2"
    )
    assert "mobilenet_v2: " in pre.stdout and f"(MLflow run {pretrain_a.info.run_id}" in pre.stdout
    assert "resnet18" not in pre.stdout
    job_id = f"study-b-{secrets.token_hex(4)}"
    out = submit(env, ["mgd-ray", "run", path.name], path.parent, wait=False, job_id=job_id)
    assert out.returncode == 0, out.stderr

    def first_trial_finished():
        return [
            r
            for r in child_runs(client, "study-b")
            if r.data.tags.get(tracking.KIND_TAG) == "trial" and r.info.status == "FINISHED"
        ]

    def job_progress():
        status = job_status(env, job_id)
        if status in ("FAILED", "STOPPED", "SUCCEEDED"):  # fail now, with the job's own words
            raise AssertionError(f"study B's job ended {status} before a trial finished:\n{job_logs(env, job_id)}")
        return status, mlflow_progress(client, "study-b")

    done_before = wait_for(first_trial_finished, 600, "a finished search trial of study B", 2.0, job_progress)
    stop = subprocess.run(  # noqa: PLW1510 (return codes are asserted)
        [str(BIN / "ray"), "job", "stop", "--address", env["dashboard"], job_id],
        env=env["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stop.returncode == 0, stop.stderr
    finished_before = {
        r.info.run_id: r.info.end_time for r in child_runs(client, "study-b") if r.info.status == "FINISHED"
    }

    resumed = submit(env, ["mgd-ray", "run", path.name, "--resume"], path.parent, wait=True, job_id=f"{job_id}-resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    runs = child_runs(client, "study-b")
    # The teacher came from study A's run, found through MLflow: study B trained none, and it
    # pretrained no backbone either (the student's: study A's, from MLflow; the teacher's: not needed).
    assert not [r for r in runs if r.data.tags.get(tracking.KIND_TAG) in ("teacher", "pretrain")]
    state = json.loads((env["root"] / "runs" / "study-b" / "study_state.json").read_text())
    teacher_a = next(r for r in child_runs(client, "study-a") if r.data.tags.get(tracking.KIND_TAG) == "teacher")
    assert state["teachers"]["T_D"]["run_id"] == teacher_a.info.run_id
    # ... and study B's final evaluation did not test it again: study A had (one test/mIoU entry).
    assert len(tracking.metric_history(client, teacher_a.info.run_id, "test/mIoU")) == 1
    # No duplicate runs, every search trial finished, and nothing finished before the kill ran again.
    keys = Counter(r.data.tags[tracking.KEY_TAG] for r in runs)
    assert max(keys.values()) == 1, keys
    trials = [r for r in runs if r.data.tags.get(tracking.KIND_TAG) == "trial"]
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)
    assert {r.data.tags["mgd_ray.ray_train"] for r in trials} == {"in the trial's process (local mode)"}
    # ... so Ray Train kept no run of theirs in storage; Tune kept their checkpoints (the resumed
    # trial continued from one) until each stage ended, and then no trial needed them.
    root_b = env["root"] / "runs" / "study-b"
    assert not list(root_b.glob("*/ray_train/*trial*"))
    assert list(root_b.glob("*/tune/search/*/params.json")) and not list(root_b.glob("*/tune/*/*/checkpoint_*"))
    assert not list(root_b.glob("*/*/*/checkpoints"))  # nor any job's own checkpoint folder
    assert len(list(root_b.glob("*/trials/*/model.pt"))) == 3  # the exported models stay
    after = {r.info.run_id: r.info.end_time for r in runs}
    for run_id, end in finished_before.items():
        assert after[run_id] == end, "a trial that had finished before the kill was run again"
    assert done_before[0].info.run_id in after
    parents = [
        r
        for r in client.search_runs([client.get_experiment_by_name("study-b").experiment_id])
        if r.data.tags.get(tracking.KIND_TAG) == "study" and "mgd_ray.only" not in r.data.tags
    ]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    # The Optuna study in searcher.storage rode through the kill too: one COMPLETE Optuna trial per
    # finished trial run, with its parameters; none left RUNNING; a FAIL only for one asked for just
    # before the kill, which never ran.
    ostudy = optuna.load_study(
        study_name=parents[0].data.tags["mgd_ray.optuna_study"], storage=f"sqlite:///{env['root'] / 'optuna.db'}"
    )
    complete = sorted((t.params["lambda_1"], t.params["lambda_2"]) for t in ostudy.trials if t.state.name == "COMPLETE")
    ran = sorted((float(r.data.params["losses.lambda_1"]), float(r.data.params["losses.lambda_2"])) for r in trials)
    assert complete == ran
    others = [t for t in ostudy.trials if t.state.name != "COMPLETE"]
    assert all(t.state.name == "FAIL" and t.system_attrs["mgd_ray.orphan"] for t in others), others
    # report.onnx off: no export logged, and the report says how to make one from the registered model.
    assert not client.list_artifacts(parents[0].info.run_id, "best_student_onnx")
    (env["root"] / "report-b").mkdir()
    text = Path(
        client.download_artifacts(parents[0].info.run_id, "report/report.md", str(env["root"] / "report-b"))
    ).read_text()
    assert "export it with `mgd-ray export models:/study-b-student/1 --format onnx" in text


def test_a_ddp_study_rides_through_a_killed_worker_an_mlflow_restart_and_a_killed_driver(env, study_a):
    client: MlflowClient = env["client"]
    schedule = TINY_SCHEDULE | {"iterations": 16}  # 8 evaluations a trial: time to strike inside one
    path = study_file(
        env["root"],
        "study-c",
        env["uri"],
        schedule=schedule,
        resources={"workers": 2, "cpus_per_worker": 1},
        teacher_resources={"workers": 1},  # study A's teacher, found in MLflow
        searcher={"num_samples": 2, "max_concurrent": 1, "seed": 2},
        report={"onnx": False},
    )
    log = (env["root"] / "study-c.log").open("w")
    driver = subprocess.Popen(
        [str(BIN / "mgd-ray"), "run", str(path), "--address", env["gcs"]],
        env=env["env"],
        cwd=env["root"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def trials() -> list:
        return sorted(
            (r for r in child_runs(client, "study-c") if r.data.tags.get(tracking.KIND_TAG) == "trial"),
            key=lambda r: r.info.start_time,
        )

    def evaluated(run) -> list[int]:
        return [s for s, _ in tracking.metric_history(client, run.info.run_id, "val/mIoU")]

    try:
        # 1. A worker of the first trial's 2-worker group is SIGKILLed after its first evaluation.
        first = wait_for(
            lambda: [r for r in trials() if evaluated(r)],
            600,
            "study C's first evaluation",
            0.5,
            lambda: mlflow_progress(client, "study-c"),
        )[0]
        workers = train_worker_pids(env["session"])
        assert len(workers) == 2, workers  # the trial's DDP group, and nothing else trains now
        os.kill(workers[-1], signal.SIGKILL)
        killed_after = evaluated(first)
        assert killed_after[-1] < schedule["iterations"], killed_after  # the kill struck inside the trial
        # 2. The MLflow server dies with it, stays down for 60 s, and comes back on the same port.
        stop_group(env["servers"][-1])
        time.sleep(60)
        outage_end_ms = time.time() * 1000
        env["servers"].append(start_mlflow(env["root"], env["mlflow_port"], env["env"]))
        wait_for(lambda: _alive(client), 120, "the restarted MLflow server")
        # 3. Once the second trial is under way, the driver is SIGKILLed (a lost laptop), then resumed.
        second = wait_for(
            lambda: [r for r in trials() if r.info.run_id != first.info.run_id and evaluated(r)],
            600,
            "study C's second trial to evaluate",
            0.5,
            lambda: mlflow_progress(client, "study-c"),
        )[0]
        os.killpg(driver.pid, signal.SIGKILL)
        assert driver.wait(timeout=60) == -signal.SIGKILL
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
    interrupted_at = evaluated(second)
    assert interrupted_at[-1] < schedule["iterations"], interrupted_at  # killed inside the trial
    first_end = client.get_run(first.info.run_id).info.end_time
    resumed = subprocess.run(  # noqa: PLW1510 (asserted)
        [str(BIN / "mgd-ray"), "run", str(path), "--resume", "--address", env["gcs"]],
        env=env["env"],
        cwd=env["root"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    runs = child_runs(client, "study-c")
    assert not [r for r in runs if r.data.tags.get(tracking.KIND_TAG) in ("teacher", "pretrain")]
    keys = Counter(r.data.tags[tracking.KEY_TAG] for r in runs)
    assert max(keys.values()) == 1, keys  # no duplicate run, through every fault
    done = trials()
    assert [r.info.run_id for r in done] == [first.info.run_id, second.info.run_id]
    evaluations = list(range(2, schedule["iterations"] + 1, 2))
    for run in done:
        assert run.info.status == "FINISHED" and run.data.tags[tracking.STATE_TAG] == "finished"
        assert run.data.tags["mgd_ray.ray_train"] == "worker group"
        # One unbroken history: every evaluation once, none missing, across the restarts.
        assert sorted(evaluated(run)) == evaluations, (run.info.run_id, evaluated(run))
        losses = client.get_metric_history(run.info.run_id, "loss/total")
        assert sorted(m.step for m in losses) == evaluations
        arts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
        assert arts == ["checkpoint/model.pt"]
    # The first trial trained through the outage: it ended after the server came back, and finished
    # before the driver died, so the resumed study did not train it again.
    assert first_end > outage_end_ms
    assert client.get_run(first.info.run_id).info.end_time == first_end
    parents = [
        r
        for r in client.search_runs([client.get_experiment_by_name("study-c").experiment_id])
        if r.data.tags.get(tracking.KIND_TAG) == "study"
    ]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [r.info.status for r in parents]
    (env["root"] / "report-c").mkdir()
    text = Path(
        client.download_artifacts(parents[0].info.run_id, "report/report.md", str(env["root"] / "report-c"))
    ).read_text()
    for run in done:
        assert f"{100 * run.data.metrics['val/mIoU']:.2f}" in text
