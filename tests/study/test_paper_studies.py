"""Every study file dry-runs: the jobs it would start are built from it and trained for a few steps.

``tests/study/test_study_config.py`` checks that every ``studies/*.yaml`` validates. Here each study is shrunk
by ``smoke`` (tiny built-in data, resnet18 instead of the big backbones) and every job it would start
is built with the driver's own functions (``teacher_job``, ``baseline_job``, ``distill_job``): each
teacher, each baseline (first seed) and distillation trials that together use every choice of every
categorical search parameter and both ends of every range. Jobs run in-process through the plain job
functions, with a reporter that records their evaluations; teachers are really trained (CPS) and their
exported checkpoints feed the students. No Ray, no MLflow: the ``Plan`` carries dummy tracking ids.

The studies start about a hundred jobs between them, most of them repeats of one another at smoke
scale, so a job runs only if it exercises something no job run before did (``features``: its kind
and method, each network it builds and in which role, every loss switch), and every study runs at
least one job of its own (its last trial: the high end of its ranges). The others are still built (so validated against the job
schema), and a job identical to one already run reuses its result.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from mgd_ray.config import (
    BaselineJobConfig,
    DistillJobConfig,
    JobConfig,
    ModelConfig,
    TeacherJobConfig,
)
from mgd_ray.jobs.baselines import run_baseline
from mgd_ray.jobs.cps import run_teacher
from mgd_ray.jobs.distill import run_distill
from mgd_ray.study.config import FloatRange, IntRange, StudyConfig, load_study
from mgd_ray.study.plan import Plan, baseline_job, distill_job, teacher_job
from mgd_ray.study.search import make_sampler, optuna_distributions
from mgd_ray.study.smoke import smoke

STUDIES = sorted((Path(__file__).parents[2] / "studies").glob("*.yaml"))
PAPER_STUDIES = [p for p in STUDIES if p.stem.startswith("paper_")]
# Smoke's schedule (4 iterations, evaluation every 2) cut to one evaluation after 2 steps.
TINY = {"iterations": 2, "eval_every": 2}


def arch(model: ModelConfig) -> str:
    return f"{model.backbone}/{model.stem}/os{model.output_stride}"


def features(cfg: JobConfig) -> set[tuple[Any, ...]]:
    """What running ``cfg`` exercises beyond numbers (learning rates, loss weights, pool size, partition, seed)."""
    if isinstance(cfg, TeacherJobConfig):
        return {("teacher", arch(cfg.model), cfg.ohem)}
    if isinstance(cfg, BaselineJobConfig):
        out = {("baseline", cfg.method), ("baseline", "student", arch(cfg.student))}
        if cfg.teacher is not None:
            out.add(("baseline", cfg.method, "teacher", arch(cfg.teacher.model)))
        return out
    assert isinstance(cfg, DistillJobConfig)
    lc = cfg.losses
    archs = {name: arch(ref.model) for name, ref in cfg.teachers.items()}
    pixel = lc.pixel_teachers if lc.pixel_teachers is not None else tuple(cfg.teachers)
    roles = tuple(tuple((n, archs[n]) for n in names) for names in (pixel, lc.image_teachers, lc.region_teachers))
    return {
        ("distill", "student", arch(cfg.student), lc.ohem),
        ("distill", "teachers", roles),
        ("distill", "teacher_mode", cfg.teacher_mode),
        ("distill", "image_reduction", lc.image_reduction),
        *(("distill", switch, getattr(lc, switch)) for switch in ("supervised", "pixel_labeled", "pixel_unlabeled")),
    }


class JobRunner:
    """Runs the jobs the studies build, skipping those that would exercise nothing new (module docstring)."""

    def __init__(self, root: Path):
        self.root = root
        self.results: dict[str, tuple[dict[str, float], Path]] = {}  # exact config -> (metrics, model file)
        self.covered: set[tuple[Any, ...]] = set()
        self.teacher_models: dict[str, Path] = {}  # architecture -> a trained teacher's model file
        self.ran: list[str] = []

    @staticmethod
    def key(cfg: JobConfig) -> str:
        blob = json.dumps(cfg.model_dump(mode="json", exclude={"output"}), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def needed(self, cfg: JobConfig) -> bool:
        return self.key(cfg) not in self.results and not features(cfg) <= self.covered

    def run(self, cfg: JobConfig, fn: Callable[..., Any], what: str) -> tuple[dict[str, float], Path]:
        """Run ``cfg`` (unless an identical job ran) and check what it reported."""
        key = self.key(cfg)
        if key not in self.results:
            reports: list[tuple[dict[str, float], Path | None]] = []
            fn(cfg, lambda metrics, ckpt: reports.append((dict(metrics), ckpt)), self.root / key, None)
            assert reports, f"{what}: reported nothing"
            metrics, ckpt = reports[-1]
            assert ckpt is not None and (ckpt / "model.pt").is_file(), f"{what}: no model exported"
            assert math.isfinite(metrics["loss/total"]), f"{what}: loss/total = {metrics['loss/total']}"
            assert 0.0 <= metrics["val/mIoU"] <= 1.0, f"{what}: val/mIoU = {metrics['val/mIoU']}"
            self.results[key] = (metrics, ckpt / "model.pt")
            self.covered |= features(cfg)
            self.ran.append(what)
        return self.results[key]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two busy cores run several times slower than one
    with pytest.MonkeyPatch.context() as mp:
        # The resume state (model + optimiser) is not under test here and is the largest file a job
        # writes; the exported model.pt, which students load their teachers from, is still written.
        mp.setattr(
            "mgd_ray.jobs.loop.save_state", lambda directory, state: directory.mkdir(parents=True, exist_ok=True)
        )
        yield JobRunner(tmp_path_factory.mktemp("jobs"))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """One storage path for all studies: smoke puts its data under it, so they share the tiny dataset."""
    return tmp_path_factory.mktemp("storage")


def smoke_study(path: Path, storage: Path) -> StudyConfig:
    """``smoke`` of the study with its data under ``storage``, every schedule cut to ``TINY``."""
    study = smoke(load_study(path).model_copy(update={"storage_path": str(storage)}))
    tiny = study.schedule.model_copy(update=TINY)
    teachers = {
        name: spec.model_copy(update={"recipe": spec.effective_recipe.model_copy(update={"schedule": tiny})})
        for name, spec in study.teachers.items()
    }
    return study.model_copy(update={"schedule": tiny, "teachers": teachers})


def search_values(spec: Any) -> list[Any]:
    """The values a dry run tries: every choice, or both ends of a range."""
    if isinstance(spec, FloatRange):
        return [spec.low, spec.high]
    if isinstance(spec, IntRange):
        return [spec.low, spec.low + (spec.high - spec.low) // spec.step * spec.step]
    return list(spec.choices)


def covering_params(study: StudyConfig) -> list[dict[str, Any]]:
    """Few trial configurations that together use every value of every searched parameter."""
    values = {name: search_values(spec) for name, spec in study.search.searched().items()}
    n = max((len(v) for v in values.values()), default=1)
    return [{name: vals[i % len(vals)] for name, vals in values.items()} for i in range(n)]


def test_covering_params_use_every_value():
    study = load_study(Path(__file__).parents[2] / "studies" / "search_open.yaml")
    trials = covering_params(study)
    assert len(trials) == 4  # the four teacher pairs; lambda and pool ranges at both ends
    assert {t["pool_size"] for t in trials} == {3, 11}
    assert {t["lambda_1"] for t in trials} == {study.search.lambda_1.low, study.search.lambda_1.high}
    assert {t["teachers"] for t in trials} == set(study.search.teachers.choices)


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_every_job_of_the_study_runs(path, runner, storage):
    study = smoke_study(path, storage)
    plan = Plan(study, storage / "plans" / study.name, "file:///nonexistent/mlruns", "0", "dummy-parent-run")
    before = len(runner.ran)

    for name in study.teachers:
        cfg = teacher_job(plan, name)
        if runner.needed(cfg):
            _, model = runner.run(cfg, run_teacher, f"{study.name}: teacher {name}")
            runner.teacher_models.setdefault(arch(cfg.model), model)
        # A teacher not needed is one of an architecture already trained: students load that one.
        plan.teachers[name] = runner.teacher_models[arch(cfg.model)]

    seed = study.seeds[0]
    jobs: list[tuple[JobConfig, Callable[..., Any], str]] = []
    for i, b in enumerate(study.baselines):
        jobs.append((baseline_job(plan, i, seed, plan.root / "baselines" / b.name), run_baseline, f"baseline {b.name}"))
    trials = covering_params(study)
    for i, params in enumerate(trials):
        cfg = distill_job(plan, params, seed, plan.root / "trials" / str(i))
        jobs.append((cfg, run_distill, f"trial {params}"))
        # A trial distils from exactly the teachers its parameters name, with the terms they switch on.
        if "teachers" in params:
            assert set(cfg.teachers) == set(params["teachers"].split("+"))
        if params.get("image_level") is False:
            assert cfg.losses.image_teachers == ()
        if params.get("region_level") is False:
            assert cfg.losses.region_teachers == ()
    for name, spec in study.search.searched().items():
        assert {t[name] for t in trials} >= set(search_values(spec)), name

    for cfg, fn, what in jobs:
        if runner.needed(cfg):
            runner.run(cfg, fn, f"{study.name}: {what}")
    if len(runner.ran) == before and not any(runner.key(cfg) in runner.results for cfg, _, _ in jobs):
        cfg, fn, what = jobs[-1]  # nothing new at smoke scale: the study still runs one job of its own
        runner.run(cfg, fn, f"{study.name}: {what}")


@pytest.mark.parametrize("path", PAPER_STUDIES, ids=[p.stem for p in PAPER_STUDIES])
def test_paper_study_states_its_table_and_budget(path):
    study = load_study(path)
    assert "Table" in study.description, "description: cite the paper's table"
    assert study.gpu_budget and "GPU" in study.gpu_budget, "gpu_budget: state the GPUs the study expects"
    assert study.data.dataset in ("voc", "cityscapes")
    assert len(study.seeds) == 3


def sampled_rows(study: StudyConfig) -> list[tuple[Any, ...]]:
    """The parameters the study's Optuna sampler gives its trials, in order, asked as OptunaSearch asks."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = optuna_distributions(study.search)
    ostudy = optuna.create_study(direction="maximize", sampler=make_sampler(study))
    rows = []
    for _ in range(study.searcher.num_samples):
        trial = ostudy.ask(fixed_distributions=dists)
        rows.append(tuple(trial.params[k] for k in dists))
        ostudy.tell(trial, 0.0)
    return rows


@pytest.mark.parametrize("path", PAPER_STUDIES, ids=[p.stem for p in PAPER_STUDIES])
def test_paper_table_search_runs_every_row_once(path):
    """A table's search is a grid: its seeded random sampler draws each combination exactly once."""
    study = load_study(path)
    searched = study.search.searched()
    if not searched:
        assert study.searcher.num_samples == 1  # the default configuration, then its repeats on the seeds
        return
    assert all(not isinstance(s, FloatRange | IntRange) for s in searched.values()), "table rows are choices"
    assert study.scheduler.type == "none", "every row of a table runs its whole schedule"
    grid = set(itertools.product(*(spec.choices for spec in searched.values())))
    rows = sampled_rows(study)
    assert len(rows) == len(grid) and set(rows) == grid, (
        f"searcher.seed {study.searcher.seed} does not draw every combination once in "
        f"num_samples {study.searcher.num_samples} trials: {rows}"
    )
