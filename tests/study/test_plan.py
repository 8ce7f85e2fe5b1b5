"""A study's plan, derived without Ray: where each job runs, what it reserves, its job and MLflow key."""

from pathlib import Path

import pytest

from mgd_ray import tracking
from mgd_ray.study.config import Resources, load_study
from mgd_ray.study.plan import Plan, pretrain_key, pretrained_architectures, teacher_key, trial_job
from mgd_ray.train import scaling_config

QUICKSTART = Path(__file__).parents[2] / "studies" / "quickstart.yaml"


@pytest.mark.parametrize(
    "teacher_resources,teacher_in_trial,teacher_reserves,teacher_workers",
    [
        (None, True, {"cpu": 1.0}, 1),  # the students' one worker: in the trial's process, which reserves it
        ({"workers": 1, "cpus_per_worker": 2, "gpus_per_worker": 0.5}, True, {"cpu": 2.0, "gpu": 0.5}, 1),
        ({"workers": 2, "cpus_per_worker": 2}, False, {"cpu": 0, "memory": 2**20}, 2),  # DDP: a Train worker group
    ],
)
def test_one_worker_teachers_run_in_their_trials_process_and_reserve_their_own_resources(
    tmp_path, teacher_resources, teacher_in_trial, teacher_reserves, teacher_workers
):

    study = load_study(QUICKSTART)
    assert study.ray_train.in_trial and study.resources.workers == 1
    tr = None if teacher_resources is None else Resources.model_validate(teacher_resources)
    plan = Plan(study.model_copy(update={"teacher_resources": tr}), tmp_path, "", "", "")
    assert plan.in_trial(teacher=True) is teacher_in_trial
    assert plan.trial_resources(teacher=True) == teacher_reserves
    resources = plan.resources(teacher=True)
    assert (
        scaling_config(resources.workers, resources.cpus_per_worker, resources.gpus_per_worker).num_workers
        == teacher_workers
    )
    assert plan.in_trial() and plan.trial_resources() == {"cpu": 1.0}  # the students are unaffected


def test_scaling_config_reserves_each_workers_cpus_and_gpus():
    cpu = scaling_config(2, 3.0)
    assert cpu.num_workers == 2 and not cpu.use_gpu and cpu.resources_per_worker == {"CPU": 3.0}
    gpu = scaling_config(4, 8.0, 0.5)
    assert gpu.use_gpu and gpu.resources_per_worker == {"CPU": 8.0, "GPU": 0.5}


def test_trial_job_names_each_stages_job_and_its_mlflow_run(tmp_path):
    study = load_study(QUICKSTART).model_copy(update={"seeds": (0, 3)})
    plan = Plan(study, tmp_path, "sqlite://", "1", "parent", {"T_D": tmp_path / "td.pt", "T_W": tmp_path / "tw.pt"})
    for model in pretrained_architectures(study, ["T_D", "T_W"]):  # what stage_pretrain leaves
        plan.pretrained[pretrain_key(study, model)] = tmp_path / f"{model.backbone}.pt"
    teacher = trial_job(plan, {"stage": "teachers", "job": {"teacher": "T_W"}})
    assert teacher.cfg.model.pretrained == str(tmp_path / "resnet18.pt")
    assert (teacher.key, teacher.name, teacher.kind, teacher.teacher) == (
        "parent/teacher/T_W",
        "teacher T_W",
        "teacher",
        True,
    )
    assert (
        teacher.tags[tracking.TEACHER_KEY_TAG] == teacher_key(study, "T_W")
        and teacher.cfg.output == tmp_path / "teachers" / "T_W"
    )
    # A teacher-free baseline queued in the teachers' grid is a baseline job.
    kd = trial_job(plan, {"stage": "teachers", "job": {"stage": "baselines", "baseline": 1, "seed": 3}})
    assert (kd.key, kd.kind, kd.cfg.method, kd.cfg.schedule.seed) == ("parent/baseline/kd[T_D]/3", "baseline", "kd", 3)
    assert kd.cfg.teacher.checkpoint == tmp_path / "td.pt" and kd.cfg.output == tmp_path / "baselines" / "kd[T_D]-s3"
    assert kd.cfg.student.pretrained == str(tmp_path / "mobilenet_v2.pt")
    assert kd.cfg.distill_on == "labeled" and not kd.cfg.draws_unlabeled  # the paper's KD
    kd_u = trial_job(plan, {"stage": "baselines", "baseline": 2, "seed": 0})
    assert (kd_u.key, kd_u.cfg.distill_on) == ("parent/baseline/kd[T_D]+unlabeled/0", "labeled+unlabeled")
    assert kd_u.cfg.draws_unlabeled and kd_u.cfg.output == tmp_path / "baselines" / "kd[T_D]+unlabeled-s0"
    searched = {"stage": "search", "seed": 0, "lambda_1": 0.001, "lambda_2": 20.0, "pool_size": 2}
    with pytest.raises(ValueError, match="needs its Tune trial id"):
        trial_job(plan, searched)
    trial = trial_job(plan, searched, trial_id="abc123")
    assert (trial.key, trial.name, trial.kind) == ("parent/trial/abc123", "trial abc123", "trial")
    assert trial.params == {"lambda_1": 0.001, "lambda_2": 20.0, "pool_size": 2}  # stage and seed are not params
    assert (trial.cfg.losses.lambda_1, trial.cfg.losses.lambda_2, trial.cfg.losses.pool_size) == (0.001, 20.0, 2)
    repeat = trial_job(plan, {"stage": "repeats", "params": trial.params, "seed": 3})
    assert repeat.kind == "repeat" and repeat.key.startswith("parent/repeat/") and repeat.key.endswith("/3")
    assert repeat.cfg.losses == trial.cfg.losses and repeat.cfg.schedule.seed == 3


def test_teacher_key_follows_the_images_roles():
    study = load_study(QUICKSTART)
    key = teacher_key(study, "T_D")

    def with_data(**update) -> str:
        return teacher_key(study.model_copy(update={"data": study.data.model_copy(update=update)}), "T_D")

    assert with_data(labeled=8) != key  # other labeled images: another teacher
    assert with_data(split_seed=0) == key  # a setting left at its default changes nothing
    folder = with_data(dataset="folder", root=Path("/data/mine"), partition="all")
    assert with_data(dataset="folder", root=Path("/data/mine"), partition="all", test=0.1) != folder


def test_builtin_pretraining_is_keyed_resolved_and_keys_the_teachers(tmp_path):
    from mgd_ray.config import ModelConfig, PretrainScheduleConfig

    pretrained = load_study(QUICKSTART)  # every network pretrained on the corpus (pretrained: builtin)
    assert {t.model.pretrained for t in pretrained.teachers.values()} | {pretrained.student.pretrained} == {"builtin"}
    scratch = {"pretrained": None}
    teachers = {
        n: t.model_copy(update={"model": t.model.model_copy(update=scratch)}) for n, t in pretrained.teachers.items()
    }
    study = pretrained.model_copy(
        update={"teachers": teachers, "student": pretrained.student.model_copy(update=scratch)}
    )
    # student mobilenet_v2 and T_D resnet34, T_W resnet18: one pretraining each
    assert [m.backbone for m in pretrained_architectures(pretrained, ["T_D", "T_W"])] == [
        "mobilenet_v2",
        "resnet34",
        "resnet18",
    ]
    assert [m.backbone for m in pretrained_architectures(pretrained, [])] == ["mobilenet_v2"]  # teachers found
    assert pretrained_architectures(study, ["T_D", "T_W"]) == []  # nothing asks for builtin weights
    key = pretrain_key(pretrained, ModelConfig(backbone="resnet18"))
    longer = pretrained.model_copy(
        update={
            "pretrain": pretrained.pretrain.model_copy(update={"schedule": PretrainScheduleConfig(iterations=1200)})
        }
    )
    assert pretrain_key(longer, ModelConfig(backbone="resnet18")) != key
    assert pretrain_key(pretrained, ModelConfig(backbone="resnet18", stem="deep")) != key
    # A teacher started from the corpus weights is another teacher than one from scratch, and than one
    # pretrained with another recipe; the student's pretraining does not move the teachers' keys.
    assert teacher_key(pretrained, "T_W") != teacher_key(study, "T_W")
    assert teacher_key(longer, "T_W") != teacher_key(pretrained, "T_W")
    plan = Plan(pretrained, tmp_path / "storage" / "s" / "i", "", "", "")
    with pytest.raises(RuntimeError, match="the pretrain stage has not run"):
        trial_job(plan, {"stage": "teachers", "teacher": "T_W"})
    plan.pretrained[pretrain_key(pretrained, pretrained.teachers["T_W"].model)] = tmp_path / "w.pt"
    job = trial_job(plan, {"stage": "teachers", "teacher": "T_W"})
    assert job.cfg.model.pretrained == str(tmp_path / "w.pt") and job.cfg.model.backbone == "resnet18"
    pre = trial_job(plan, {"stage": "pretrain", "backbone": "resnet18", "stem": "plain"})
    assert pre.kind == "pretrain" and pre.tags[tracking.PRETRAIN_KEY_TAG] == pretrain_key(
        pretrained, ModelConfig(backbone="resnet18")
    )
    assert pre.cfg.cache == tmp_path / "storage" / "corpus" and pre.cfg.schedule == pretrained.pretrain.schedule
