"""MGD distillation step (Eq. 7): exact values with copy teachers, weights and switches, config checks."""

import copy

import pytest
import torch

from mgd_ray import losses
from mgd_ray.jobs.distill import distill_terms
from mgd_ray.models.deeplab import build_segmenter
from mgd_ray.teachers import teacher_signals


def test_copy_teachers_give_zero_image_and_region_losses(make_batch, student_cfg):
    cfg = student_cfg()
    torch.manual_seed(0)
    student = build_segmenter("resnet18", 6).eval()
    teachers = {name: copy.deepcopy(student) for name in ("T_D", "T_W")}
    b = make_batch()
    signals = {n: teacher_signals(t, b, pixel=True, image=True, region=True, batched=True) for n, t in teachers.items()}
    terms = distill_terms(student, signals, b, cfg)
    assert set(terms) == {"sup", "pixel_l/T_D", "pixel_l/T_W", "pixel_u/T_D", "pixel_u/T_W", "image/T_D", "region/T_W"}
    assert terms["image/T_D"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["region/T_W"].item() == pytest.approx(0.0, abs=1e-6)
    # Pixel terms against a teacher equal to the student: CE of the student against its own argmax
    # on x_l, and against the argmax of its u0/u1 predictions mixed by m on x_mix.
    with torch.no_grad():
        s_l = student(b.x_l).logits
        s_mix = student(b.x_mix).logits
        mixed = student(b.u0).logits * (1 - b.m) + student(b.u1).logits * b.m
    assert terms["pixel_l/T_D"].item() == pytest.approx(
        torch.nn.functional.cross_entropy(s_l, s_l.argmax(1)).item(), rel=1e-5
    )
    assert terms["pixel_u/T_W"].item() == pytest.approx(
        torch.nn.functional.cross_entropy(s_mix, mixed.argmax(1)).item(), rel=1e-5
    )
    assert terms["sup"].item() == pytest.approx(losses.supervised_loss(s_l, b.y).item(), rel=1e-5)


def test_weights_and_switches(make_batch, student_cfg):
    torch.manual_seed(0)
    student = build_segmenter("resnet18", 6).eval()
    torch.manual_seed(1)
    teacher = build_segmenter("resnet18", 6).eval()
    b = make_batch(1)
    sig = {n: teacher_signals(teacher, b, True, True, True, True) for n in ("T_D", "T_W")}
    base = distill_terms(student, sig, b, student_cfg())
    scaled = distill_terms(student, sig, b, student_cfg(lambda_1=0.004, lambda_2=50.0))
    assert scaled["image/T_D"].item() == pytest.approx(2 * base["image/T_D"].item(), rel=1e-5)
    assert scaled["region/T_W"].item() == pytest.approx(0.5 * base["region/T_W"].item(), rel=1e-5)
    swapped = distill_terms(
        student,
        sig,
        b,
        student_cfg(image_teachers=["T_W", "T_D"], region_teachers=[], supervised=False, pixel_labeled=False),
    )
    assert set(swapped) == {"pixel_u/T_D", "pixel_u/T_W", "image/T_W", "image/T_D"}


def test_unknown_teacher_name_is_a_config_error(student_cfg):
    from mgd_ray.config import ConfigError

    with pytest.raises(ConfigError, match="losses.*teacher 'T_X' is not defined"):
        student_cfg(image_teachers=["T_X"])
