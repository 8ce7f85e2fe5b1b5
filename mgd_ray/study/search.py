"""The search of a study: the study file's space as Optuna distributions, the Optuna sampler, ASHA."""

from __future__ import annotations

from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from mgd_ray.study.config import FloatRange, IntRange, SearchSpace, StudyConfig

METRIC = "val/mIoU"


def optuna_distributions(space: SearchSpace) -> dict[str, optuna.distributions.BaseDistribution]:
    """Ranges → Float/Int distributions, choice lists → categorical ones (same names as the study file)."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, spec in space.searched().items():
        if isinstance(spec, FloatRange):
            out[name] = optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log)
        elif isinstance(spec, IntRange):
            out[name] = optuna.distributions.IntDistribution(spec.low, spec.high, step=spec.step)
        else:
            out[name] = optuna.distributions.CategoricalDistribution(list(spec.choices))
    return out


def make_sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    searcher = study.searcher
    if searcher.sampler == "random":
        return optuna.samplers.RandomSampler(seed=searcher.seed)
    if searcher.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=searcher.seed, warn_independent_sampling=False)
    # TPE's default warm-up of 10 random trials would make a small study pure random search.
    startup = max(2, min(10, searcher.num_samples // 3))
    return optuna.samplers.TPESampler(seed=searcher.seed, n_startup_trials=startup)


def make_searcher(study: StudyConfig) -> OptunaSearch | None:
    space = optuna_distributions(study.search)
    if not space:
        return None  # nothing to search: num_samples repeats of the default configuration
    return OptunaSearch(space=space, metric=METRIC, mode="max", sampler=make_sampler(study))


def make_scheduler(study: StudyConfig) -> TrialScheduler:
    """ASHA over evaluation rounds (``training_iteration`` counts reports, one per evaluation)."""
    scheduler = study.scheduler
    if scheduler.type == "none":
        return FIFOScheduler()
    max_t = max(1, study.schedule.iterations // study.schedule.eval_every)
    if "iterations" in study.search.searched():
        max_t = max(study.search.iterations.choices) // study.schedule.eval_every
    # max_t one past the last evaluation: ASHA stops a trial *at* max_t, which would kill a finished
    # trial's function before it exports its model and logs its artifacts.
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=max_t + 1,
        grace_period=min(scheduler.grace_period, max_t),
        reduction_factor=scheduler.reduction_factor,
    )


def optuna_study_from(rows: list[dict[str, Any]], space: SearchSpace) -> optuna.Study:
    """An Optuna study rebuilt from the finished trials (params + best mIoU), for Optuna's plots."""
    dists = optuna_distributions(space)
    ostudy = optuna.create_study(direction="maximize")
    for row in rows:
        params = {k: row["params"][k] for k in dists if k in row["params"]}
        if len(params) != len(dists) or row.get("miou") is None:
            continue
        ostudy.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(row["miou"])))
    return ostudy
