"""The study file: one validated schema from which every job of a study is derived.

A study is: a dataset + partition, named teachers (pretrained with a CPS recipe, or reused from a
checkpoint / MLflow run), a student, baselines, and a search space over the distillation settings,
explored by Optuna inside Ray Tune. ``load_study`` turns YAML into a frozen ``StudyConfig``;
``mgd-ray validate`` prints every error with its YAML path (``search.lambda_1.low: must be > 0``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from mgd_ray.config import (
    BackboneName,
    ConfigError,
    CorpusConfig,
    DataConfig,
    DistillLosses,
    DistillOn,
    ModelConfig,
    NonNegFloat,
    OptimConfig,
    PositiveFloat,
    PositiveInt,
    PretrainScheduleConfig,
    ScheduleConfig,
    Strict,
    read_yaml_mapping,
)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class FloatRange(Strict):
    """A continuous range; ``log: true`` samples log-uniformly (use it for weights spanning decades)."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if self.log and self.low <= 0:
            raise ValueError("low: must be > 0 for a log range")
        if self.low > self.high:
            raise ValueError(f"high: must be >= low ({self.low}), got {self.high}")
        return self


class IntRange(Strict):
    low: int
    high: int
    step: PositiveInt = 1

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low > self.high:
            raise ValueError(f"high: must be >= low ({self.low}), got {self.high}")
        return self


class FloatChoices(Strict):
    choices: Annotated[list[float], Field(min_length=1)]


class IntChoices(Strict):
    choices: Annotated[list[int], Field(min_length=1)]


class BoolChoices(Strict):
    choices: Annotated[list[bool], Field(min_length=1)]


class StrChoices(Strict):
    choices: Annotated[list[str], Field(min_length=1)]


class BackboneChoices(Strict):
    choices: Annotated[list[BackboneName], Field(min_length=1)]


class OutputStrideChoices(Strict):
    choices: Annotated[list[Literal[8, 16, 32]], Field(min_length=1)]


def _kind(value: Any) -> str:
    """A search parameter is a list of ``choices`` or a range (``low``/``high``): pick by its keys."""
    return "choice-list" if isinstance(value, dict) and "choices" in value else "range-spec"


FloatParam = Annotated[
    Annotated[FloatRange, Tag("range-spec")] | Annotated[FloatChoices, Tag("choice-list")], Discriminator(_kind)
]
IntParam = Annotated[
    Annotated[IntRange, Tag("range-spec")] | Annotated[IntChoices, Tag("choice-list")], Discriminator(_kind)
]


class SearchSpace(Strict):
    """What the search varies; anything left out keeps the value of ``distill``/``schedule``/``optim``.

    ``teachers`` choices are ``"A+B"`` (A feeds the image-level term, B the region-level term, both
    the pixel-level term) or ``"A"`` (one teacher for every term); names are keys of ``teachers``.

    ``student_backbone`` and ``student_output_stride`` search the student itself (the rest of it is
    ``student``'s; a ResNet's ``stem`` does not apply to MobileNetV2, which has its own). The search
    sees them as one choice, ``student``, among the architectures (``study.costs``) that pass the
    searcher's cost limits, so a configuration over a limit never trains.
    """

    lambda_1: FloatParam | None = None
    lambda_2: FloatParam | None = None
    pool_size: IntParam | None = None
    lr: FloatParam | None = None
    iterations: IntChoices | None = None
    teachers: StrChoices | None = None
    pixel_labeled: BoolChoices | None = None
    pixel_unlabeled: BoolChoices | None = None
    image_level: BoolChoices | None = None
    region_level: BoolChoices | None = None
    student_backbone: BackboneChoices | None = None
    student_output_stride: OutputStrideChoices | None = None

    @field_validator("lambda_1", "lambda_2", "lr")
    @classmethod
    def _positive(cls, value: FloatRange | FloatChoices | None, info: Any) -> Any:
        if isinstance(value, FloatRange) and value.low <= 0 and info.field_name == "lr":
            raise ValueError("low: must be > 0")
        if isinstance(value, FloatRange) and value.low < 0:
            raise ValueError("low: must be >= 0 (a loss weight)")
        if isinstance(value, FloatChoices) and any(v < 0 for v in value.choices):
            raise ValueError("choices: weights must be >= 0")
        return value

    @field_validator("pool_size", "iterations")
    @classmethod
    def _positive_int(cls, value: IntRange | IntChoices | None) -> Any:
        if isinstance(value, IntRange) and value.low < 1:
            raise ValueError("low: must be >= 1")
        if isinstance(value, IntChoices) and min(value.choices) < 1:
            raise ValueError("choices: must all be >= 1")
        return value

    def searched(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in type(self).model_fields if getattr(self, name) is not None}

    @property
    def searches_student(self) -> bool:
        return self.student_backbone is not None or self.student_output_stride is not None


class TeacherRecipe(Strict):
    """How to pretrain a teacher with CPS when no checkpoint is given (method notes, 'Teachers')."""

    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    cps_weight: NonNegFloat = 1.0
    cps_rampup: Annotated[float, Field(ge=0, le=1)] = 0.0  # 0: constant weight (paper); see jobs.cps.rampup
    ohem: bool = False


class PretrainRecipe(Strict):
    """How the backbones of ``pretrained: builtin`` models are pretrained on the built-in corpus.

    The stand-in for ImageNet weights (``mgd_ray.data.corpus``): each backbone is pretrained once
    per (backbone, stem, corpus, recipe) and found again in MLflow by every later study.
    """

    corpus: CorpusConfig = CorpusConfig()
    optim: OptimConfig = OptimConfig(optimizer="adamw", lr=0.002, scale_lr_with_world_size=False)
    schedule: PretrainScheduleConfig = PretrainScheduleConfig()


class TeacherSpec(Strict):
    """A frozen teacher: pretrained here (``recipe``), or reused (``checkpoint`` file or ``mlflow_run`` id)."""

    model: ModelConfig
    recipe: TeacherRecipe | None = None
    checkpoint: Path | None = None
    mlflow_run: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        given = [k for k in ("recipe", "checkpoint", "mlflow_run") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of recipe, checkpoint, mlflow_run (got {', '.join(given)})")
        return self

    @property
    def effective_recipe(self) -> TeacherRecipe:
        return self.recipe or TeacherRecipe()


class BaselineSpec(Strict):
    """A baseline of Table 1 run beside the search, on the study's student, schedule and data."""

    method: Literal["supervised", "mean_teacher", "cps", "kd", "cwd"]
    teacher: str | None = None
    ema_decay: Annotated[float, Field(gt=0, lt=1)] = 0.99
    consistency_weight: NonNegFloat = 1.0
    temperature: Annotated[float, Field(gt=0)] = 1.0
    distill_on: DistillOn = "labeled"  # KD/CWD: the paper's labeled images, or MGD's unlabeled ones too

    @property
    def name(self) -> str:
        name = self.method if self.teacher is None else f"{self.method}[{self.teacher}]"
        return name + ("+unlabeled" if self.distill_on == "labeled+unlabeled" else "")


class DistillDefaults(Strict):
    """The distillation every trial starts from before the search overrides it."""

    losses: DistillLosses = DistillLosses()
    teacher_mode: Literal["eval", "train"] = "eval"
    teacher_precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast teachers (GPU speed-up, inexact)
    teacher_channels_last: bool = False
    # Run the teachers once per study over the search's batch stream and let every trial read their
    # signals (``mgd_ray.teacher_cache``); trials it cannot serve (another seed) run them live.
    teacher_cache: bool = True
    # Cache only steps 1..K (default: every step of the longest trial); later steps run the teachers.
    # At paper scale a whole schedule's cache is tens to hundreds of GB (bench_step's projection),
    # while under ASHA most trials stop at its first rungs: caching those steps serves most of the
    # teacher work for a fraction of the disk.
    teacher_cache_steps: PositiveInt | None = None


STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")


class SearcherConfig(Strict):
    """``storage``: an SQLAlchemy URL (``sqlite:///optuna.db``, ``postgresql://user@host/db``) where
    the search's Optuna study is kept, trial by trial, for ``optuna-dashboard`` and for the record;
    without it the Optuna study lives only in the driver (and in Tune's snapshots, for ``--resume``)."""

    sampler: Literal["tpe", "random", "cmaes", "nsga2"] = "tpe"
    seed: int = 0
    num_samples: PositiveInt = 8
    max_concurrent: PositiveInt = 2
    storage: str | None = None
    # Earlier studies (names, or parent run ids) in the same tracking store whose best finished trials
    # the search runs first: e.g. a search at 1/8 seeded by the 1/16 study's best configurations.
    warm_start: tuple[Annotated[str, Field(min_length=1)], ...] = ()
    warm_start_best: PositiveInt = 1  # how many of each earlier study's best trials
    # A second objective beside val mIoU (max): the student's cost (min), which makes the search
    # multi-objective (Optuna's TPE or NSGA-II through Tune's OptunaSearch) and the report a Pareto
    # front. gflops and params are counted at data.crop_size; latency is the median eager-PyTorch
    # time of one crop, batch 1, on latency_device (cpu: latency_threads threads), measured once
    # per architecture and machine and cached beside the study's storage.
    cost: Literal["none", "gflops", "params", "latency"] = "none"
    latency_device: Literal["cpu", "cuda"] = "cpu"
    latency_threads: PositiveInt = 1
    # Limits on the student, applied to the architectures before the search: one over a limit never trains.
    max_gflops: PositiveFloat | None = None
    max_params_m: PositiveFloat | None = None
    max_latency_ms: PositiveFloat | None = None

    @property
    def multi_objective(self) -> bool:
        return self.cost != "none"

    @property
    def measures_latency(self) -> bool:
        return self.cost == "latency" or self.max_latency_ms is not None

    @model_validator(mode="after")
    def _multi_objective_sampler(self) -> SearcherConfig:
        if self.multi_objective and self.sampler == "cmaes":
            raise ValueError(
                f"sampler: cmaes optimises one objective, and cost: {self.cost} makes two: use tpe or nsga2"
            )
        return self

    @model_validator(mode="after")
    def _warm_start_fits(self) -> SearcherConfig:
        points = len(self.warm_start) * self.warm_start_best
        if points > self.num_samples:
            raise ValueError(
                f"warm_start: {len(self.warm_start)} studies x warm_start_best {self.warm_start_best} = {points} "
                f"configurations, more than num_samples ({self.num_samples}) trials can run"
            )
        return self

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
        if scheme not in STORAGE_SCHEMES:
            raise ValueError(
                f"must be a database URL ({', '.join(s + '://...' for s in STORAGE_SCHEMES)}), "
                f"e.g. sqlite:///optuna.db; got {url!r}"
            )
        return url


class SchedulerConfig(Strict):
    """ASHA stops weak trials at evaluation rungs (``grace_period`` evaluations, then × reduction_factor)."""

    type: Literal["asha", "none"] = "asha"
    grace_period: PositiveInt = 1
    reduction_factor: Annotated[float, Field(gt=1)] = 2.0


class Resources(Strict):
    """Per training job: DDP workers and what each reserves (fractional GPUs share a device)."""

    workers: PositiveInt = 1
    cpus_per_worker: Annotated[float, Field(gt=0)] = 1.0
    gpus_per_worker: Annotated[float, Field(ge=0)] = 0.0


class RayTrainOptions(Strict):
    """How often a Ray Train controller looks at its workers, whether it watches for preemption, and
    whether 1-worker jobs run in their Tune trial's own process.

    A controller notices a finished worker group only at a health check, so a short job waits up to
    one interval after its last step. The preemption watcher is one more actor per job; it matters
    only on clusters with spot/preemptible nodes. Ray reads both from the environment of the process
    that starts a ``TorchTrainer``, which the study sets from these fields.

    ``in_trial`` runs every job (teachers, baselines, search, repeats) of a 1-worker study in the
    Tune trial's own process: Ray Train's local mode (``ScalingConfig(num_workers=0)``, same
    ``ray.train`` API), so a job starts no controller, worker or helper actors, each a new Python
    process importing torch. The trial then reserves the worker's CPUs/GPUs itself, reports and
    checkpoints through Tune (a resumed study continues a trial from its last evaluation), and Tune
    retries a failed trial once. Needs ``resources.workers: 1``; teachers run so too unless
    ``teacher_resources`` asks for more workers. The README's Benchmarks section has the figures.
    """

    health_check_interval_s: Annotated[float, Field(gt=0)] = 2.0
    preemption_watcher: bool = True
    in_trial: bool = False

    def env_vars(self) -> dict[str, str]:
        return {
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": repr(self.health_check_interval_s),
            "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1" if self.preemption_watcher else "0",
        }


class ReportOptions(Strict):
    """What the end-of-study report adds besides its tables and figures.

    ``onnx``: log an ONNX export of the best student beside its MLflow model. torch.onnx's exporter
    (``torch.export`` with dynamic batch/height/width) is slow on a CPU, a noticeable part of a
    laptop study; ``mgd-ray export models:/<study>-student/<version>`` makes the same file later.
    """

    onnx: bool = True
    # A table study (``data.partitions``): set the paper's figures for the same methods, backbones
    # and partitions beside its cells (Table 1: voc; Table 2: voc_pseudoseg; Table 3: cityscapes).
    paper: Literal["voc", "voc_pseudoseg", "cityscapes"] | None = None


class MlflowConfig(Strict):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None


class StudyConfig(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str = ""
    gpu_budget: str | None = None  # what the study expects, in words ("8 x A100, ~2 days")
    data: DataConfig = DataConfig()
    teachers: dict[str, TeacherSpec]
    student: ModelConfig = ModelConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    optim: OptimConfig = OptimConfig()
    distill: DistillDefaults = DistillDefaults()
    search: SearchSpace = SearchSpace()
    searcher: SearcherConfig = SearcherConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    baselines: tuple[BaselineSpec, ...] = ()
    seeds: Annotated[tuple[int, ...], Field(min_length=1)] = (0,)
    resources: Resources = Resources()
    teacher_resources: Resources | None = None
    pretrain: PretrainRecipe = PretrainRecipe()  # for the models with ``pretrained: builtin``
    ray_train: RayTrainOptions = RayTrainOptions()
    report: ReportOptions = ReportOptions()
    mlflow: MlflowConfig = MlflowConfig()
    storage_path: str = "mgd_ray_runs"

    @field_validator("teachers")
    @classmethod
    def _teacher_names(cls, value: dict[str, TeacherSpec]) -> dict[str, TeacherSpec]:
        if not value:
            raise ValueError("define at least one teacher")
        for name in value:
            if "+" in name or not name.strip():
                raise ValueError(f"teacher name {name!r} may not be empty or contain '+'")
        return value

    @model_validator(mode="after")
    def _references(self) -> StudyConfig:
        names = set(self.teachers)
        errors = []
        losses = self.distill.losses
        for field in ("pixel_teachers", "image_teachers", "region_teachers"):
            for t in getattr(losses, field) or ():
                if t not in names:
                    errors.append(f"distill.losses.{field}: teacher {t!r} is not defined under teachers")
        if self.search.teachers:
            for combo in self.search.teachers.choices:
                for t in combo.split("+"):
                    if t not in names:
                        errors.append(f"search.teachers: {combo!r} names teacher {t!r}, not defined under teachers")
                if len(combo.split("+")) > 2:
                    errors.append(f"search.teachers: {combo!r} has more than two teachers")
        for i, b in enumerate(self.baselines):
            if b.method in ("kd", "cwd") and b.teacher is None:
                errors.append(f"baselines.{i}.teacher: {b.method} needs a teacher (one of {', '.join(self.teachers)})")
            if b.teacher is not None and b.teacher not in names:
                errors.append(f"baselines.{i}.teacher: {b.teacher!r} is not defined under teachers")
            if b.distill_on != "labeled" and b.method not in ("kd", "cwd"):
                errors.append(f"baselines.{i}.distill_on: only kd and cwd distil from a teacher, so remove it")
        names_seen = [b.name for b in self.baselines]
        for name in sorted({n for n in names_seen if names_seen.count(n) > 1}):
            errors.append(f"baselines: {name} is listed twice (give each baseline once)")
        if self.report.paper and not self.data.partitions:
            errors.append("report.paper: sets the paper's figures beside a table study's cells; add data.partitions")
        if self.searcher.multi_objective and not self.search.searches_student:
            errors.append(
                f"searcher.cost: {self.searcher.cost} is a second objective only when the search varies the student; "
                "add search.student_backbone or search.student_output_stride, or set cost: none"
            )
        if self.search.searches_student and self.student.layout == "official":
            errors.append(
                "search.student_backbone: the student has layout: official (one MobileNetV2 at output stride 32), "
                "so it cannot be searched; set student.layout: default"
            )
        if self.searcher.warm_start and not self.search.searched():
            errors.append(
                "searcher.warm_start: the study searches nothing (search is empty), so there is nothing to seed"
            )
        if self.ray_train.in_trial and self.resources.workers != 1:
            errors.append(
                f"ray_train.in_trial: runs a job in the trial's own process, which needs resources.workers: 1 "
                f"(it is {self.resources.workers}); set in_trial: false for DDP jobs"
            )
        if self.scheduler.type == "asha":
            evals = self.schedule.iterations // self.schedule.eval_every
            if evals < 2:
                errors.append(
                    "scheduler.type: ASHA needs at least two evaluations per trial "
                    f"(schedule.iterations / schedule.eval_every = {evals}); lower eval_every or use type: none"
                )
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @property
    def experiment(self) -> str:
        return self.mlflow.experiment or self.name

    @property
    def default_combo(self) -> str:
        """The teacher assignment of ``distill.losses`` in the ``"A+B"`` notation of the search space."""
        losses = self.distill.losses
        image = losses.image_teachers[0] if losses.image_teachers else None
        region = losses.region_teachers[0] if losses.region_teachers else None
        parts = [p for p in (image, region) if p is not None]
        if len(parts) == 2 and parts[0] == parts[1]:
            parts = parts[:1]
        return "+".join(parts) or next(iter(self.teachers))


_SUBFIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*): (.*)$")


def format_study_errors(err: ValidationError, source: str) -> str:
    """One line per error as ``yaml.path: message``.

    Union tags and validator names are dropped from the path, a validator's ``"low: ..."`` message
    is folded into it, and model-level checks that found several problems get a line each.
    """
    lines = [f"{source}: invalid study"]
    for e in err.errors():
        loc = [
            str(p) for p in e["loc"] if p not in ("range-spec", "choice-list") and not str(p).startswith("function-")
        ]
        msg = e["msg"].removeprefix("Value error, ")
        for part in msg.split("; "):
            m = _SUBFIELD.match(part)
            if m and loc:
                lines.append(f"  {'.'.join(loc)}.{m.group(1)}: {m.group(2)}")
            elif m:
                lines.append(f"  {part}")
            else:
                lines.append(f"  {'.'.join(loc) or '(top level)'}: {part}")
    return "\n".join(lines)


def parse_study(raw: dict[str, Any], source: str = "<study>") -> StudyConfig:
    try:
        return StudyConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_study_errors(err, source)) from None


def load_study(path: Path | str) -> StudyConfig:
    return parse_study(read_yaml_mapping(path, "study file"), str(path))
