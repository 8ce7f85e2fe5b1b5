"""Typed, validated configuration of every job: the only place configuration is read.

A YAML file becomes one of the ``*JobConfig`` models below; defaults live here, once. Validation
errors are reported with their YAML path (``schedule.iterations: must be > 0``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

PositiveInt = Annotated[int, Field(gt=0)]
Share = Annotated[float, Field(gt=0, lt=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]

BackboneName = Literal["resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2", "mobilenet_v2"]


class Strict(BaseModel):
    """Base: unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class BuiltinData(Strict):
    """Size of the generated dataset (see ``mgd_ray.data.builtin``)."""

    num_train: PositiveInt = 256
    num_val: PositiveInt = 64
    num_test: Annotated[int, Field(ge=0)] = 0  # images only a study's final evaluation reads
    size: PositiveInt = 96
    num_classes: Annotated[int, Field(ge=2)] = 6


class DataConfig(Strict):
    """Which images a job trains on, which keep their labels, and which it evaluates on.

    ``partition`` is the share of the training images that keep their labels: VOC's and
    Cityscapes' 1/16..1/2 are the shipped lists (the paper's protocol); any other fraction
    (``1/64``, ``0.03``), or ``all`` for the built-in and folder datasets, is drawn by
    ``partition_seed`` (class-covering). ``labeled: N`` asks for a count instead and
    ``labeled_list`` names the labeled images; ``unlabeled`` adds unlabeled images (folders, or lists
    of image paths under root). A folder dataset names its val and test images (id lists) or the
    shares of its labeled images carved for them (seeded by ``split_seed``, so they stay put when
    ``partition_seed`` moves). VOC and Cityscapes report on their official val set; ``selection``
    holds out that many (or that share of the) unlabeled training images, whose labels the dataset
    has, as the val set that search, ASHA and checkpoints use, and the official val set becomes the
    test set that only the final evaluation reads.
    """

    dataset: Literal["builtin", "voc", "cityscapes", "folder"] = "builtin"
    root: Path = Path("data/builtin")
    partition: str = "1/16"  # a folder dataset's default is "all": every mask it has
    # A study only: one study per partition, and one table of them (``mgd_ray.study.table``).
    partitions: tuple[str, ...] = ()
    labeled: PositiveInt | None = None
    labeled_list: Path | None = None
    val: Path | Share | None = None  # folder: default 0.2 of the labeled images
    test: Path | Share | None = None  # folder: default none
    unlabeled: tuple[Path, ...] = ()  # folders of images, or lists of image paths relative to root
    selection: PositiveInt | Share | None = None  # voc / cityscapes: unlabeled training images held out as val
    split_seed: int = 0
    protocol: Literal["classic", "pseudoseg"] = "classic"
    partition_seed: int = 0
    builtin: BuiltinData = BuiltinData()
    crop_size: PositiveInt = 64
    scales: tuple[PositiveFloat, ...] = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)
    eval_window: PositiveInt | None = None
    manifest: Path | None = None  # a prepared manifest; set by the driver so workers only read it
    loader_workers: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="before")
    @classmethod
    def _folder_keeps_every_label(cls, data: Any) -> Any:
        if (
            not isinstance(data, dict)
            or data.get("dataset") != "folder"
            or "partition" in data
            or data.get("partitions")
        ):
            return data
        if data.get("labeled") is None and data.get("labeled_list") is None:
            return {**data, "partition": "all"}
        return data

    @field_validator("partition")
    @classmethod
    def _known_partition(cls, value: str) -> str:
        return normal_partition(value)

    @field_validator("partitions")
    @classmethod
    def _known_partitions(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(normal_partition(v) for v in values)
        twice = sorted({v for v in out if out.count(v) > 1})
        if twice:
            raise ValueError(f"lists {', '.join(twice)} more than once")
        return out

    @model_validator(mode="after")
    def _options_of_the_dataset(self) -> DataConfig:
        errors = []
        if self.labeled is not None and self.labeled_list is not None:
            errors.append("labeled: give a count or a labeled_list, not both")
        if (self.labeled is not None or self.labeled_list is not None) and "partition" in self.model_fields_set:
            errors.append("partition: give a partition or a labeled count/list, not both")
        if self.partitions and ({"partition", "labeled", "labeled_list"} & self.model_fields_set):
            errors.append(
                "partitions: give partitions (one study each) or one partition/labeled/labeled_list, not both"
            )

        def given(*names: str) -> list[str]:
            return [f for f in names if f in self.model_fields_set and getattr(self, f) not in (None, ())]

        if self.dataset in ("voc", "cityscapes"):
            if self.partition == "all" or "all" in self.partitions:
                errors.append(
                    f"partition: {self.dataset} keeps a share of its labels: 1/16..1/2 (shipped) or any fraction"
                )
            errors += [
                f"{f}: {self.dataset} evaluates on its official val set; to search on other images than it reports "
                "on, hold out a selection set from the training images (selection: N or a share)"
                for f in given("val", "test")
            ]
        else:
            errors += [
                f"selection: applies to voc and cityscapes; {self.dataset} has val and test" for f in given("selection")
            ]
            if self.dataset == "builtin":
                errors += [
                    f"{f}: applies to folder, voc and cityscapes datasets; the built-in dataset generates its own splits"
                    for f in given("labeled_list", "unlabeled")
                ] + [
                    f"{f}: applies to folder datasets; the built-in dataset generates its own splits"
                    for f in given("val", "test")
                ]
        if errors:
            raise ValueError("; ".join(errors))
        return self


def normal_partition(value: str) -> str:
    """``" 1-16 "`` → ``"1/16"``; a fraction in (0, 1] or ``all``, else a ValueError saying so."""
    value = value.strip()
    ratio = re.fullmatch(r"(\d+)\s*[/-]\s*(\d+)", value)
    value = f"{ratio[1]}/{ratio[2]}" if ratio else value
    if value != "all" and labeled_share(value) is None:
        raise ValueError(f"must be a fraction in (0, 1] such as 1/16 or 0.03, or all (got {value!r})")
    return value


def labeled_share(text: str) -> float | None:
    """``"1/16"``, ``"1-16"`` or ``"0.0625"`` → 0.0625; None unless it is a fraction in (0, 1]."""
    ratio = re.fullmatch(r"(\d+)\s*[/-]\s*(\d+)", text)
    try:
        value = int(ratio[1]) / int(ratio[2]) if ratio else float(text)
    except (ValueError, ZeroDivisionError):
        return None
    return value if 0 < value <= 1 else None


class ModelConfig(Strict):
    backbone: BackboneName = "resnet18"
    output_stride: Literal[8, 16, 32] = 16
    pretrained: str | None = None
    stem: Literal["plain", "deep"] = "plain"
    # official: the authors' MobileNetV2 DeepLabv3+ (exp.*/*mobilev2_deeplabv3plus/network.py): output
    # stride 32 with features[15:18] dilated 2/4/8, ASPP rates 6/12/18 and a 24-channel low-level
    # projection. default: mgd_ray's layout, whose ASPP rates scale with the output stride (3/6/9 at
    # 32) and whose low-level projection has 48 channels (the official ResNet heads' layout).
    layout: Literal["default", "official"] = "default"

    @model_validator(mode="after")
    def _official_layout(self) -> ModelConfig:
        if self.layout == "official" and (self.backbone != "mobilenet_v2" or self.output_stride != 32):
            raise ValueError(
                "layout: official is the authors' MobileNetV2 head, at output stride 32: set backbone: mobilenet_v2 "
                f"and output_stride: 32 (got {self.backbone} at {self.output_stride}), or layout: default "
                "(the ResNet teachers' and students' default layout already is the official one)"
            )
        return self


class OptimConfig(Strict):
    """SGD + poly LR as in the official code (method notes).

    ``optimizer: adamw`` (β = 0.9, 0.999, decoupled weight decay, same poly schedule) is for
    backbones trained from scratch, where SGD at the paper's LR barely moves in a few hundred steps
    (the built-in quickstart has no ImageNet weights to start from); ``momentum`` is then unused.
    """

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: PositiveFloat = 0.01
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: NonNegFloat = 1e-4
    poly_power: PositiveFloat = 0.9
    scale_lr_with_world_size: bool = True
    # official: conv/linear weights decay, biases and BatchNorm/GroupNorm parameters do not (the
    # authors' group_weight; the paper studies). all: one group, every parameter decays (the
    # default, with which the quickstart's figures were measured).
    weight_decay_groups: Literal["official", "all"] = "all"
    # How a step of W workers scales (method notes, "Gradient scale with W GPUs"). global_batch: the
    # gradient of the loss over the global batch. official: the authors' code, each rank's loss over
    # its own batch (CE means, the image-level sum) all-reduced and divided by W; autograd does not
    # see the all-reduce, so the step follows the mean gradient / W while weight decay acts at the
    # full lr. Both are the same on one worker; paper studies use official.
    step_rule: Literal["global_batch", "official"] = "global_batch"
    # The arithmetic of a training step's forward and backward. bf16: torch.autocast to bfloat16 on
    # CPU or CUDA (convolutions and matmuls), with fp32 master weights and optimiser state and every
    # loss computed in fp32 (``losses.fp32``); about 2x where the device has bf16 units (AMX or
    # AVX512-BF16 CPUs, CUDA compute capability >= 8.0), slower than fp32 where it has none.
    precision: Literal["fp32", "bf16"] = "fp32"


class ScheduleConfig(Strict):
    iterations: PositiveInt = 200
    batch_labeled: PositiveInt = 2
    batch_unlabeled: PositiveInt = 2
    eval_every: PositiveInt = 50
    eval_batch: PositiveInt = 8
    seed: int = 0
    # The two unlabeled batches CutMix mixes. independent: two streams of their own. shared_order: the
    # official loaders' quirk (one sampler seed): u0 and u1 draw the same images in the same order, each
    # with its own augmentation, so CutMix mostly mixes two views of one image.
    unlabeled_draw: Literal["independent", "shared_order"] = "independent"


class CheckpointRef(Strict):
    """A frozen teacher: the architecture it must have and the checkpoint file holding it."""

    model: ModelConfig
    checkpoint: Path


class DistillLosses(Strict):
    """Switches and weights of Eq. 7. Teacher names refer to keys of ``DistillJobConfig.teachers``."""

    supervised: bool = True
    pixel_labeled: bool = True
    pixel_unlabeled: bool = True
    pixel_teachers: tuple[str, ...] | None = None
    image_teachers: tuple[str, ...] = ("T_D",)
    region_teachers: tuple[str, ...] = ("T_W",)
    lambda_1: NonNegFloat = 0.002
    lambda_2: NonNegFloat = 100.0
    pool_size: PositiveInt = 7
    image_reduction: Literal["sum", "mean"] = "sum"
    ohem: bool = False


class TeacherJobConfig(Strict):
    """CPS pretraining of one architecture; branch 1 (the better one by val mIoU) is the teacher."""

    kind: Literal["teacher"] = "teacher"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig(backbone="resnet50")
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    cps_weight: NonNegFloat = 1.0
    cps_rampup: Annotated[float, Field(ge=0, le=1)] = 0.0  # fraction of iterations the CPS weight ramps up over
    ohem: bool = False
    output: Path = Path("mgd_ray_runs/teacher")


class DistillJobConfig(Strict):
    kind: Literal["student"] = "student"
    data: DataConfig = DataConfig()
    student: ModelConfig = ModelConfig()
    teachers: dict[str, CheckpointRef]
    teacher_mode: Literal["eval", "train"] = "eval"
    # How the frozen teachers execute (``mgd_ray.teachers.FrozenTeacher``): bf16 autocast and
    # channels_last speed them up on GPUs with tensor cores; bf16 changes their outputs slightly.
    teacher_precision: Literal["fp32", "bf16"] = "fp32"
    teacher_channels_last: bool = False
    losses: DistillLosses = DistillLosses()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    output: Path = Path("mgd_ray_runs/student")
    # A teacher-signal cache directory (``mgd_ray.teacher_cache.build.build_cache``): when its key matches
    # this job (data, seed, batch sizes, crop/scales, teachers, world size) and it holds the signals
    # and pool size the losses need, steps read the teachers' signals from it instead of running
    # them; otherwise the job runs its teachers and logs why.
    teacher_cache: Path | None = None

    @model_validator(mode="after")
    def _teachers_exist(self) -> DistillJobConfig:
        if not 1 <= len(self.teachers) <= 2:
            raise ValueError(f"teachers: give one or two teachers, got {len(self.teachers)}")
        for field in ("pixel_teachers", "image_teachers", "region_teachers"):
            for name in getattr(self.losses, field) or ():
                if name not in self.teachers:
                    raise ValueError(
                        f"losses.{field}: teacher {name!r} is not defined under teachers "
                        f"(defined: {', '.join(self.teachers)})"
                    )
        return self


DistillOn = Literal["labeled", "labeled+unlabeled"]


class BaselineJobConfig(Strict):
    """Baselines of the paper's Table 1 on the same runner as MGD."""

    kind: Literal["baseline"] = "baseline"
    method: Literal["supervised", "mean_teacher", "cps", "kd", "cwd"] = "supervised"
    data: DataConfig = DataConfig()
    student: ModelConfig = ModelConfig()
    teacher: CheckpointRef | None = None
    ema_decay: Annotated[float, Field(gt=0, lt=1)] = 0.99
    consistency_weight: NonNegFloat = 1.0  # MT consistency, CPS weight, KD/CWD weight
    temperature: PositiveFloat = 1.0  # KD temperature; CWD's tau (the CWD paper uses 4)
    # Which images KD and CWD distil on. The paper's baselines take the labeled ones only ("designed
    # for labeled data", Sec. 1, 3.3); "labeled+unlabeled" adds MGD's CutMix-ed unlabeled images.
    distill_on: DistillOn = "labeled"
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    output: Path = Path("mgd_ray_runs/baseline")

    @property
    def draws_unlabeled(self) -> bool:
        """Whether the job's loop draws unlabeled batches (u0, u1 and a CutMix mask) at all."""
        if self.method in ("kd", "cwd"):
            return self.distill_on == "labeled+unlabeled"
        return self.method != "supervised"

    @model_validator(mode="after")
    def _teacher_when_needed(self) -> BaselineJobConfig:
        if self.method in ("kd", "cwd") and self.teacher is None:
            raise ValueError(f"teacher: method {self.method!r} distills from a teacher; give teacher.checkpoint")
        if self.method not in ("kd", "cwd") and self.distill_on != "labeled":
            raise ValueError(f"distill_on: only kd and cwd distil from a teacher, so remove it from {self.method!r}")
        return self


class CorpusConfig(Strict):
    """The built-in pretraining corpus (``mgd_ray.data.corpus``): its own seed, size and classes."""

    seed: int = 1000
    num_images: PositiveInt = 3000
    num_val: PositiveInt = 300
    size: Annotated[int, Field(ge=32)] = 32
    num_classes: Annotated[int, Field(ge=2, le=6)] = 6

    @model_validator(mode="after")
    def _some_images_train(self) -> CorpusConfig:
        if self.num_val >= self.num_images:
            raise ValueError(
                f"num_val: {self.num_val} held out leaves none of the {self.num_images} images to train on"
            )
        return self


class PretrainScheduleConfig(Strict):
    iterations: PositiveInt = 600
    batch: PositiveInt = 64  # images per step over all workers
    eval_every: PositiveInt = 200
    seed: int = 0


class PretrainJobConfig(Strict):
    """A backbone pretrained on the built-in corpus: the stand-in for ImageNet weights (``pretrained:``)."""

    kind: Literal["pretrain"] = "pretrain"
    corpus: CorpusConfig = CorpusConfig()
    model: ModelConfig = ModelConfig()
    # The batch is global (split over workers), so the LR does not grow with them.
    optim: OptimConfig = OptimConfig(optimizer="adamw", lr=0.002, scale_lr_with_world_size=False)
    schedule: PretrainScheduleConfig = PretrainScheduleConfig()
    cache: Path = Path("data/corpus")  # the generated corpus is kept here for later jobs
    output: Path = Path("mgd_ray_runs/pretrain")


JobConfig = TeacherJobConfig | DistillJobConfig | BaselineJobConfig | PretrainJobConfig
JOB_TYPES: dict[str, type[Strict]] = {
    "teacher": TeacherJobConfig,
    "student": DistillJobConfig,
    "baseline": BaselineJobConfig,
    "pretrain": PretrainJobConfig,
}


class ConfigError(ValueError):
    """A configuration file that does not validate; the message lists every error with its path."""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def parse_job_config(kind: str, raw: dict[str, Any], source: str = "<config>") -> JobConfig:
    if kind not in JOB_TYPES:
        raise ConfigError(f"{source}: unknown job kind {kind!r}; use one of {', '.join(JOB_TYPES)}")
    raw = dict(raw)
    raw.setdefault("kind", kind)
    try:
        return JOB_TYPES[kind].model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_yaml_mapping(path: Path | str, what: str = "config file") -> dict[str, Any]:
    """The top-level mapping of a YAML file, or a ``ConfigError`` naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return raw


def load_job_config(path: Path | str, kind: str) -> JobConfig:
    return parse_job_config(kind, read_yaml_mapping(path), str(path))


def absolute_paths(cfg: Strict, base: Path) -> Strict:
    """A copy of ``cfg`` whose relative paths are resolved against ``base``.

    Ray workers may start in another directory than the driver, so paths travel absolute.
    """

    def fix(value: Any) -> Any:
        if isinstance(value, Path):
            return value if value.is_absolute() else (base / value).resolve()
        if isinstance(value, Strict):
            return absolute_paths(value, base)
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return tuple(fix(v) for v in value)
        return value

    return cfg.model_copy(update={name: fix(getattr(cfg, name)) for name in type(cfg).model_fields})


def absolute_sqlite_url(url: str, base: Path) -> str:
    """``sqlite:///x.db`` relative to ``base`` made absolute (``sqlite:////abs/x.db``), so that every
    process that opens it, wherever it starts, opens the same file; other URLs are returned as they are."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        return "sqlite:///" + str((base / url.removeprefix("sqlite:///")).resolve())
    return url
