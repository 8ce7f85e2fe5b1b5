"""The baselines of Table 1 as plain in-process jobs: each trains, reports its terms and exports.

Their Ray Train path is the same wrapper every job kind goes through (tests/test_train.py runs a
teacher and KD there, tests/test_distributed.py compares Mean Teacher and CPS across workers).
"""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mgd_ray.checkpoint import MODEL_FILE
from mgd_ray.config import parse_job_config
from mgd_ray.jobs.baselines import cwd_terms, ema_update, kd_terms, mean_teacher_terms, run_baseline, supervised_terms
from mgd_ray.models.deeplab import build_segmenter


def test_ema_update_by_hand():
    ema, model = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        ema.weight.copy_(torch.tensor([1.0, 2.0]))
        model.weight.copy_(torch.tensor([3.0, 6.0]))
        model.running_mean.copy_(torch.tensor([0.5, -0.5]))
    ema_update(ema, model, decay=0.75)
    assert ema.weight.tolist() == [0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 6]  # [1.5, 3.0]
    assert ema.running_mean.tolist() == [0.5, -0.5]  # buffers are copied, not averaged


@pytest.mark.parametrize(
    "method,terms",
    [
        ("supervised", {"sup"}),
        ("mean_teacher", {"sup", "mean_teacher"}),
        ("cps", {"sup/branch1", "sup/branch2", "cps"}),
        ("kd", {"sup", "kd"}),
        ("cwd", {"sup", "cwd"}),
    ],
)
def test_every_baseline_trains_reports_its_terms_and_exports(
    tiny_data_cfg, tiny_schedule, teacher_ckpt, tmp_path, method, terms
):
    raw = {"method": method, "data": tiny_data_cfg, "schedule": tiny_schedule, "output": str(tmp_path / "out")}
    if method in ("kd", "cwd"):
        raw["teacher"] = {"model": {"backbone": "resnet18"}, "checkpoint": str(teacher_ckpt)}
    reports: list[tuple[dict, Path]] = []
    run_baseline(parse_job_config("baseline", raw), lambda m, c: reports.append((m, c)), tmp_path)
    assert [m["step"] for m, _ in reports] == [2, 4]
    for metrics, _ in reports:
        assert {k.removeprefix("loss/") for k in metrics if k.startswith("loss/")} == terms | {"total"}
        assert metrics["loss/total"] == pytest.approx(sum(metrics[f"loss/{t}"] for t in terms), rel=1e-5)
        assert 0.0 <= metrics["val/mIoU"] <= 1.0
    last = reports[-1][0]
    record = torch.load(reports[-1][1] / MODEL_FILE, weights_only=False)
    role = f"baseline/{method}"
    if method == "cps":  # the branch with the better val mIoU is the exported network
        role += ":branch1" if last["val/branch1/mIoU"] >= last["val/branch2/mIoU"] else ":branch2"
        assert last["val/mIoU"] == max(last["val/branch1/mIoU"], last["val/branch2/mIoU"])
    assert record["role"] == role and record["metrics"]["step"] == 4


@pytest.fixture(scope="module")
def eval_student():
    torch.manual_seed(8)
    return build_segmenter("mobilenet_v2", 6).eval()


def test_supervised_terms_are_the_labeled_ce(make_batch, eval_student):
    b = make_batch(8)
    with torch.no_grad():
        terms = supervised_terms(eval_student, b)
        expected = F.cross_entropy(eval_student(b.x_l).logits, b.y, ignore_index=255)
    assert list(terms) == ["sup"] and terms["sup"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_mean_teacher_terms_against_the_emas_mixed_predictions(make_batch, eval_student):
    b = make_batch(9)
    ema = copy.deepcopy(eval_student)
    with torch.no_grad():
        terms = mean_teacher_terms(eval_student, ema, b, weight=0.5)
        target = eval_student(b.u0).logits * (1 - b.m) + eval_student(b.u1).logits * b.m
        expected = ((eval_student(b.x_mix).logits.softmax(1) - target.softmax(1)) ** 2).mean()
    assert list(terms) == ["sup", "mean_teacher"]
    assert terms["mean_teacher"].item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    assert terms["mean_teacher"].item() > 0  # x_mix's prediction is not the mix of the predictions


@pytest.mark.parametrize("terms_fn,name", [(kd_terms, "kd"), (cwd_terms, "cwd")])
def test_logit_distillation_from_a_copy_of_the_student_is_zero(make_batch, eval_student, terms_fn, name):
    b = make_batch(10)
    with torch.no_grad():
        terms = terms_fn(eval_student, copy.deepcopy(eval_student), b, weight=2.0, temperature=3.0)
        sup = F.cross_entropy(eval_student(b.x_l).logits, b.y, ignore_index=255)
    assert list(terms) == ["sup", name]
    assert terms["sup"].item() == pytest.approx(sup.item(), rel=1e-6)
    assert terms[name].item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("on_unlabeled", [False, True])
def test_kd_distils_the_labeled_images_and_the_unlabeled_ones_only_when_asked(make_batch, eval_student, on_unlabeled):
    """Hinton's KL written out in numpy-free torch, on x_l alone (the paper's KD) or on x_l and x_mix."""
    b = make_batch(11)
    torch.manual_seed(3)
    teacher = build_segmenter("mobilenet_v2", 6).eval()

    def kl(s_logits, t_logits, t):  # T^2 · Σ_c p_T (log p_T − log p_S), mean over pixels
        p_t = (t_logits / t).softmax(1)
        return (t * t * (p_t * ((t_logits / t).log_softmax(1) - (s_logits / t).log_softmax(1))).sum(1)).mean()

    with torch.no_grad():
        terms = kd_terms(eval_student, teacher, b, 2.0, 3.0, None, on_unlabeled)
        on_l = kl(eval_student(b.x_l).logits, teacher(b.x_l).logits, 3.0)
        on_mix = kl(eval_student(b.x_mix).logits, teacher(b.x_mix).logits, 3.0)
    expected = 2.0 * (on_l + on_mix) if on_unlabeled else 2.0 * on_l
    assert on_mix.item() > 1e-4  # the two settings differ by a term that is not zero
    assert terms["kd"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_labeled_only_distillation_draws_no_unlabeled_images(tiny_data_cfg, tiny_schedule, teacher_ckpt, tmp_path):
    """The paper's KD never reads an unlabeled image (model.pt's record of the images drawn); with
    distill_on: labeled+unlabeled it does."""
    teacher = {"model": {"backbone": "resnet18"}, "checkpoint": str(teacher_ckpt)}
    drawn = {}
    for mode in ("labeled", "labeled+unlabeled"):
        raw = {"method": "kd", "teacher": teacher, "distill_on": mode, "data": tiny_data_cfg}
        cfg = parse_job_config("baseline", raw | {"schedule": tiny_schedule, "output": str(tmp_path / mode)})
        assert cfg.draws_unlabeled == (mode == "labeled+unlabeled")
        reports: list[Path] = []
        run_baseline(cfg, lambda _m, c, into=reports: into.append(c), tmp_path / mode)
        drawn[mode] = torch.load(reports[-1] / MODEL_FILE, weights_only=False)["drawn"]
    assert sum(drawn["labeled"]["labeled"].values()) == 4 * tiny_schedule["batch_labeled"]
    assert not drawn["labeled"].get("unlabeled")
    assert sum(drawn["labeled+unlabeled"]["unlabeled"].values()) == 4 * 2 * tiny_schedule["batch_unlabeled"]
    assert drawn["labeled+unlabeled"]["labeled"] == drawn["labeled"]["labeled"]  # one labeled stream


def test_distill_on_is_refused_for_a_method_without_a_teacher(tiny_data_cfg):
    with pytest.raises(Exception, match="distill_on: only kd and cwd"):
        parse_job_config("baseline", {"method": "supervised", "data": tiny_data_cfg, "distill_on": "labeled+unlabeled"})
