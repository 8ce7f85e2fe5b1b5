"""The tests' and benchmarks' local services: a tiny study that validates, a port that binds, and a
process group stopped whole without touching any other process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mgd_ray.study.config import parse_study
from mgd_ray.testing import free_port, stop_group, tiny_builtin_study, train_worker_pids

SCHEDULE = {"iterations": 4, "eval_every": 2, "batch_labeled": 2, "batch_unlabeled": 2, "eval_batch": 4}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # no such process
        return False
    return state != "Z"


def test_the_tiny_study_is_a_valid_study_file(tmp_path: Path):
    study = parse_study(tiny_builtin_study("tiny", tmp_path, f"sqlite:///{tmp_path / 'm.db'}", SCHEDULE, trials=3))
    assert study.name == "tiny" and study.searcher.num_samples == 3
    assert study.schedule.iterations == 4 and str(study.storage_path) == str(tmp_path / "runs")


def test_free_port_binds():
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


def test_stop_group_stops_the_group_and_nothing_else(tmp_path: Path):
    # A "server" whose child sleeps in the same group, and a bystander outside it.
    pids = tmp_path / "pids"
    group = subprocess.Popen(["sh", "-c", f"sleep 300 & echo $! > {pids}; wait"], start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    try:
        for _ in range(100):
            if pids.exists() and pids.read_text().strip():
                break
            time.sleep(0.05)
        child = int(pids.read_text())
        stop_group(group)
        assert group.returncode == -9
        for _ in range(100):  # the child is dead: gone, or a zombie until whoever adopted it reaps it
            if not alive(child):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"the group's child {child} outlived stop_group")
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_train_worker_pids_finds_one_heads_workers_only(tmp_path: Path):
    """Two fake heads, each with a fake Ray Train worker that, like Ray's, leads a process group of its
    own inside its head's session: each head's session finds its own worker, and not the other's."""
    heads, workers = [], []
    try:
        for name in ("a", "b"):
            pidfile = tmp_path / name
            script = f"set -m; (exec -a ray::RayTrainWorker sleep 300) & echo $! > {pidfile}; wait"
            heads.append(subprocess.Popen(["bash", "-c", script], start_new_session=True))
            for _ in range(200):
                if pidfile.exists() and pidfile.read_text().strip():
                    break
                time.sleep(0.05)
            workers.append(int(pidfile.read_text()))
        for head, worker in zip(heads, workers, strict=True):
            for _ in range(200):  # until the subshell has become the titled sleep
                if Path(f"/proc/{worker}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    break
                time.sleep(0.05)
            assert os.getpgid(worker) == worker != head.pid and os.getsid(worker) == head.pid
            assert train_worker_pids(head.pid) == [worker]
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        for head in heads:
            stop_group(head)
