"""A study's plan: every job it runs, derived from the study file alone (no Ray, no training).

``Plan`` holds what the driver resolved (absolute paths, MLflow ids, teacher checkpoints); the
job builders turn it and a trial's parameters into the typed job configs the Ray Train jobs run,
and ``trial_job`` names the MLflow run each trial writes to, so a resumed study finds it again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mgd_ray import tracking
from mgd_ray.config import (
    BaselineJobConfig,
    CheckpointRef,
    DistillJobConfig,
    JobConfig,
    ModelConfig,
    PretrainJobConfig,
    TeacherJobConfig,
)
from mgd_ray.study.config import Resources, StudyConfig
from mgd_ray.study.costs import STUDENT_PARAM, Cost, architectures, student_model

# A trial's own process only drives its Train job; its workers hold the CPUs/GPUs. Tune refuses an
# empty reservation, so the driver reserves 1 MiB of memory and no CPU (concurrency: max_concurrent).
DRIVER_RESOURCES = {"cpu": 0, "memory": 2**20}
ROLE_FIELDS = ("labeled", "labeled_list", "val", "test", "unlabeled", "selection", "split_seed")
BUILTIN_WEIGHTS = "builtin"  # ``pretrained: builtin``: the backbone pretrained on the built-in corpus


@dataclass
class Plan:
    """Everything a trial needs, resolved by the driver: absolute paths, MLflow ids, teacher files."""

    study: StudyConfig
    root: Path  # <storage>/<study name>/<instance>
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    teachers: dict[str, Path] = field(default_factory=dict)
    teacher_cache: Path | None = None  # set by stage_cache when the study caches teacher signals
    teacher_examples: Path | None = None  # the teachers' example predictions (``write_teacher_examples``)
    pretrained: dict[str, Path] = field(default_factory=dict)  # pretrain key → backbone.pt (``stage_pretrain``)
    warm_start: list[dict[str, Any]] = field(default_factory=list)  # points the search runs first
    warm_start_runs: dict[str, str] = field(default_factory=dict)  # searcher.warm_start entry → its parent run id
    costs: dict[str, Cost] = field(default_factory=dict)  # student architecture → its cost (``study.costs``)
    students: list[str] = field(default_factory=list)  # the architectures within the searcher's limits
    reference_costs: dict[str, Cost] = field(default_factory=dict)  # "student" (the baselines') and "teacher <name>"

    @property
    def optuna_study(self) -> str:
        """The search's Optuna study in ``searcher.storage``: one per study instance (MLflow parent
        run), so a rerun of the study file starts another beside it and ``--resume`` continues it."""
        return f"{self.study.name}-{self.root.name}"

    def weights(self, model: ModelConfig) -> ModelConfig:
        """``model`` as a job builds it: ``pretrained: builtin`` becomes the file its pretraining wrote."""
        if model.pretrained != BUILTIN_WEIGHTS:
            return model
        key = pretrain_key(self.study, model)
        if key not in self.pretrained:
            raise RuntimeError(f"{model.backbone}: pretrained: builtin, but the pretrain stage has not run (key {key})")
        return model.model_copy(update={"pretrained": str(self.pretrained[key])})

    def resources(self, teacher: bool = False) -> Resources:
        """A job's resources: the teachers' own (``teacher_resources``) when the study sets them."""
        return (self.study.teacher_resources or self.study.resources) if teacher else self.study.resources

    def in_trial(self, teacher: bool = False) -> bool:
        """Whether a job runs in its Tune trial's own process (``ray_train.in_trial``, 1-worker jobs)."""
        return self.study.ray_train.in_trial and self.resources(teacher).workers == 1

    def trial_resources(self, teacher: bool = False) -> dict[str, float]:
        """What a Tune trial reserves: its worker's CPUs/GPUs when the job runs in the trial's
        process, else nothing but a token (the Train workers reserve; concurrency: max_concurrent)."""
        if not self.in_trial(teacher):
            return DRIVER_RESOURCES
        resources = self.resources(teacher)
        return {"cpu": resources.cpus_per_worker} | (
            {"gpu": resources.gpus_per_worker} if resources.gpus_per_worker else {}
        )


def pretrain_key(study: StudyConfig, model: ModelConfig) -> str:
    """Identity of a corpus pretraining: same backbone, stem, corpus and recipe → the same weights."""
    blob = {"backbone": model.backbone, "stem": model.stem, "pretrain": study.pretrain.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def pretrained_architectures(study: StudyConfig, teachers: list[str]) -> list[ModelConfig]:
    """The (backbone, stem) pairs to pretrain on the corpus, once each: the students' (every one a
    search may choose) and those of the named ``teachers`` (the ones to be trained), where
    ``pretrained: builtin``."""
    models = [study.student, *architectures(study).values()] + [study.teachers[name].model for name in teachers]
    chosen = {
        pretrain_key(study, m): ModelConfig(backbone=m.backbone, stem=m.stem, pretrained=BUILTIN_WEIGHTS)
        for m in models
        if m.pretrained == BUILTIN_WEIGHTS
    }
    return list(chosen.values())


def pretrain_label(model: ModelConfig) -> str:
    return model.backbone if model.stem == "plain" else f"{model.backbone}-{model.stem}"


def pretrain_job(plan: Plan, model: ModelConfig) -> PretrainJobConfig:
    recipe = plan.study.pretrain
    return PretrainJobConfig(
        corpus=recipe.corpus,
        model=ModelConfig(backbone=model.backbone, stem=model.stem),
        optim=recipe.optim,
        schedule=recipe.schedule,
        cache=plan.root.parents[1] / "corpus",  # <storage>/corpus: shared by every study there
        output=plan.root / "pretrained" / pretrain_label(model),
    )


def teacher_key(study: StudyConfig, name: str) -> str:
    """Identity of a teacher pretraining: same data, partition, architecture, recipe → same teacher."""
    spec = study.teachers[name]
    data = study.data
    data_id: dict[str, Any] = {
        "dataset": data.dataset,
        "partition": data.partition,
        "protocol": data.protocol,
        "partition_seed": data.partition_seed,
        "crop_size": data.crop_size,
        "scales": list(data.scales),
    }
    if data.dataset == "builtin":
        builtin = data.builtin.model_dump()
        if not builtin["num_test"]:  # data without a test split keeps the keys it had before there was one
            del builtin["num_test"]
        data_id["builtin"] = builtin
    else:
        data_id["root"] = str(Path(data.root).resolve())
    # Which images keep their labels and which are held out, where a study sets it (the keys of
    # studies that leave them at their defaults do not change).
    data_id |= data.model_dump(mode="json", include=set(ROLE_FIELDS), exclude_defaults=True)
    blob = {
        "data": data_id,
        "model": spec.model.model_dump(mode="json"),
        "recipe": spec.effective_recipe.model_dump(mode="json"),
    }
    if spec.model.pretrained == BUILTIN_WEIGHTS:  # another corpus or recipe makes another teacher
        blob["pretrain"] = pretrain_key(study, spec.model)
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def teacher_job(plan: Plan, name: str) -> TeacherJobConfig:
    spec = plan.study.teachers[name]
    recipe = spec.effective_recipe
    return TeacherJobConfig(
        data=plan.study.data,
        model=plan.weights(spec.model),
        optim=recipe.optim,
        schedule=recipe.schedule,
        cps_weight=recipe.cps_weight,
        cps_rampup=recipe.cps_rampup,
        ohem=recipe.ohem,
        output=plan.root / "teachers" / name,
    )


def combo_teachers(combo: str) -> tuple[str, str]:
    """``"A+B"`` → (image teacher A, region teacher B); ``"A"`` → (A, A)."""
    parts = combo.split("+")
    return parts[0], parts[-1]


def teacher_ref(plan: Plan, name: str) -> CheckpointRef:
    """Teacher ``name`` as a job sees it: its architecture and the checkpoint the driver found or trained."""
    return CheckpointRef(model=plan.study.teachers[name].model, checkpoint=plan.teachers[name])


def distill_job(plan: Plan, params: dict[str, Any], seed: int, output: Path) -> DistillJobConfig:
    """The study's default distillation with the searched ``params`` applied."""
    study = plan.study
    losses = study.distill.losses
    if "teachers" in params:
        image_teacher, region_teacher = combo_teachers(params["teachers"])
        losses = losses.model_copy(
            update={"image_teachers": (image_teacher,), "region_teachers": (region_teacher,), "pixel_teachers": None}
        )
        used = list(dict.fromkeys([image_teacher, region_teacher]))
    else:
        named = losses.pixel_teachers or dict.fromkeys([*losses.image_teachers, *losses.region_teachers])
        used = list(named) or list(study.teachers)
    update = {
        k: params[k] for k in ("lambda_1", "lambda_2", "pool_size", "pixel_labeled", "pixel_unlabeled") if k in params
    }
    if params.get("image_level") is False:
        update["image_teachers"] = ()
    if params.get("region_level") is False:
        update["region_teachers"] = ()
    losses = losses.model_copy(update=update)
    schedule = study.schedule.model_copy(
        update={"seed": seed} | ({"iterations": params["iterations"]} if "iterations" in params else {})
    )
    optim = study.optim.model_copy(update={"lr": params["lr"]} if "lr" in params else {})
    return DistillJobConfig(
        data=study.data,
        student=plan.weights(student_model(study, params)),
        teachers={name: teacher_ref(plan, name) for name in used},
        teacher_mode=study.distill.teacher_mode,
        teacher_precision=study.distill.teacher_precision,
        teacher_channels_last=study.distill.teacher_channels_last,
        losses=losses,
        optim=optim,
        schedule=schedule,
        output=output,
        teacher_cache=plan.teacher_cache,
    )


def baseline_job(plan: Plan, index: int, seed: int, output: Path) -> BaselineJobConfig:
    study = plan.study
    spec = study.baselines[index]
    return BaselineJobConfig(
        method=spec.method,
        data=study.data,
        student=plan.weights(study.student),
        teacher=teacher_ref(plan, spec.teacher) if spec.teacher is not None else None,
        ema_decay=spec.ema_decay,
        consistency_weight=spec.consistency_weight,
        temperature=spec.temperature,
        distill_on=spec.distill_on,
        optim=study.optim,
        schedule=study.schedule.model_copy(update={"seed": seed}),
        output=output,
    )


@dataclass
class TrialJob:
    """What one trial runs and how its MLflow run is found again."""

    cfg: JobConfig
    key: str
    name: str
    kind: str  # pretrain | teacher | baseline | trial | repeat
    params: dict[str, Any]
    tags: dict[str, str]
    teacher: bool = False


def trial_job(plan: Plan, config: dict[str, Any], trial_id: str | None = None) -> TrialJob:
    """The job of a Tune trial's ``config`` (``trial_id``: Tune's id of a search trial)."""
    config = config | config.get("job", {})  # one grid of mixed jobs (``stage_teachers``)
    stage = config["stage"]
    base = {tracking.STUDY_TAG: plan.study.name, "mgd_ray.stage": stage}
    if stage == "teachers":
        name = config["teacher"]
        key = teacher_key(plan.study, name)
        tags = base | {tracking.KIND_TAG: "teacher", tracking.TEACHER_KEY_TAG: key, "mgd_ray.teacher": name}
        return TrialJob(
            teacher_job(plan, name),
            f"{plan.parent_run_id}/teacher/{name}",
            f"teacher {name}",
            "teacher",
            {},
            tags,
            True,
        )
    if stage == "pretrain":
        model = ModelConfig(backbone=config["backbone"], stem=config["stem"], pretrained=BUILTIN_WEIGHTS)
        key, label = pretrain_key(plan.study, model), pretrain_label(model)
        tags = base | {tracking.KIND_TAG: "pretrain", tracking.PRETRAIN_KEY_TAG: key, "mgd_ray.backbone": label}
        return TrialJob(
            pretrain_job(plan, model),
            f"{plan.parent_run_id}/pretrain/{label}",
            f"pretrain {label}",
            "pretrain",
            {},
            tags,
        )
    seed = int(config.get("seed", plan.study.seeds[0]))
    if stage == "baselines":
        index = int(config["baseline"])
        baseline = plan.study.baselines[index].name
        cfg = baseline_job(plan, index, seed, plan.root / "baselines" / f"{baseline}-s{seed}")
        tags = base | {tracking.KIND_TAG: "baseline", "mgd_ray.baseline": baseline, "mgd_ray.seed": str(seed)}
        return TrialJob(
            cfg, f"{plan.parent_run_id}/baseline/{baseline}/{seed}", f"{baseline} s{seed}", "baseline", {}, tags
        )
    if stage == "repeats":
        params = dict(config["params"])
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
        cfg = distill_job(plan, params, seed, plan.root / "repeats" / f"{digest}-s{seed}")
        tags = base | {tracking.KIND_TAG: "repeat", "mgd_ray.seed": str(seed), "mgd_ray.config": digest}
        return TrialJob(cfg, f"{plan.parent_run_id}/repeat/{digest}/{seed}", f"best s{seed}", "repeat", params, tags)
    if trial_id is None:
        raise ValueError("trial_job: a search trial needs its Tune trial id")
    params = {k: v for k, v in config.items() if k in plan.study.search.searched() or k == STUDENT_PARAM}
    cfg = distill_job(plan, params, seed, plan.root / "trials" / trial_id)
    tags = base | {tracking.KIND_TAG: "trial", "mgd_ray.trial_id": trial_id, "mgd_ray.seed": str(seed)}
    return TrialJob(cfg, f"{plan.parent_run_id}/trial/{trial_id}", f"trial {trial_id}", "trial", params, tags)
