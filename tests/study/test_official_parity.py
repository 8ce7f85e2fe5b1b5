"""Each paper study against the authors' launch settings, value for value (method notes; docs/official-code.md).

``OFFICIAL`` holds what a run of each official experiment of JayQine/MGD-SSSS uses, read from its files:
``script.sh`` (``NGPUS``, and the ``learning_rate`` / ``batch_size`` it exports, which override
``config.py``'s defaults), ``config.py`` (epochs, crop, scales, λ1, λ2, CPS weight, optimiser) and
``train.py`` (whether the LR is multiplied by the world size, OHEM's ``min_kept``, the 7×7 region
pool). Their ``batch_size`` is the total over GPUs; the loader gives each GPU ``batch_size // W``
labeled images and as many in each unlabeled loader. The test resolves every job a paper study
would start (teachers, the MGD trial, the baselines) with the driver's own functions and checks it
against the table: the GPUs, the configured and the effective LR, the batch per GPU and in total,
the iterations, crop, scales, λ1, λ2, H_v, OHEM and the CPS weight.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from mgd_ray import losses
from mgd_ray.config import OptimConfig
from mgd_ray.study.config import load_study
from mgd_ray.study.plan import Plan, baseline_job, distill_job, teacher_job

STUDIES = sorted(p for p in (Path(__file__).parents[2] / "studies").glob("paper_*.yaml"))
SCALES = [0.5, 0.75, 1.0, 1.5, 1.75, 2.0]  # every config.py: C.train_scale_array
COMMON = {"momentum": 0.9, "weight_decay": 1e-4, "poly_power": 0.9}  # every config.py; no warm-up

OFFICIAL = {
    # exp.voc/voc8.resnet18_deeplabv3plus: script.sh NGPUS=4, learning_rate=0.0025, batch_size=8;
    # train.py base_lr = config.lr * engine.world_size; config.py lambda_1 0.002, lambda_2 100, 512 crop;
    # train.py adaptive_avg_pool2d(feat, (7, 7)); plain CE (no OHEM) on VOC.
    ("voc", "student", "resnet18"): {
        "gpus": 4,
        "lr": 0.0025,
        "lr_times_w": True,
        "batch": 8,
        "crop": 512,
        "lambda_1": 0.002,
        "lambda_2": 100.0,
        "pool": 7,
        "ohem": False,
    },
    # exp.voc/voc8.mobilev2_deeplabv3plus: script.sh learning_rate=0.0035, batch_size=8, NGPUS=4;
    # config.py lambda_1 0.0005, lambda_2 50.
    ("voc", "student", "mobilenet_v2"): {
        "gpus": 4,
        "lr": 0.0035,
        "lr_times_w": True,
        "batch": 8,
        "crop": 512,
        "lambda_1": 0.0005,
        "lambda_2": 50.0,
        "pool": 7,
        "ohem": False,
    },
    # exp.voc/voc8.resnet101_deeplabv3plus: script.sh learning_rate=0.0025, batch_size=8, NGPUS=4;
    # config.py C.cps_weight = 1.
    ("voc", "teacher", "resnet101"): {
        "gpus": 4,
        "lr": 0.0025,
        "lr_times_w": True,
        "batch": 8,
        "crop": 512,
        "cps_weight": 1.0,
        "ohem": False,
    },
    # exp.voc/voc8.wresnet34_deeplabv3plus: script.sh learning_rate=0.001 (not 0.0025), batch_size=8.
    ("voc", "teacher", "wide_resnet50_2"): {
        "gpus": 4,
        "lr": 0.001,
        "lr_times_w": True,
        "batch": 8,
        "crop": 512,
        "cps_weight": 1.0,
        "ohem": False,
    },
    # exp.city/city8.resnet18_deeplabv3plus: script.sh NGPUS=8, learning_rate=0.02, batch_size=16;
    # train.py base_lr = config.lr (not scaled); pixel_num = 50000 * config.batch_size // engine.world_size
    # for ProbOhemCrossEntropy2d(thresh=0.7); config.py lambda_1 0.001, lambda_2 100, 800 crop.
    ("cityscapes", "student", "resnet18"): {
        "gpus": 8,
        "lr": 0.02,
        "lr_times_w": False,
        "batch": 16,
        "crop": 800,
        "lambda_1": 0.001,
        "lambda_2": 100.0,
        "pool": 7,
        "ohem": True,
    },
    # exp.city/city8.wresnet34_deeplabv3plus: script.sh NGPUS=8, learning_rate=0.02, batch_size=8;
    # config.py C.cps_weight = 5; OHEM as the student's (50000 * 8 // 8 per GPU).
    ("cityscapes", "teacher", "wide_resnet50_2"): {
        "gpus": 8,
        "lr": 0.02,
        "lr_times_w": False,
        "batch": 8,
        "crop": 800,
        "cps_weight": 5.0,
        "ohem": True,
    },
    # exp.city/city8.resnet101_deeplabv3plus has no script.sh: its config.py defaults (lr 0.04,
    # batch_size 16, cps_weight 5), on the 8 GPUs of the other Cityscapes scripts.
    ("cityscapes", "teacher", "resnet101"): {
        "gpus": 8,
        "lr": 0.04,
        "lr_times_w": False,
        "batch": 16,
        "crop": 800,
        "cps_weight": 5.0,
        "ohem": True,
    },
}
# No Cityscapes MobileNetV2 in the code: its study keeps the Cityscapes ResNet-18 settings.
OFFICIAL[("cityscapes", "student", "mobilenet_v2")] = OFFICIAL[("cityscapes", "student", "resnet18")]
# CPS's epochs per partition (method notes; the voc8 / city8 config.py files: nepochs 34 / 137).
EPOCHS = {
    "voc": {"1/16": 32, "1/8": 34, "1/4": 40, "1/2": 60},
    "cityscapes": {"1/16": 128, "1/8": 137, "1/4": 160, "1/2": 240},
}
TRAIN_IMAGES = {"voc": 10582, "cityscapes": 2975}  # config.py: the labeled are N // ratio, the rest unlabeled


def official_iterations(dataset: str, partition: str, batch: int) -> int:
    """config.py: nepochs × (max(#labeled, #unlabeled) // batch_size)."""
    labeled = TRAIN_IMAGES[dataset] // Fraction(partition).denominator
    return EPOCHS[dataset][partition] * (max(labeled, TRAIN_IMAGES[dataset] - labeled) // batch)


def effective_lr(optim: OptimConfig, workers: int) -> float:
    """The step on the mean gradient over workers: lr (× W) under the step rule's gradient scale."""
    lr = optim.lr * (workers if optim.scale_lr_with_world_size else 1)
    return lr / workers if optim.step_rule == "official" else lr


def official_effective_lr(row: dict) -> float:
    """The authors' step: all_reduce(loss) / W differentiates as loss / W, apex DDP averages."""
    return row["lr"] * (row["gpus"] if row["lr_times_w"] else 1) / row["gpus"]


def check_optim(optim: OptimConfig, workers: int, row: dict, what: str) -> None:
    assert optim.optimizer == "sgd", what
    assert (optim.lr, optim.scale_lr_with_world_size) == (row["lr"], row["lr_times_w"]), what
    assert {k: getattr(optim, k) for k in COMMON} == COMMON, what
    assert optim.step_rule == "official" and optim.weight_decay_groups == "official", what
    assert effective_lr(optim, workers) == pytest.approx(official_effective_lr(row)), what


def check_batches(schedule, data, workers: int, row: dict, dataset: str, what: str) -> None:
    per_gpu = row["batch"] // row["gpus"]
    assert workers == row["gpus"], what
    assert (schedule.batch_labeled, schedule.batch_unlabeled) == (per_gpu, per_gpu), what
    assert schedule.batch_labeled * workers == row["batch"], what
    assert schedule.iterations == official_iterations(dataset, data.partition, row["batch"]), what
    assert data.crop_size == row["crop"] and list(data.scales) == SCALES, what


def test_the_effective_lr_of_the_official_update():
    # VOC: 0.0025 × 4 on the mean gradient / 4; Cityscapes: 0.02 unscaled on the mean gradient / 8.
    assert official_effective_lr(OFFICIAL[("voc", "student", "resnet18")]) == pytest.approx(0.0025)
    assert official_effective_lr(OFFICIAL[("cityscapes", "student", "resnet18")]) == pytest.approx(0.0025)
    # mgd_ray's global-batch rule would step 4× further with the same file.
    voc = OptimConfig(lr=0.0025, step_rule="global_batch")
    assert effective_lr(voc, 4) == pytest.approx(0.01)
    # Official iteration counts of the voc8 / city8 configs (1157 × 34, 162 × 137, 325 × 137).
    assert official_iterations("voc", "1/8", 8) == 39338
    assert official_iterations("cityscapes", "1/8", 16) == 22194
    assert official_iterations("cityscapes", "1/8", 8) == 44525


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_paper_study_jobs_are_the_official_experiments(path, tmp_path):
    study = load_study(path)
    dataset = study.data.dataset
    plan = Plan(study, tmp_path / "plan", "file:///nonexistent/mlruns", "0", "dummy-parent-run")
    for name in study.teachers:
        cfg = teacher_job(plan, name)
        row = OFFICIAL[(dataset, "teacher", cfg.model.backbone)]
        what = f"{path.stem}: teacher {name}"
        workers = (study.teacher_resources or study.resources).workers
        check_optim(cfg.optim, workers, row, what)
        check_batches(cfg.schedule, cfg.data, workers, row, dataset, what)
        assert cfg.cps_weight == row["cps_weight"] and cfg.ohem == row["ohem"], what
        plan.teachers[name] = tmp_path / f"{name}.pt"  # what a trained teacher leaves; not read here
    row = OFFICIAL[(dataset, "student", study.student.backbone)]
    workers = study.resources.workers
    trial = distill_job(plan, {}, study.seeds[0], tmp_path / "trial")
    what = f"{path.stem}: MGD"
    check_optim(trial.optim, workers, row, what)
    check_batches(trial.schedule, trial.data, workers, row, dataset, what)
    lc = trial.losses
    assert (lc.lambda_1, lc.lambda_2, lc.pool_size, lc.ohem) == (
        row["lambda_1"],
        row["lambda_2"],
        row["pool"],
        row["ohem"],
    ), what
    assert lc.image_reduction == "sum", what  # sem_sens_loss = torch.sum(torch.abs(...))
    if row["ohem"]:  # OHEM keeps 50000 * batch_size // W pixels on each GPU
        assert losses.OHEM_MIN_KEPT_PER_IMAGE * trial.schedule.batch_labeled == 50000 * row["batch"] // row["gpus"]
    for i, b in enumerate(study.baselines):
        cfg = baseline_job(plan, i, study.seeds[0], tmp_path / "baselines" / b.name)
        check_optim(cfg.optim, workers, row, f"{path.stem}: baseline {b.name}")
        check_batches(cfg.schedule, cfg.data, workers, row, dataset, f"{path.stem}: baseline {b.name}")
