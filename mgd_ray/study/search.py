"""The search of a study: the study file's space as Optuna distributions, the Optuna sampler, ASHA,
and the optional Optuna storage (``searcher.storage``) that keeps the search for optuna-dashboard."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import optuna
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from mgd_ray.study.config import FloatRange, IntRange, SearchSpace, StudyConfig
from mgd_ray.study.costs import COST_METRICS, STUDENT_PARAM, architecture_name
from mgd_ray.study.per_architecture import PerArchitectureASHA

METRIC = "val/mIoU"

log = logging.getLogger("mgd_ray.study")


class StudyOptunaSearch(OptunaSearch):
    """Tune's Optuna searcher, with what a study adds: the student's cost as a second objective, and
    a storage that outlives the driver (``searcher.storage``).

    Cost: a trial's cost is its architecture's (``costs``: ``params["student"]`` → value), known
    before it trains, so the searcher tells Optuna (mIoU, cost) when the trial ends; the trial reports
    mIoU alone, and Tune checks only that (``metric``). Optuna takes no intermediate values with
    several objectives: early stopping is the scheduler's (``PerArchitectureASHA``).

    Storage: it is written the moment Tune tells a trial's end; Tune's snapshot of the searcher is
    taken every few seconds. A driver killed in between resumes from a snapshot in which that trial
    still runs: Tune restores it, the trial replays its finished MLflow run, and Optuna refuses the
    replayed reports ("has already finished and can not be updated"), which failed the resumed study.
    The storage already holds what the trial ended with, so such reports and the end are skipped.
    """

    def __init__(self, *args: Any, costs: dict[str, float] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._ended_in_storage: set[str] = set()
        self._costs = costs

    @property
    def metric(self) -> str | list[str] | None:
        """What Tune requires of every result: val mIoU (the cost is the searcher's own to add)."""
        return METRIC if getattr(self, "_costs", None) is not None else self._metric

    @property
    def mode(self) -> str | list[str] | None:
        return "max" if getattr(self, "_costs", None) is not None else self._mode

    def _stored_state(self, trial_id: str) -> optuna.trial.TrialState | None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return None
        state = ot_trial.storage.get_trial(ot_trial._trial_id).state
        return state if state.is_finished() else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._ended_in_storage and self._stored_state(trial_id) is not None:
            self._ended_in_storage.add(trial_id)
            log.info(
                "search: Optuna already holds the end of trial %s (before the driver died); not told again", trial_id
            )
        if trial_id not in self._ended_in_storage and self._costs is None:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._ended_in_storage or self._stored_state(trial_id) is not None:
            self._ended_in_storage.add(trial_id)
            self._completed_trials.add(trial_id)
            return
        if self._costs is None:
            super().on_trial_complete(trial_id, result, error)
            return
        if trial_id in self._completed_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        miou = result.get(METRIC) if result else None
        if miou is None:  # as Tune's searcher does for one objective: FAIL on an error, else PRUNED
            values, state = None, optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED
        else:
            values, state = [miou, self._costs[ot_trial.params[STUDENT_PARAM]]], optuna.trial.TrialState.COMPLETE
        try:
            self._ot_study.tell(ot_trial, values, state=state)
        except Exception as exc:  # noqa: BLE001 - as Tune's searcher: e.g. a NaN mIoU
            log.warning("search: Optuna refused trial %s's end: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


def optuna_distributions(
    space: SearchSpace, students: list[str] | None = None
) -> dict[str, optuna.distributions.BaseDistribution]:
    """Ranges → Float/Int distributions, choice lists → categorical ones (same names as the study file).

    A searched student is one categorical choice, ``student``, among ``students`` (the architectures
    within the searcher's limits, ``costs.allowed``): a pair of backbone and stride over a limit
    cannot be left out of two independent choices.
    """
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, spec in space.searched().items():
        if name.startswith("student_"):
            continue
        if isinstance(spec, FloatRange):
            out[name] = optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log)
        elif isinstance(spec, IntRange):
            out[name] = optuna.distributions.IntDistribution(spec.low, spec.high, step=spec.step)
        else:
            out[name] = optuna.distributions.CategoricalDistribution(list(spec.choices))
    if space.searches_student:
        if not students:
            raise ValueError("optuna_distributions: the search varies the student; pass its architectures")
        out[STUDENT_PARAM] = optuna.distributions.CategoricalDistribution(list(students))
    return out


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II, which Tune can snapshot: Optuna 5's holds a ``threading.Lock`` (for its
    generation cache), which pickle refuses; it is left out and made anew on unpickling."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_thread_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


def make_sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    searcher = study.searcher
    if searcher.sampler == "random":
        return optuna.samplers.RandomSampler(seed=searcher.seed)
    if searcher.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=searcher.seed, warn_independent_sampling=False)
    if searcher.sampler == "nsga2":
        # A generation of at least 2 and at most a third of the trials: Optuna's default of 50 would
        # make any study under 50 trials pure random search.
        return PicklableNSGAIISampler(seed=searcher.seed, population_size=max(2, searcher.num_samples // 3))
    # TPE's default warm-up of 10 random trials would make a small study pure random search.
    startup = max(2, min(10, searcher.num_samples // 3))
    return optuna.samplers.TPESampler(seed=searcher.seed, n_startup_trials=startup)


def make_searcher(
    study: StudyConfig,
    storage: optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    points: list[dict[str, Any]] | None = None,
    students: list[str] | None = None,
    costs: dict[str, float] | None = None,
) -> OptunaSearch | None:
    """Tune's Optuna searcher; with ``storage``, its Optuna study is ``study_name`` there. ``points``
    (``warm_start_points``) are enqueued, so the first trials run them before the sampler proposes.
    ``students``: the architectures a searched student chooses among; ``costs`` (architecture → the
    study's cost) makes the search multi-objective: val mIoU (max) and cost (min)."""
    space = optuna_distributions(study.search, students)
    if not space:
        return None  # nothing to search: num_samples repeats of the default configuration
    multi = study.searcher.multi_objective
    if multi and costs is None:
        raise ValueError(f"make_searcher: searcher.cost {study.searcher.cost} needs each architecture's cost")
    cost_metric = COST_METRICS.get(study.searcher.cost, "")
    return StudyOptunaSearch(
        space=space,
        metric=[METRIC, cost_metric] if multi else METRIC,
        mode=["max", "min"] if multi else "max",
        sampler=make_sampler(study),
        storage=storage,
        study_name=study_name,
        points_to_evaluate=points or None,
        costs=costs if multi else None,
    )


def unsearched_values(study: StudyConfig) -> dict[str, Any]:
    """What each searchable name is in a study that does not search it: its ``distill``/``optim``/
    ``schedule`` value. An earlier study's trial is then complete in every name a later space has."""
    losses = study.distill.losses
    return {
        "lambda_1": losses.lambda_1,
        "lambda_2": losses.lambda_2,
        "pool_size": losses.pool_size,
        "lr": study.optim.lr,
        "iterations": study.schedule.iterations,
        "teachers": study.default_combo,
        "pixel_labeled": losses.pixel_labeled,
        "pixel_unlabeled": losses.pixel_unlabeled,
        "image_level": bool(losses.image_teachers),
        "region_level": bool(losses.region_teachers),
        STUDENT_PARAM: architecture_name(study.student),
    }


class WarmStartError(ValueError):
    """An earlier study's configuration does not fit this study's search space (``searcher.warm_start``)."""


def warm_start_points(
    study: StudyConfig, earlier: list[tuple[StudyConfig, list[dict[str, Any]]]]
) -> list[dict[str, Any]]:
    """The configurations to run first: for each earlier study (its study and its best trials' params,
    best first), ``searcher.warm_start_best`` of them, as points of this study's space.

    A value the earlier study did not search is its fixed value (``unsearched_values``). A point
    outside this space (a range it leaves, a teacher pairing it lacks) is an error naming both,
    raised before any training: Optuna would otherwise warn and run a configuration the space excludes.
    """
    from mgd_ray.study.costs import architectures

    dists = optuna_distributions(study.search, list(architectures(study)))
    points: list[dict[str, Any]] = []
    for other, best in earlier:
        if not best:
            raise WarmStartError(
                f"searcher.warm_start: study {other.name!r} has no finished search trial to start from"
            )
        for params in best[: study.searcher.warm_start_best]:
            full = unsearched_values(other) | params
            point = {name: full[name] for name in dists}
            for name, dist in dists.items():
                value = point[name]
                if not _inside(dist, value):
                    raise WarmStartError(
                        f"searcher.warm_start: study {other.name!r}'s configuration {json.dumps(params, sort_keys=True)} "
                        f"has {name}={value!r}, outside search.{name} of study {study.name!r} ({_shown(dist)}); "
                        f"widen search.{name} or leave {other.name!r} out of warm_start"
                    )
            if point not in points:
                points.append(point)
    return points


def _inside(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return value in dist.choices
    try:
        return dist._contains(dist.to_internal_repr(value))
    except (TypeError, ValueError):
        return False


def _shown(dist: optuna.distributions.BaseDistribution) -> str:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return f"choices {list(dist.choices)}"
    step = f", step {dist.step}" if getattr(dist, "step", None) else ""
    return f"[{dist.low}, {dist.high}]{step}"


class SearchStorageError(RuntimeError):
    """``searcher.storage`` cannot be opened; raised before any Ray or training work starts."""


def shown_url(url: str) -> str:
    """``url`` with its password masked, fit for logs, tags and reports."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as the user wrote it, minus nothing secret
        return url.split("@", 1)[-1] if "@" in url else url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The Optuna storage at ``url``, its tables created on first use; one line naming the field when it fails."""
    kwargs = {"connect_args": {"connect_timeout": 10}} if url.startswith("postgresql") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy and its drivers raise many kinds; each ends here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SearchStorageError(
            f"searcher.storage {shown_url(url)}: cannot open it as an Optuna storage ({reason}). "
            "Check the URL, that its folder exists (sqlite) or its server answers, and that its driver "
            "is installed (psycopg2 for postgresql, pymysql for mysql); or remove searcher.storage"
        ) from err


def fresh_optuna_study(
    storage: optuna.storages.BaseStorage, name: str, attrs: dict[str, str], multi_objective: bool = False
) -> optuna.Study:
    """The Optuna study ``name``, emptied: a search that starts again (not restored from Tune's
    snapshot) must not add its trials to those of an interrupted attempt. ``attrs`` link it to MLflow.
    A multi-objective search maximises val mIoU and minimises the cost, in that order."""
    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:
        pass  # none yet
    directions = ["maximize", "minimize"] if multi_objective else ["maximize"]
    ostudy = optuna.create_study(storage=storage, study_name=name, directions=directions)
    for key, value in attrs.items():
        ostudy.set_user_attr(key, value)
    return ostudy


def fail_orphan_trials(storage: optuna.storages.BaseStorage, name: str) -> list[int]:
    """Mark FAIL the trials still RUNNING once the search has ended, and return their numbers.

    Tune tells Optuna how every trial it knows ended, so a RUNNING one was asked for just before a
    driver died and Tune's snapshot never recorded it: its MLflow run was deleted on resume
    (``drop_orphan_trial_runs``), and it would otherwise show as running for ever.
    """
    study_id = storage.get_study_id_from_name(name)
    running = storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_system_attr(trial_id, "mgd_ray.orphan", "asked just before the driver died; never ran")
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    return [t.number for t in running]


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
    settings = {
        "time_attr": "training_iteration",
        "max_t": max_t + 1,
        "grace_period": min(scheduler.grace_period, max_t),
        "reduction_factor": scheduler.reduction_factor,
    }
    if study.searcher.multi_objective:
        return PerArchitectureASHA(STUDENT_PARAM, METRIC, "max", **settings)
    return ASHAScheduler(**settings)


def optuna_study_from(
    rows: list[dict[str, Any]], space: SearchSpace, students: list[str] | None = None
) -> optuna.Study:
    """An Optuna study rebuilt from the finished trials (params + best mIoU), for Optuna's plots."""
    dists = optuna_distributions(space, students)
    ostudy = optuna.create_study(direction="maximize")
    for row in rows:
        params = {k: row["params"][k] for k in dists if k in row["params"]}
        if len(params) != len(dists) or row.get("miou") is None:
            continue
        ostudy.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(row["miou"])))
    return ostudy
