"""The stages of a study, each a Ray Tune experiment whose trials each drive one Ray Train job.

Tune schedules the trials onto the cluster (``max_concurrent``; a trial whose job runs as a Train
worker group reserves no CPU itself, its workers do), Optuna proposes the search's
configurations and ASHA stops weak ones early. Stages overlap where nothing depends on them:
baselines that need no teacher queue behind the teachers in their Tune stage, and the
teacher-signal cache builds while the other baselines run. ``resume=True`` restores each
unfinished Tune experiment; finished trials are never run again.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import ray.tune

from mgd_ray import tracking
from mgd_ray.data.stream import load_job_data
from mgd_ray.final_eval import evaluate_on_test, save_examples
from mgd_ray.jobs.pretrain import BACKBONE_FILE
from mgd_ray.study import claims
from mgd_ray.study.plan import (
    Plan,
    distill_job,
    pretrain_key,
    pretrain_label,
    pretrained_architectures,
    teacher_key,
    teacher_ref,
)
from mgd_ray.study.results import baselines_student_best, front_members, study_results
from mgd_ray.study.search import (
    fail_orphan_trials,
    fresh_optuna_study,
    make_scheduler,
    make_searcher,
    open_storage,
    shown_url,
)
from mgd_ray.study.trial import run_trial
from mgd_ray.teacher_cache.build import build_cache
from mgd_ray.teacher_cache.read import check_cache

log = logging.getLogger("mgd_ray.study")


def _tune_run_config(plan: Plan, stage: str) -> ray.tune.RunConfig:
    # Jobs in the trial's process: Tune, not Ray Train, retries a failed one (once, from its last
    # checkpoint, as Ray Train's max_failures=1 does for the others) and keeps its checkpoint.
    in_trial = plan.in_trial(teacher=stage == "teachers")
    return ray.tune.RunConfig(
        name=stage,
        storage_path=str(plan.root / "tune"),
        failure_config=ray.tune.FailureConfig(max_failures=1 if in_trial else 0),
        checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=1) if in_trial else None,
        verbose=1,
    )


def _tuner(plan: Plan, stage: str, resume: bool, **kwargs: Any) -> ray.tune.Tuner:
    resources = plan.trial_resources(teacher=stage == "teachers")
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, plan=plan), resources)
    path = plan.root / "tune" / stage
    if resume and ray.tune.Tuner.can_restore(str(path)):
        log.info("resuming stage %s from %s", stage, path)
        return ray.tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    if path.exists():
        shutil.rmtree(path)
    return ray.tune.Tuner(trainable, run_config=_tune_run_config(plan, stage), **kwargs)


def _grid_tune_config(plan: Plan) -> ray.tune.TuneConfig:
    """The teacher, baseline and repeat stages: a fixed grid of jobs with fixed MLflow keys, so Tune
    may hand a finished trial's process to the next trial (``reuse_actors``; not in the search)."""
    return ray.tune.TuneConfig(reuse_actors=True, max_concurrent_trials=plan.study.searcher.max_concurrent)


def run_grid(plan: Plan, stage: str, resume: bool, jobs: list[dict[str, Any]]) -> None:
    """One Tune stage whose trials are the fixed ``jobs`` (each a trial's ``job`` config); fails on a failed one."""
    tuner = _tuner(
        plan,
        stage,
        resume,
        param_space={"stage": stage, "job": ray.tune.grid_search(jobs)},
        tune_config=_grid_tune_config(plan),
    )
    check_stage(tuner.fit(), stage)


def check_stage(results: Any, stage: str) -> None:
    """Fail the stage on a failed trial; else drop its trials' Tune checkpoints (``drop_checkpoints``)."""
    errors = [r for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"stage {stage}: {len(errors)} trial(s) failed; first error: {errors[0].error}")
    drop_checkpoints(results, stage)


def drop_checkpoints(results: Any, stage: str) -> int:
    """Delete the Tune checkpoints of a stage's trials that ended (finished or stopped early).

    They only serve to resume a trial, and an ended trial never resumes (``Tuner.restore`` leaves
    it alone): its model is in MLflow and in the study's output folder, and a resume state (a CPS
    teacher's above all) is several times the exported network. Returns bytes freed.
    """
    freed = 0
    for r in results:
        trial_dir = Path(r.path) if r.error is None and r.path else None
        if trial_dir is None or not trial_dir.is_dir():  # failed, or on remote storage: leave it
            continue
        for ckpt in trial_dir.glob("checkpoint_*"):
            freed += sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
            shutil.rmtree(ckpt, ignore_errors=True)
    log.info("stage %s: deleted the ended trials' Tune checkpoints (%.1f MiB)", stage, freed / 2**20)
    return freed


def train_shared(
    plan: Plan,
    stage: str,
    keys: dict[str, str],
    find: Callable[[str], Any | None],
    jobs: Callable[[list[str]], list[dict[str, Any]]],
    resume: bool,
    timing: claims.Timing = claims.DEFAULT_TIMING,
) -> dict[str, tuple[Any, str | None]]:
    """Train the shared work ``keys`` (name → teacher or pretraining key) once, across studies running
    at once (``claims``): name → (its finished run, None if this study trained it, else the name of the
    study that did). What another study holds is waited for; if that study dies, this one trains it.
    ``jobs(names)`` is the Tune grid that trains ``names``."""
    client = tracking.client_for(plan.tracking_uri)
    what = stage.removesuffix("s")
    out: dict[str, tuple[Any, str | None]] = {}
    pending, first = list(keys), True
    while pending:
        wanted = {n: keys[n] for n in pending}
        with claims.claimed(client, wanted, plan.parent_run_id, plan.study.name, what, timing) as (mine, theirs):
            if mine:
                run_grid(plan, stage, resume and first, jobs(mine))
                runs = {n: find(keys[n]) for n in mine}
                missing = [n for n, run in runs.items() if run is None]
                if missing and resume and first:  # the restored Tune grid did not hold them: train them now
                    run_grid(plan, stage, False, jobs(missing))
                    runs |= {n: find(keys[n]) for n in missing}
                for name, run in runs.items():
                    if run is None:
                        raise RuntimeError(f"{what} {name} trained but its MLflow run is missing")
                    out[name] = (run, None)
        waited = claims.wait_for(client, theirs, find, what, timing) if theirs else {}
        for name, run in waited.items():
            if run is not None:
                out[name] = (run, theirs[name].study)
        pending, first = [n for n, run in waited.items() if run is None], False
    return out


def stage_pretrain(plan: Plan, resume: bool) -> dict[str, dict[str, Any]]:
    """Backbones of ``pretrained: builtin`` models, pretrained on the built-in corpus: found in MLflow
    (any study's, by ``pretrain_key``) or trained now, one Tune trial each (once across studies
    running at once: ``train_shared``). Teachers that an earlier study trained are reused as they are,
    so their backbones are not pretrained again."""
    client = tracking.client_for(plan.tracking_uri)
    teachers = [
        name
        for name, spec in plan.study.teachers.items()
        if spec.checkpoint is None
        and spec.mlflow_run is None
        and tracking.find_teacher(client, teacher_key(plan.study, name)) is None
    ]
    info: dict[str, dict[str, Any]] = {}
    to_train = {}
    models = pretrained_architectures(plan.study, teachers)
    for model in models:
        key, label = pretrain_key(plan.study, model), pretrain_label(model)
        run = tracking.find_finished(client, tracking.PRETRAIN_KEY_TAG, key)
        if run is None:
            to_train[label] = (model, key)
            continue
        plan.pretrained[key] = tracking.download_checkpoint(
            plan.tracking_uri, run.info.run_id, plan.root / "pretrained" / label, tracking.PRETRAIN_ARTIFACT
        )
        info[label] = {"source": f"MLflow run {run.info.run_id}", "run_id": run.info.run_id}
    if to_train:
        trained = train_shared(
            plan,
            "pretrain",
            {label: key for label, (_, key) in to_train.items()},
            lambda key: tracking.find_finished(client, tracking.PRETRAIN_KEY_TAG, key),
            lambda labels: [
                {"stage": "pretrain", "backbone": to_train[x][0].backbone, "stem": to_train[x][0].stem} for x in labels
            ],
            resume,
        )
        for label, (run, by) in trained.items():
            key = to_train[label][1]
            if by is None:
                plan.pretrained[key] = plan.root / "pretrained" / label / BACKBONE_FILE
                info[label] = {"source": "pretrained in this study", "run_id": run.info.run_id}
            else:
                plan.pretrained[key] = tracking.download_checkpoint(
                    plan.tracking_uri, run.info.run_id, plan.root / "pretrained" / label, tracking.PRETRAIN_ARTIFACT
                )
                info[label] = {
                    "source": f"MLflow run {run.info.run_id}, pretrained by study {by}",
                    "run_id": run.info.run_id,
                }
    for model in models:
        entry = info[pretrain_label(model)]
        entry["path"] = str(plan.pretrained[pretrain_key(plan.study, model)])
        metrics = client.get_run(entry["run_id"]).data.metrics
        entry |= {k: metrics[k] for k in ("pretrain/label_accuracy", "pretrain/mAP") if k in metrics}
    return info


def stage_teachers(plan: Plan, resume: bool) -> dict[str, dict[str, Any]]:
    """Teacher checkpoints: given files, given MLflow runs, earlier pretrainings (any study), or train
    now (once across studies running at once: ``train_shared``)."""
    client = tracking.client_for(plan.tracking_uri)
    info: dict[str, dict[str, Any]] = {}
    to_train = []
    for name, spec in plan.study.teachers.items():
        if spec.checkpoint is not None:
            plan.teachers[name] = Path(spec.checkpoint).resolve()
            info[name] = {"source": f"file {spec.checkpoint}"}
            continue
        run = None
        if spec.mlflow_run is not None:
            run = client.get_run(spec.mlflow_run)
        else:
            run = tracking.find_teacher(client, teacher_key(plan.study, name))
        if run is not None:
            plan.teachers[name] = tracking.download_checkpoint(
                plan.tracking_uri, run.info.run_id, plan.root / "teachers" / name
            )
            info[name] = {"source": f"MLflow run {run.info.run_id}", "run_id": run.info.run_id}
            continue
        to_train.append(name)

    def jobs(names: list[str]) -> list[dict[str, Any]]:
        grid: list[dict[str, Any]] = [{"stage": "teachers", "teacher": name} for name in names]
        if (
            plan.trial_resources(teacher=True) == plan.trial_resources()
            and plan.in_trial(teacher=True) == plan.in_trial()
        ):
            # Baselines that need no teacher queue behind the teachers, on the slots the faster
            # teacher frees while the slower one finishes (same trial shape, so one Tune stage).
            grid += [
                {"stage": "baselines", "baseline": i, "seed": seed}
                for i, seed in pending_baselines(plan, teacher_free=True)
            ]
        return grid

    if to_train:
        keys = {name: teacher_key(plan.study, name) for name in to_train}
        trained = train_shared(plan, "teachers", keys, lambda key: tracking.find_teacher(client, key), jobs, resume)
        for name, (run, by) in trained.items():
            if by is None:
                plan.teachers[name] = plan.root / "teachers" / name / "model.pt"
                info[name] = {"source": "pretrained in this study", "run_id": run.info.run_id}
            else:
                plan.teachers[name] = tracking.download_checkpoint(
                    plan.tracking_uri, run.info.run_id, plan.root / "teachers" / name
                )
                info[name] = {
                    "source": f"MLflow run {run.info.run_id}, trained by study {by}",
                    "run_id": run.info.run_id,
                }
    return info


def write_teacher_examples(plan: Plan) -> Path | None:
    """The teachers' predictions on the example images, once for every trial's overlay page."""
    if not plan.teachers:
        return None
    return save_examples(plan.root / "teacher_examples.npz", dict(plan.teachers), load_job_data(plan.study.data))


def _searched_values(param: Any, default: int) -> list[int]:
    """Every value an integer search parameter can take (with the study's default)."""
    if param is None:
        return [default]
    values = param.choices if hasattr(param, "choices") else range(param.low, param.high + 1)
    return sorted({default, *values})


def _cache_cpus(plan: Plan, leave_cpus: float = 0.0) -> float:
    """CPUs for the cache build: on CPU, all the search's concurrent trials will hold, less the
    ``leave_cpus`` that jobs running beside the build need, capped by the largest node's (at least
    one worker's); on GPU, one worker's (the GPU does the work)."""
    resources = plan.study.resources
    if resources.gpus_per_worker:
        return resources.cpus_per_worker
    wanted = plan.study.searcher.max_concurrent * resources.workers * resources.cpus_per_worker
    alive = (node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive"))
    largest = max(alive, default=resources.cpus_per_worker)
    return max(resources.cpus_per_worker, min(wanted, largest - leave_cpus))


def cache_contents(plan: Plan) -> tuple[Any, list[int], int, str]:
    """What the study's teacher cache holds: (the search's distillation job, every H_v it can pick,
    the steps it covers, ``build_cache``'s ``signals``). Steps: the longest trial's, or
    ``distill.teacher_cache_steps`` if fewer; every signal of every teacher when the search varies
    which teacher feeds which term."""
    study, search = plan.study, plan.study.search
    roles_varied = any(
        getattr(search, k) is not None
        for k in ("teachers", "pixel_labeled", "pixel_unlabeled", "image_level", "region_level")
    )
    job = distill_job(plan, {}, study.seeds[0], plan.root / "teacher_cache_job")
    if roles_varied:
        job = job.model_copy(update={"teachers": {name: teacher_ref(plan, name) for name in study.teachers}})
    pool_sizes = _searched_values(search.pool_size, job.losses.pool_size)
    iterations = max(_searched_values(search.iterations, job.schedule.iterations))
    if study.distill.teacher_cache_steps is not None:
        iterations = min(iterations, study.distill.teacher_cache_steps)
    return job, pool_sizes, iterations, "all" if roles_varied else "job"


def stage_cache(plan: Plan, leave_cpus: float = 0.0) -> Callable[[], dict[str, Any]]:
    """Run the teachers once over the search's batch stream, for every trial to read.

    Built for the first seed (the search's) with every H_v and iteration count the search can pick,
    and every teacher's every signal when the search varies which teacher feeds which term. A cache
    that already serves the study (a resumed or repeated study) is kept. One Ray task builds the
    ranks of a ``resources.workers``-worker trial in turn (CPUs: ``_cache_cpus``). The build starts
    here and this returns the function that waits for it, so the baselines run meanwhile on the
    ``leave_cpus`` it leaves free.
    """
    study = plan.study
    if not study.distill.teacher_cache or not plan.teachers:
        return lambda: {"used": False}
    directory = plan.root / "teacher_cache"
    plan.teacher_cache = directory
    job, pool_sizes, iterations, signals = cache_contents(plan)
    workers, gpus = study.resources.workers, study.resources.gpus_per_worker
    longest = job.model_copy(update={"schedule": job.schedule.model_copy(update={"iterations": iterations})})
    status, _ = check_cache(longest, world_size=workers)
    if status.hit and status.steps >= iterations:
        log.info("teacher cache: reusing %s", directory)
        return lambda: {"used": True, "directory": str(directory), "reused": True}
    cpus = _cache_cpus(plan, leave_cpus)
    pending = ray.remote(num_cpus=cpus, num_gpus=gpus)(build_cache).remote(
        job,
        directory,
        pool_sizes=pool_sizes,
        iterations=iterations,
        world_size=workers,
        signals=signals,
        device="cuda" if gpus else "cpu",
        threads=max(1, int(cpus)),
    )

    def wait() -> dict[str, Any]:
        summary = ray.get(pending)
        sizes = {
            k: summary[k] for k in ("bytes", "bytes_per_epoch", "bytes_per_training_image", "seconds") if k in summary
        }
        return {
            "used": True,
            "directory": str(directory),
            "reused": False,
            "pool_sizes": pool_sizes,
            "iterations": iterations,
        } | sizes

    return wait


def pending_baselines(plan: Plan, teacher_free: bool = False) -> list[tuple[int, int]]:
    """(baseline index, seed) of every baseline run the study still needs: those without a finished
    MLflow run (some may have run with the teachers), only those that need no teacher if asked."""
    client = tracking.client_for(plan.tracking_uri)
    jobs = []
    for i, spec in enumerate(plan.study.baselines):
        if teacher_free and spec.teacher is not None:
            continue
        for seed in plan.study.seeds:
            run = tracking.find_run(client, [plan.experiment_id], f"{plan.parent_run_id}/baseline/{spec.name}/{seed}")
            if run is None or run.info.status != "FINISHED" or run.data.tags.get(tracking.STATE_TAG) != "finished":
                jobs.append((i, seed))
    return jobs


def stage_baselines(plan: Plan, resume: bool, jobs: list[tuple[int, int]]) -> None:
    """The baselines ``jobs`` (``pending_baselines``), on the CPUs the cache build leaves."""
    if not jobs:
        return
    run_grid(plan, "baselines", resume, [{"baseline": i, "seed": seed} for i, seed in jobs])


def drop_orphan_trial_runs(plan: Plan, known_trial_ids: set[str]) -> list[str]:
    """Delete the search's unfinished MLflow trial runs whose trial Tune's snapshot does not know.

    A trial creates its run as soon as it starts; a driver killed before Tune's next snapshot
    leaves a run that the resumed search never continues (it proposes a new trial instead), so the
    study would show one trial too many. Finished runs are kept: they are results. The job of a
    dropped trial left its own output folder (``trials/<trial id>``: the checkpoints it wrote before
    the kill), which nothing resumes: it goes too.
    """
    client = tracking.client_for(plan.tracking_uri)
    query = f"tags.`mlflow.parentRunId` = '{plan.parent_run_id}' and tags.`{tracking.KIND_TAG}` = 'trial'"
    dropped = []
    for run in client.search_runs([plan.experiment_id], query, max_results=5000):
        trial_id = run.data.tags.get("mgd_ray.trial_id")
        if run.info.status != "FINISHED" and trial_id not in known_trial_ids:
            client.delete_run(run.info.run_id)
            if trial_id:
                shutil.rmtree(plan.root / "trials" / trial_id, ignore_errors=True)
            dropped.append(run.info.run_id)
    if dropped:
        log.info("search: deleted %d unfinished trial run(s) unknown to Tune's snapshot: %s", len(dropped), dropped)
    return dropped


def stage_search(plan: Plan, resume: bool) -> Any:
    """The Optuna search (with ASHA) over the study's search space, ``searcher.num_samples`` trials."""
    study = plan.study
    path = plan.root / "tune" / "search"
    restoring = resume and ray.tune.Tuner.can_restore(str(path))
    if restoring:
        drop_orphan_trial_runs(plan, {t.trial_id for t in ray.tune.ExperimentAnalysis(str(path)).trials})
    elif resume:
        drop_orphan_trial_runs(plan, set())  # the search had not snapshotted yet: it starts afresh
    storage = open_storage(study.searcher.storage) if study.searcher.storage else None
    multi = study.searcher.multi_objective
    costs = {name: plan.costs[name].value(study.searcher.cost) for name in plan.students} if multi else None
    searcher = make_searcher(
        study, storage, plan.optuna_study if storage else None, plan.warm_start, students=plan.students, costs=costs
    )
    if storage is not None and searcher is not None and not restoring:
        attrs = {"mgd_ray.study": study.name, "mlflow.parent_run_id": plan.parent_run_id}
        attrs |= {"mlflow.tracking_uri": shown_url(plan.tracking_uri)}
        fresh_optuna_study(storage, plan.optuna_study, attrs, multi_objective=multi)
    tuner = _tuner(
        plan,
        "search",
        resume,
        param_space={"stage": "search", "seed": study.seeds[0]},
        tune_config=ray.tune.TuneConfig(
            # A trial that ASHA stops leaves at its next report when the job runs in the trial's
            # process (Tune reports synchronously), so the process can take the next trial. A
            # Train worker group's trial is still inside fit() then, and Tune cannot reuse it.
            # (A reused process starts the next trial's MLflow run before Tune's snapshot records
            # the trial: ``drop_orphan_trial_runs`` cleans up after a driver killed right then.)
            reuse_actors=plan.in_trial(),
            metric="val/mIoU",
            mode="max",
            search_alg=searcher,
            scheduler=make_scheduler(study),
            num_samples=study.searcher.num_samples,
            max_concurrent_trials=study.searcher.max_concurrent,
        ),
    )
    results = tuner.fit()
    if storage is not None and searcher is not None:
        orphans = fail_orphan_trials(storage, plan.optuna_study)
        if orphans:
            log.info("search: Optuna trial(s) %s were asked for just before the driver died; marked FAIL", orphans)
    check_stage(results, "search")
    return results


def stage_repeats(plan: Plan, best_params: dict[str, Any], resume: bool) -> None:
    """Re-run the best configuration on the other seeds, so its mean ± std sits beside the baselines'."""
    extra = plan.study.seeds[1:]
    if not extra:
        return
    tuner = _tuner(
        plan,
        "repeats",
        resume,
        param_space={"stage": "repeats", "params": best_params, "seed": ray.tune.grid_search(list(extra))},
        tune_config=_grid_tune_config(plan),
    )
    check_stage(tuner.fit(), "repeats")


def stage_test(
    plan: Plan, teachers: dict[str, dict[str, Any]], best_params: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """The final evaluation on the test split, the only time a study reads it: the teachers, every
    baseline run and the best configuration's runs (its trial and repeats), and in a study that
    searches the student, each Pareto-front member and the best trial on the baselines' student
    (all chosen on val before this reads test); nothing else ever sees it.

    Each model's ``test/mIoU`` and per-class IoU are logged to its run; returns them by run id. A run
    that has them already is not evaluated again: a teacher reused from an earlier study (its key
    holds the test split, so the figures are the same), or a run tested before the driver died.
    """
    client = tracking.client_for(plan.tracking_uri)
    runs = [info["run_id"] for info in teachers.values() if "run_id" in info]
    results = study_results(plan)
    for row in results.rows:
        chosen = row["kind"] == "baseline" or (row["kind"] in ("trial", "repeat") and row["params"] == best_params)
        if chosen and row["state"] == "finished":
            runs.append(row["run_id"])
    if plan.study.search.searches_student:  # the front's members, and the trial set beside the baselines
        same = baselines_student_best(plan, results.trials)
        runs += [r["run_id"] for r in front_members(plan, results.trials)] + ([same["run_id"]] if same else [])
    runs = [run_id for run_id in dict.fromkeys(runs) if not tracking.metric_history(client, run_id, "test/mIoU")]
    if not runs:
        return {}
    folder = plan.root / "test_models"
    models = {run_id: tracking.download_checkpoint(plan.tracking_uri, run_id, folder / run_id) for run_id in runs}
    resources = plan.study.resources
    evaluate = ray.remote(num_cpus=resources.cpus_per_worker, num_gpus=min(1.0, resources.gpus_per_worker))(
        evaluate_on_test
    )
    device = "cuda" if resources.gpus_per_worker else "cpu"
    figures = ray.get(evaluate.remote(models, plan.study.data, plan.study.schedule.eval_batch, device))
    for run_id, metrics in figures.items():
        step = max((s for s, _ in tracking.metric_history(client, run_id, "val/mIoU")), default=0)
        tracking.log_metrics(client, run_id, metrics, step=step)
    shutil.rmtree(folder, ignore_errors=True)
    log.info("test: evaluated %d models on the test split", len(figures))
    return figures
