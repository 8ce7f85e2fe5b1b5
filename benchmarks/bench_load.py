"""Load: an N-trial study against a real MLflow server over HTTP, and two studies at once on one Ray head.

1. ``load``: one study of ``--trials`` tiny trials, ``--concurrent`` at a time, on a local Ray,
   logging to an ``mlflow server`` on 127.0.0.1 (sqlite store). Checks that every trial's MLflow run
   is complete (finished, every evaluation step once, each artifact once) and that the parent's
   report lists every trial. Samples the driver process's resident memory and CPU time once a
   second, against the number of finished trials, and prints how they grow per trial.
2. ``concurrent``: two studies submitted at once (two drivers) to one Ray head (``ray start``) and
   the same MLflow server, both needing the same teacher recipe. Checks that both finish, that every
   run sits under its own study's parent, and that the shared teacher was trained once (the other
   study waited on its claim: ``mgd_ray.study.claims``).

Prints PASS/FAIL per check and the figures; exits 1 when a check fails. Not a test (minutes). Its Ray
head and MLflow server run in process groups of their own and are stopped alone: another Ray on
the machine is left as it was.

    python benchmarks/bench_load.py [--trials 32] [--concurrent 4] [--what load,concurrent] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

from mgd_ray.study import claims
from mgd_ray.testing import BIN, free_port, start_mlflow, start_ray_head, stop_group, tiny_builtin_study, wait_started

TINY = {"iterations": 4, "eval_every": 2, "batch_labeled": 2, "batch_unlabeled": 2, "eval_batch": 4}
TICK = os.sysconf("SC_CLK_TCK")


def study(name: str, work: Path, uri: str, trials: int, concurrent: int) -> dict[str, Any]:
    """A tiny built-in study (32 images): a ResNet-18 CPS teacher, a MobileNetV2 student, ``trials`` MGD trials."""
    raw = tiny_builtin_study(name, work, uri, TINY, trials)
    raw["data"]["builtin"] |= {"num_train": 32, "num_val": 8}
    return raw | {
        "searcher": {"num_samples": trials, "max_concurrent": concurrent, "seed": 0},
        "scheduler": {"type": "none"},
        "resources": {"workers": 1, "cpus_per_worker": 2 / concurrent},
    }


class Sampler(threading.Thread):
    """The driver's resident memory (MB) and CPU seconds, with MLflow's finished-trial count, every second."""

    def __init__(self, pid: int, client: MlflowClient, name: str):
        super().__init__(daemon=True)
        self.pid, self.client, self.name = pid, client, name
        self.rows: list[tuple[float, float, float, int]] = []  # (t, rss MB, cpu s, finished trials)
        self.done = threading.Event()
        self.finished = 0

    def run(self) -> None:
        start, last_count = time.time(), 0.0
        while not self.done.is_set():
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
                stat = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                return
            rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024
            cpu = (int(stat[11]) + int(stat[12])) / TICK  # utime + stime
            if time.time() - last_count > 5:
                self.finished = len(finished_trials(self.client, self.name))
                last_count = time.time()
            self.rows.append((time.time() - start, rss, cpu, self.finished))
            self.done.wait(1.0)


def finished_trials(client: MlflowClient, name: str) -> list[Any]:
    try:
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id], max_results=5000) if exp is not None else []
    except Exception:  # noqa: BLE001 (the server is busy: count again next time)
        return []
    return [r for r in runs if r.data.tags.get("mgd_ray.kind") == "trial" and r.info.status == "FINISHED"]


def start_server(work: Path, port: int) -> subprocess.Popen:
    server = start_mlflow(work, port, workers=2)
    client = MlflowClient(f"http://127.0.0.1:{port}")
    for _ in range(120):
        try:
            client.search_experiments()
            return server
        except Exception:  # noqa: BLE001 (not up yet)
            time.sleep(1)
    raise RuntimeError(f"the MLflow server did not start; see {work / 'mlflow.log'}")


class Checks:
    def __init__(self) -> None:
        self.failed = 0

    def __call__(self, ok: bool, what: str, detail: str = "") -> None:
        self.failed += not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {what}{(': ' + detail) if detail else ''}", flush=True)


def complete_runs(client: MlflowClient, name: str, trials: int, check: Checks) -> list[Any]:
    """Every trial run finished, with each evaluation once and each artifact once."""
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if r.data.tags.get("mgd_ray.kind") == "study"]
    check(len(parents) == 1 and parents[0].info.status == "FINISHED", f"{name}: one finished parent run")
    trial_runs = [r for r in runs if r.data.tags.get("mgd_ray.kind") == "trial"]
    check(len(trial_runs) == trials, f"{name}: {trials} trial runs", f"{len(trial_runs)} found")
    keys = Counter(r.data.tags.get("mgd_ray.key") for r in runs)
    check(max(keys.values()) == 1, f"{name}: no duplicate run", "" if max(keys.values()) == 1 else str(keys))
    steps = list(range(TINY["eval_every"], TINY["iterations"] + 1, TINY["eval_every"]))
    bad = []
    for r in trial_runs:
        history = sorted(m.step for m in client.get_metric_history(r.info.run_id, "val/mIoU"))
        arts = [a.path for a in client.list_artifacts(r.info.run_id, "checkpoint")]
        arts += [a.path for a in client.list_artifacts(r.info.run_id, "plots")]
        if (
            r.info.status != "FINISHED"
            or r.data.tags.get("mgd_ray.state") != "finished"
            or history != steps
            or sorted(arts) != ["checkpoint/model.pt", "plots/confusion_matrix.png", "plots/predictions.png"]
            or (parents and r.data.tags.get("mlflow.parentRunId") != parents[0].info.run_id)
        ):
            bad.append(f"{r.info.run_name} ({r.info.status}, steps {history}, {arts})")
    check(not bad, f"{name}: every trial finished, every evaluation once, each artifact once", "; ".join(bad[:3]))
    if parents:
        dest = Path(tempfile.mkdtemp())
        text = Path(client.download_artifacts(parents[0].info.run_id, "report/report.md", str(dest))).read_text()
        section = text.split("## Search trials", 1)[-1].split("\n## ", 1)[0]
        rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| trial |")]
        listed = all(any(f"| {r.info.run_name} |" in row for row in rows) for r in trial_runs)
        check(len(rows) == trials and listed, f"{name}: the report lists all {trials} trials", f"{len(rows)} rows")
        shutil.rmtree(dest, ignore_errors=True)
    return trial_runs


def part_load(work: Path, uri: str, trials: int, concurrent: int, check: Checks) -> None:
    name = f"load-{trials}"
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study(name, work, uri, trials, concurrent)))
    print(f"\n1. {trials} trials, {concurrent} at a time, logging to {uri}", flush=True)
    client = MlflowClient(uri)
    start = time.time()
    with (work / f"{name}.log").open("w") as log:
        driver = subprocess.Popen([str(BIN / "mgd-ray"), "run", str(path)], cwd=work, stdout=log, stderr=log)
        sampler = Sampler(driver.pid, client, name)
        sampler.start()
        rc = driver.wait()
        sampler.done.set()
        sampler.join()
    wall = time.time() - start
    check(
        rc == 0, f"{name}: the study finished (exit {rc}) in {wall:.0f} s", "" if rc == 0 else str(work / f"{name}.log")
    )
    if rc != 0:
        return
    complete_runs(client, name, trials, check)
    rows = sampler.rows
    peak = max(r[1] for r in rows)
    # Growth per trial: the driver's memory and CPU time while the search ran, against finished trials.
    search = [r for r in rows if r[3] > 0]
    if len(search) >= 2 and search[-1][3] > search[0][3]:
        first, last = search[0], search[-1]
        n = last[3] - first[3]
        per_mb, per_cpu = (last[1] - first[1]) / n, (last[2] - first[2]) / n
        print(
            f"  driver: RSS {first[1]:.0f} MB at the first finished trial, "
            f"{last[1]:.0f} MB at trial {last[3]}, peak {peak:.0f} MB; CPU {rows[-1][2]:.0f} s in all"
        )
        print(
            f"  growth over trials {first[3]}..{last[3]}: {per_mb:+.2f} MB and {per_cpu:.2f} CPU-s of the driver per trial"
            f" (projected for 500 trials: {first[1] + per_mb * 500:.0f} MB, {per_cpu * 500 / 60:.0f} CPU-min)"
        )
        # The shape of the growth: resident memory at each quarter of the finished trials, and the
        # growth per trial within each quarter (a leak grows in every quarter; warm-up only early).
        marks = [max(1, round(last[3] * q / 4)) for q in range(1, 5)]
        at = [next(r for r in search if r[3] >= m) for m in marks]
        print("  RSS by finished trials: " + ", ".join(f"{r[3]}: {r[1]:.0f} MB" for r in at))
        steps = zip([first, *at[:-1]], at, strict=True)
        print(
            "  growth per trial in each quarter: "
            + ", ".join(f"{(b[1] - a[1]) / max(1, b[3] - a[3]):+.2f} MB" for a, b in steps)
        )


def part_concurrent(work: Path, uri: str, check: Checks) -> None:
    print("\n2. two studies at once on one Ray head, needing the same teacher", flush=True)
    gcs, dash = free_port(), free_port()
    # Ray's local clusters authenticate with a token; the drivers get it from the environment.
    env = dict(os.environ, RAY_DISABLE_USAGE_STATS="1", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    env.pop("RAY_ADDRESS", None)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-"))  # its own ray_current_cluster (mgd_ray.testing)
    head = start_ray_head(work / "ray_head.log", env, gcs, dash, ray_tmp)
    wait_started(head, work / "ray_head.log")
    names = ["twin-a", "twin-b"]
    try:
        drivers = []
        for name in names:
            path = work / f"{name}.yaml"
            raw = study(name, work, uri, 2, 1) | {"storage_path": str(work / "runs" / name)}
            path.write_text(yaml.safe_dump(raw))
            log = (work / f"{name}.log").open("w")
            cmd = [str(BIN / "mgd-ray"), "run", str(path), "--address", f"127.0.0.1:{gcs}"]
            drivers.append(subprocess.Popen(cmd, cwd=work, stdout=log, stderr=log, env=env))
        start = time.time()
        codes = [d.wait(timeout=3600) for d in drivers]
        print(f"  both drivers ended in {time.time() - start:.0f} s", flush=True)
    finally:
        stop_group(head)  # this head's processes only
        shutil.rmtree(ray_tmp, ignore_errors=True)
    client = MlflowClient(uri)
    for name, rc in zip(names, codes, strict=True):
        check(rc == 0, f"{name}: finished (exit {rc})", "" if rc == 0 else str(work / f"{name}.log"))
        if rc == 0:
            complete_runs(client, name, 2, check)
    teachers = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id]) if exp is not None else []
        teachers += [r for r in runs if r.data.tags.get("mgd_ray.kind") == "teacher"]
    keys = {r.data.tags.get("mgd_ray.teacher_key") for r in teachers}
    check(len(keys) == 1, "both studies asked for the same teacher", f"{len(keys)} teacher keys")
    check(len(teachers) == 1, "the shared teacher was trained once", f"{len(teachers)} teacher runs")
    exp = client.get_experiment_by_name(claims.CLAIMS_EXPERIMENT)
    held = client.search_runs([exp.experiment_id]) if exp is not None else []
    outcomes = sorted(f"{r.data.tags.get(claims.STUDY_TAG)}: {r.data.tags.get(claims.OUTCOME_TAG)}" for r in held)
    print(f"  claims on the teacher: {outcomes}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument("--what", default="load,concurrent")
    ap.add_argument("--keep", default=None, help="run in this directory and keep it (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mgd_bench_load_"))
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(work, port)
    uri = f"http://127.0.0.1:{port}"
    check = Checks()
    print(f"work dir {work}, MLflow {uri}, {os.cpu_count()} CPUs", flush=True)
    try:
        if "load" in args.what:
            part_load(work, uri, args.trials, args.concurrent, check)
        if "concurrent" in args.what:
            part_concurrent(work, uri, check)
    finally:
        stop_group(server, signal.SIGTERM)
    print(f"\n{'all checks passed' if not check.failed else f'{check.failed} check(s) FAILED'}")
    if not args.keep and not check.failed:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
