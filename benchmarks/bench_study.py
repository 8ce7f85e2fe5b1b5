"""Cost of an N-trial MGD search: with and without the teacher cache and ASHA, and against plain loops.

Runs the study file (default: the quickstart) as four variants of its λ1/λ2/H_v search, N trials
each, no baselines, in one working directory, so the teachers are pretrained once (by the first
variant) and reused by the others through MLflow; teacher pretraining is excluded from every cost.

    live        teachers run live in every trial, every trial runs to the end (= N independent trials)
    cache       the study's teacher-cache stage, then trials read the cache
    live+asha   live teachers, ASHA early stopping
    cache+asha  both (the study's default)

Cost = trial-seconds (the sum of the trials' MLflow run durations: each trial holds its worker's
CPUs that long) plus the cache stage's seconds. Then the "live" variant's trials are run again as
plain Python loops (``run_distill``, same configs, same concurrency and threads per trial, no Ray,
Tune or MLflow): the orchestration overhead is the difference. Prints tables; not a test.

    python benchmarks/bench_study.py [--study studies/quickstart.yaml] [--trials 16] [--keep DIR]
                                     [--variants live,cache,live+asha,cache+asha] [--no-plain]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"live": (False, False), "cache": (True, False), "live+asha": (False, True), "cache+asha": (True, True)}


def variant_study(base: dict[str, Any], variant: str, trials: int) -> dict[str, Any]:
    cache, asha = VARIANTS[variant]
    study = json.loads(json.dumps(base))
    study["name"] = f"{base['name']}-bench-{variant.replace('+', '-')}"
    study["baselines"] = []
    study["seeds"] = list(base.get("seeds", [0]))[:1]
    study["searcher"] = dict(base.get("searcher", {})) | {"num_samples": trials}
    study["scheduler"] = (dict(base.get("scheduler", {})) | {"type": "asha"}) if asha else {"type": "none"}
    study["distill"] = dict(base.get("distill", {})) | {"teacher_cache": cache}
    return study


def _duration(run: Any) -> float:
    return ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000


def measure(client: MlflowClient, name: str) -> dict[str, Any]:
    """Trial-seconds, search span and cache seconds of study ``name``, read back from MLflow."""
    runs = [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id], f"tags.`mgd_ray.study` = '{name}'", max_results=5000)
    ]
    trials = [r for r in runs if r.data.tags.get("mgd_ray.kind") == "trial"]
    teachers = [r for r in runs if r.data.tags.get("mgd_ray.kind") == "teacher"]
    parent = next(r for r in runs if r.data.tags.get("mgd_ray.kind") == "study")
    span = (max(r.info.end_time for r in trials) - min(r.info.start_time for r in trials)) / 1000
    cache_s = float(parent.data.tags.get("teacher_cache.seconds", 0.0))
    reused = parent.data.tags.get("teacher_cache.reused") == "True"
    return {
        "trials": trials,
        "trial_s": sum(_duration(r) for r in trials),
        "span_s": span,
        "cache_s": 0.0 if reused else cache_s,
        "teacher_s": sum(_duration(r) for r in teachers),
        "states": Counter(r.data.tags.get("mgd_ray.state", "?") for r in trials),
        "last": max(r.data.metrics.get("val/mIoU", float("nan")) for r in trials),  # best last evaluation
    }


def _plain_trial(args: tuple[dict[str, Any], int]) -> float:
    """One trial as a plain loop in this process: ``run_distill`` with a no-op reporter."""
    import torch

    from mgd_ray.config import parse_job_config
    from mgd_ray.jobs.distill import run_distill

    cfg_dict, threads = args
    torch.set_num_threads(threads)
    cfg = parse_job_config("student", cfg_dict)
    with tempfile.TemporaryDirectory(prefix="mgd_plain_") as tmp:
        start = time.perf_counter()
        run_distill(cfg, lambda metrics, ckpt: None, Path(tmp))
        return time.perf_counter() - start


def plain_configs(work: Path, name: str, trials: list[Any]) -> list[dict[str, Any]]:
    """The trials' job configs, rebuilt from the study's resolved file, its teachers and their params."""
    from mgd_ray.study.config import StudyConfig
    from mgd_ray.study.plan import Plan, distill_job

    resolved = max((work / "mgd_ray_runs" / name).glob("*/resolved_study.json"))
    root = resolved.parent
    study = StudyConfig.model_validate_json(resolved.read_text())
    plan = Plan(study, root, "", "", "")
    for teacher in study.teachers:
        plan.teachers[teacher] = next((root / "teachers" / teacher).rglob("model.pt"))
    out = []
    for r in trials:
        params = json.loads(r.data.tags["mgd_ray.params"])
        cfg = distill_job(plan, params, study.seeds[0], root / "plain" / r.info.run_id)
        out.append(cfg.model_dump(mode="json"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default=str(REPO / "studies" / "quickstart.yaml"))
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-loop rerun of the live variant")
    ap.add_argument("--plain-trials", type=int, default=None, help="rerun only the first K live trials as plain loops")
    ap.add_argument("--keep", default=None, help="run in this directory and keep it (default: a temp dir)")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mgd_bench_study_"))
    work.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(Path(args.study).read_text())
    exe = Path(sys.executable).parent / "mgd-ray"
    print(f"{args.trials}-trial search of {args.study} in {work} ({os.cpu_count()} CPUs)", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        study = variant_study(base, variant, args.trials)
        path = work / f"{study['name']}.yaml"
        path.write_text(yaml.safe_dump(study, sort_keys=False))
        start = time.time()
        proc = subprocess.run([str(exe), "run", path.name], cwd=work, capture_output=True, text=True, check=False)
        wall = time.time() - start
        (work / f"{study['name']}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print(proc.stderr[-4000:])
            print(f"variant {variant} FAILED after {wall:.0f} s; log: {work / (study['name'] + '.log')}")
            return 1
        client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
        results[variant] = measure(client, study["name"]) | {"wall_s": wall, "name": study["name"]}
        r = results[variant]
        print(
            f"  {variant:11s} done in {wall:6.0f} s (search {r['span_s']:.0f} s, teachers trained {r['teacher_s']:.0f} s)",
            flush=True,
        )

    ref = results.get("live")
    print(
        f"\n{'variant':11s} {'search wall s':>13s} {'trial-s':>8s} {'cache s':>8s} {'cost s':>8s} {'vs live':>8s} {'best last mIoU':>14s}  states"
    )
    for variant, r in results.items():
        cost = r["trial_s"] + r["cache_s"]
        rel = f"{cost / (ref['trial_s'] + ref['cache_s']):7.2f}x" if ref else "      -"
        states = ", ".join(f"{k} {v}" for k, v in sorted(r["states"].items()))
        print(
            f"{variant:11s} {r['span_s'] + r['cache_s']:13.0f} {r['trial_s']:8.0f} {r['cache_s']:8.0f} {cost:8.0f} {rel:>8s} {100 * r['last']:14.2f}  {states}"
        )
    print("cost = trial-seconds + cache-stage seconds; 'live' = N independent trials (target for cache+asha: <= 0.35x)")

    if ref is None or args.no_plain:
        return 0
    study = yaml.safe_load((work / f"{ref['name']}.yaml").read_text())
    resources = study.get("resources", {})
    concurrent = int(study["searcher"].get("max_concurrent", 1))
    threads = int(resources.get("cpus_per_worker", 1))
    trials = sorted(ref["trials"], key=lambda r: r.info.start_time)[: args.plain_trials]
    configs = plain_configs(work, ref["name"], trials)
    print(
        f"\nplain loops: {len(configs)} of the live trials, {concurrent} at a time, {threads} thread(s) each",
        flush=True,
    )
    start = time.time()
    with ProcessPoolExecutor(concurrent, mp_context=get_context("spawn")) as pool:
        seconds = list(pool.map(_plain_trial, [(c, threads) for c in configs]))
    plain_wall = time.time() - start
    plain_s = sum(seconds)
    tune_s = sum(_duration(r) for r in trials)
    fit_s = sum(r.data.metrics.get("time/train_s", _duration(r)) for r in trials)
    print(f"\n{len(trials)} trials{'':19s} {'Ray/Tune/MLflow':>15s} {'plain loops':>12s} {'overhead':>9s}")
    if len(trials) == len(ref["trials"]):
        print(
            f"{'search wall (s)':28s} {ref['span_s']:15.0f} {plain_wall:12.0f} {100 * (ref['span_s'] / plain_wall - 1):8.1f}%"
        )
    print(f"{'trial-seconds':28s} {tune_s:15.0f} {plain_s:12.0f} {100 * (tune_s / plain_s - 1):8.1f}%")
    print(f"{'  from Train start to plots':28s} {fit_s:15.0f} {plain_s:12.0f} {100 * (fit_s / plain_s - 1):8.1f}%")
    print(
        f"per trial: {(tune_s - plain_s) / len(trials):.1f} s of orchestration on {plain_s / len(trials):.1f} s of training"
    )
    print(
        "overhead target: <= 10% of trial time (Ray worker start, Tune, MLflow logging, checkpoints, final eval and plots)"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
