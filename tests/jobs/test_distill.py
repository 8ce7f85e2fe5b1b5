"""MGD distillation step: exact values with copy teachers, batching exactness, checkpoint checks."""

import copy

import pytest
import torch

from mgd_ray import losses
from mgd_ray.config import parse_job_config
from mgd_ray.jobs.common import Batch, load_segmenter
from mgd_ray.jobs.distill import (
    FrozenTeacher,
    distill_terms,
    load_teachers,
    teacher_signals,
)
from mgd_ray.models.deeplab import build_segmenter


def make_batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(2, 1, 32, 32)
    m[:, :, 8:24, 4:20] = 1
    return Batch(
        x_l=torch.randn(2, 3, 32, 32, generator=g),
        y=torch.randint(0, 6, (2, 32, 32), generator=g),
        u0=torch.randn(2, 3, 32, 32, generator=g),
        u1=torch.randn(2, 3, 32, 32, generator=g),
        m=m,
    )


def student_cfg(teacher_ckpt, **losses_cfg):
    ref = {"model": {"backbone": "resnet18"}, "checkpoint": str(teacher_ckpt)}
    return parse_job_config("student", {"teachers": {"T_D": ref, "T_W": ref}, "losses": losses_cfg})


def test_copy_teachers_give_zero_image_and_region_losses(teacher_ckpt):
    cfg = student_cfg(teacher_ckpt)
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
    assert terms["pixel_l/T_D"].item() == pytest.approx(torch.nn.functional.cross_entropy(s_l, s_l.argmax(1)).item(), rel=1e-5)
    assert terms["pixel_u/T_W"].item() == pytest.approx(torch.nn.functional.cross_entropy(s_mix, mixed.argmax(1)).item(), rel=1e-5)
    assert terms["sup"].item() == pytest.approx(losses.supervised_loss(s_l, b.y).item(), rel=1e-5)


def test_weights_and_switches(teacher_ckpt):
    torch.manual_seed(0)
    student = build_segmenter("resnet18", 6).eval()
    torch.manual_seed(1)
    teacher = build_segmenter("resnet18", 6).eval()
    b = make_batch(1)
    sig = {n: teacher_signals(teacher, b, True, True, True, True) for n in ("T_D", "T_W")}
    base = distill_terms(student, sig, b, student_cfg(teacher_ckpt))
    scaled = distill_terms(student, sig, b, student_cfg(teacher_ckpt, lambda_1=0.004, lambda_2=50.0))
    assert scaled["image/T_D"].item() == pytest.approx(2 * base["image/T_D"].item(), rel=1e-5)
    assert scaled["region/T_W"].item() == pytest.approx(0.5 * base["region/T_W"].item(), rel=1e-5)
    swapped = distill_terms(
        student, sig, b, student_cfg(teacher_ckpt, image_teachers=["T_W", "T_D"], region_teachers=[], supervised=False, pixel_labeled=False)
    )
    assert set(swapped) == {"pixel_u/T_D", "pixel_u/T_W", "image/T_W", "image/T_D"}


def test_batched_teacher_forward_is_exact():
    torch.manual_seed(2)
    teacher = build_segmenter("resnet18", 6).eval()
    b = make_batch(2)
    one = teacher_signals(teacher, b, True, True, True, batched=True)
    sep = teacher_signals(teacher, b, True, True, True, batched=False)
    assert torch.equal(one.pl_l, sep.pl_l) and torch.equal(one.pl_mix, sep.pl_mix)
    torch.testing.assert_close(one.logits_mix, sep.logits_mix, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one.feats_mix, sep.feats_mix, rtol=1e-4, atol=1e-4)
    assert not one.logits_mix.requires_grad


def test_only_needed_teacher_outputs_are_computed():
    torch.manual_seed(3)
    teacher = build_segmenter("resnet18", 6).eval()
    s = teacher_signals(teacher, make_batch(), pixel=False, image=True, region=False, batched=True)
    assert s.pl_l is None and s.pl_mix is None and s.feats_mix is None and s.logits_mix is not None


def test_wrong_architecture_checkpoint_is_refused(teacher_ckpt):
    ref = {"model": {"backbone": "resnet34"}, "checkpoint": str(teacher_ckpt)}
    cfg = parse_job_config("student", {"teachers": {"T_D": ref}, "losses": {"region_teachers": []}})
    with pytest.raises(ValueError, match=r"holds a resnet18 .* expects resnet34"):
        load_teachers(cfg, 6, torch.device("cpu"))
    with pytest.raises(ValueError, match="predicts 6 classes but the dataset has 21"):
        load_segmenter(teacher_ckpt, cfg.teachers["T_D"].model.model_copy(update={"backbone": "resnet18"}), 21)


def test_unknown_teacher_name_is_a_config_error(teacher_ckpt):
    from mgd_ray.config import ConfigError

    with pytest.raises(ConfigError, match="losses.*teacher 'T_X' is not defined"):
        student_cfg(teacher_ckpt, image_teachers=["T_X"])


def test_channels_last_teacher_gives_the_same_signals():
    torch.manual_seed(3)
    net = build_segmenter("resnet18", 6).eval()
    b = make_batch(3)
    plain = teacher_signals(net, b, True, True, True, batched=True)
    nhwc = FrozenTeacher(copy.deepcopy(net), channels_last=True).eval()
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in nhwc.parameters())
    fast = teacher_signals(nhwc, b, True, True, True, batched=True)
    assert fast.feats_mix.is_contiguous() and fast.feats_mix.dtype == torch.float32
    torch.testing.assert_close(fast.logits_mix, plain.logits_mix, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.feats_mix, plain.feats_mix, rtol=1e-4, atol=1e-4)
    agree = (fast.pl_mix == plain.pl_mix).float().mean().item()
    assert agree > 0.999


def test_bf16_teacher_runs_in_bf16_and_returns_float32_close_to_fp32():
    torch.manual_seed(4)
    net = build_segmenter("resnet18", 6).eval()
    x = make_batch(4).x_mix
    with torch.inference_mode():
        ref = net(x)
        out = FrozenTeacher(net, precision="bf16").eval()(x)
    assert out.logits.dtype == torch.float32 and out.features.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: outputs move (so autocast really ran) but stay within a few percent.
    err = (out.features - ref.features).abs().max().item()
    scale = ref.features.abs().max().item()
    assert 0 < err < 0.05 * scale, (err, scale)


def test_load_teachers_applies_the_execution_options(teacher_ckpt):
    cfg = student_cfg(teacher_ckpt).model_copy(update={"teacher_precision": "bf16", "teacher_channels_last": True})
    teachers = load_teachers(cfg, 6, torch.device("cpu"))
    assert all(isinstance(t, FrozenTeacher) and t.precision == "bf16" and t.channels_last and not t.training for t in teachers.values())
    assert all(not p.requires_grad for t in teachers.values() for p in t.parameters())
    plain = load_teachers(student_cfg(teacher_ckpt), 6, torch.device("cpu"))
    assert not any(isinstance(t, FrozenTeacher) for t in plain.values())
