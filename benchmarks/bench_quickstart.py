"""Wall time of the quickstart (the README's first command, minus the install) on this machine.

Runs ``mgd-ray run studies/quickstart.yaml`` in a fresh temporary directory (no teacher to reuse),
then reads every run back from MLflow and prints: total wall time, time per stage, and per run its
wall time and the seconds spent inside the training loop. Not a test.

    python benchmarks/bench_quickstart.py [--study studies/quickstart.yaml] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent


def _newest_report(work: Path, study_file: Path) -> Path | None:
    """The study's newest report (other studies may share the folder with --keep)."""
    import yaml

    name = yaml.safe_load(study_file.read_text())["name"]
    return max(work.glob(f"mgd_ray_runs/{name}/*/report/report.md"), default=None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default=str(REPO / "studies" / "quickstart.yaml"))
    ap.add_argument("--keep", default=None, help="run in this directory and keep it (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mgd_quickstart_"))
    work.mkdir(parents=True, exist_ok=True)
    study = work / Path(args.study).name
    shutil.copyfile(args.study, study)
    exe = Path(sys.executable).parent / "mgd-ray"
    print(f"running {exe} run {study.name} in {work} ({os.cpu_count()} CPUs)", flush=True)
    start = time.time()
    proc = subprocess.run([str(exe), "run", study.name], check=False, cwd=work, capture_output=True, text=True)
    wall = time.time() - start
    (work / "run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stderr[-4000:])
        print(f"quickstart FAILED after {wall:.0f} s; log: {work / 'run.log'}")
        return 1
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    # This invocation's runs only: with --keep, earlier runs of the study share the store (a second run).
    runs = [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id], max_results=1000)
        if r.info.start_time >= 1000 * start
    ]
    stages: dict[str, list] = defaultdict(list)
    print(f"\n{'run':28s} {'stage':10s} {'state':14s} {'wall s':>8s} {'train s':>8s} {'data %':>7s} {'eval s':>7s}")
    for r in sorted(runs, key=lambda r: r.info.start_time):
        tags = r.data.tags
        if tags.get("mgd_ray.kind") == "study":
            continue
        end = r.info.end_time or r.info.start_time
        secs = (end - r.info.start_time) / 1000
        train = r.data.metrics.get("time/train_s", float("nan"))
        stage = tags.get("mgd_ray.stage", "?")
        stages[stage].append((r.info.start_time, end, secs, train))
        # The training loop's own clock (its last evaluation interval): the batch draw's share of a
        # step, and the seconds one evaluation took.
        share = 100 * r.data.metrics.get("time/data_share", float("nan"))
        evals = r.data.metrics.get("time/eval_s", float("nan"))
        print(
            f"{tags.get('mlflow.runName', r.info.run_id)[:28]:28s} {stage:10s} {tags.get('mgd_ray.state', '?'):14s}"
            f" {secs:8.1f} {train:8.1f} {share:7.1f} {evals:7.2f}"
        )
    print(f"\n{'stage':10s} {'wall s':>8s} {'runs':>5s} {'run-seconds':>12s}")
    for stage, items in stages.items():
        span = (max(e for _, e, _, _ in items) - min(s for s, _, _, _ in items)) / 1000
        print(f"{stage:10s} {span:8.1f} {len(items):5d} {sum(s for _, _, s, _ in items):12.1f}")
    # Seconds in which no run of the study was open: the driver's start, Ray's, the data check, the report.
    spans = sorted((s, e) for items in stages.values() for s, e, _, _ in items)
    covered, reach = 0.0, 0
    for s_, e in spans:
        covered += max(0, e - max(s_, reach)) / 1000
        reach = max(reach, e)
    print(f"{'no run':10s} {wall - covered:8.1f}   (driver and Ray start-up, data check, report)")
    print(f"\nquickstart wall time: {wall:.1f} s ({wall / 60:.1f} min); report: {_newest_report(work, study)}")
    print("\ndisk left in the working directory (MiB):")
    sizes = {p.name: disk_bytes(p) for p in sorted(work.iterdir())}
    for name, size in sizes.items():
        print(f"  {name:24s} {size / 2**20:10.1f}")
    for sub in sorted(work.glob("mgd_ray_runs/*/*/tune/*")):  # per Tune stage: the trials' checkpoints
        print(f"  {str(sub.relative_to(work)):60s} {disk_bytes(sub) / 2**20:10.1f}")
    print(f"  {'total':24s} {sum(sizes.values()) / 2**20:10.1f}")
    return 0


def disk_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (links not followed)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


if __name__ == "__main__":
    sys.exit(main())
