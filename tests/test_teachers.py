"""Frozen teachers: their roles, the signals they give a step, how they run, and their checkpoints."""

import copy

import pytest
import torch

from mgd_ray.checkpoint import load_segmenter
from mgd_ray.config import parse_job_config
from mgd_ray.models.deeplab import build_segmenter
from mgd_ray.teachers import FrozenTeacher, TeacherRoles, load_teachers, step_signals, teacher_roles, teacher_signals


def test_batched_teacher_forward_is_exact(make_batch):
    torch.manual_seed(2)
    teacher = build_segmenter("resnet18", 6).eval()
    b = make_batch(2)
    one = teacher_signals(teacher, b, True, True, True, batched=True)
    sep = teacher_signals(teacher, b, True, True, True, batched=False)
    assert torch.equal(one.pl_l, sep.pl_l) and torch.equal(one.pl_mix, sep.pl_mix)
    torch.testing.assert_close(one.logits_mix, sep.logits_mix, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one.feats_mix, sep.feats_mix, rtol=1e-4, atol=1e-4)
    assert not one.logits_mix.requires_grad


def test_only_needed_teacher_outputs_are_computed(make_batch):
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


def test_channels_last_teacher_gives_the_same_signals(make_batch):
    torch.manual_seed(3)
    net = build_segmenter("resnet18", 6).eval()
    b = make_batch(3)
    plain = teacher_signals(net, b, True, True, True, batched=True)
    nhwc = FrozenTeacher(copy.deepcopy(net), channels_last=True).eval()
    assert any(
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in nhwc.parameters()
    )
    fast = teacher_signals(nhwc, b, True, True, True, batched=True)
    assert fast.feats_mix.is_contiguous() and fast.feats_mix.dtype == torch.float32
    torch.testing.assert_close(fast.logits_mix, plain.logits_mix, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.feats_mix, plain.feats_mix, rtol=1e-4, atol=1e-4)
    agree = (fast.pl_mix == plain.pl_mix).float().mean().item()
    assert agree > 0.999


def test_bf16_teacher_runs_in_bf16_and_returns_float32_close_to_fp32(make_batch):
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


def test_load_teachers_applies_the_execution_options(student_cfg):
    cfg = student_cfg().model_copy(update={"teacher_precision": "bf16", "teacher_channels_last": True})
    teachers = load_teachers(cfg, 6, torch.device("cpu"))
    assert all(
        isinstance(t, FrozenTeacher) and t.precision == "bf16" and t.channels_last and not t.training
        for t in teachers.values()
    )
    assert all(not p.requires_grad for t in teachers.values() for p in t.parameters())
    plain = load_teachers(student_cfg(), 6, torch.device("cpu"))
    assert all(t.precision == "fp32" and not t.channels_last and not t.training for t in plain.values())


def test_an_fp32_teacher_stays_fp32_under_a_bf16_students_autocast(student_cfg, make_batch):
    """``optim.precision: bf16`` autocasts the student's step; the frozen teachers inside it keep
    ``teacher_precision``, so their signals are those of fp32 (and of a teacher cache) to the bit."""
    teachers = load_teachers(student_cfg(), 6, torch.device("cpu"))
    x = make_batch().x_l
    with torch.inference_mode():
        outside = {n: t(x) for n, t in teachers.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = {n: t(x) for n, t in teachers.items()}
    for name in teachers:
        assert inside[name].logits.dtype == torch.float32
        assert torch.equal(inside[name].logits, outside[name].logits)
        assert torch.equal(inside[name].features, outside[name].features)


def test_roles_follow_the_loss_switches(student_cfg):
    default = teacher_roles(student_cfg())
    assert default == TeacherRoles(("T_D", "T_W"), ("T_D", "T_W"), ("T_D",), ("T_W",))
    assert default.pixel == ("T_D", "T_W")
    only_w_on_mix = teacher_roles(
        student_cfg(pixel_teachers=["T_W"], pixel_labeled=False, image_teachers=["T_W", "T_D"])
    )
    assert only_w_on_mix == TeacherRoles((), ("T_W",), ("T_W", "T_D"), ("T_W",))
    assert only_w_on_mix.pixel == ("T_W",)
    no_pixel = teacher_roles(student_cfg(pixel_labeled=False, pixel_unlabeled=False, region_teachers=[]))
    assert no_pixel.pixel == () and no_pixel.region == () and no_pixel.image == ("T_D",)
    assert TeacherRoles.every(("A", "B")) == TeacherRoles(("A", "B"), ("A", "B"), ("A", "B"), ("A", "B"))


def test_step_signals_run_each_teacher_for_its_roles_only(make_batch, student_cfg):
    torch.manual_seed(5)
    nets = {"T_D": build_segmenter("resnet18", 6).eval(), "T_W": build_segmenter("resnet18", 6).eval()}
    b = make_batch(5)
    roles = teacher_roles(student_cfg(pixel_teachers=["T_D"]))  # T_W feeds the region term alone
    signals = step_signals(nets, b, roles, batched=True)
    d, w = signals["T_D"], signals["T_W"]
    assert d.pl_l is not None and d.pl_mix is not None and d.logits_mix is not None and d.feats_mix is None
    assert w.pl_l is None and w.pl_mix is None and w.logits_mix is None and w.feats_mix is not None
    with torch.no_grad():  # the same outputs as the teachers' own forward passes
        assert torch.equal(d.pl_l, nets["T_D"](b.x_l).logits.argmax(1))
        torch.testing.assert_close(w.feats_mix, nets["T_W"](b.x_mix).features, rtol=1e-4, atol=1e-5)
