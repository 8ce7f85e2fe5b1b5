"""The frozen teachers of a distillation: which feeds which term, how they run, and what they give a step.

A teacher contributes to Eq. 7 through its pseudo labels (pixel level, Eq. 2, on x_l and x_mix),
its logits on x_mix (image level, Eq. 3–4) and its decoder features on x_mix (region level,
Eq. 5–6). ``teacher_roles`` resolves from a job's config which teacher feeds which term, once,
for the live step, the teacher-signal cache and its key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mgd_ray import losses
from mgd_ray.checkpoint import load_segmenter
from mgd_ray.config import CheckpointRef, DistillJobConfig
from mgd_ray.data.stream import Batch
from mgd_ray.models.deeplab import SegmenterOutput


@dataclass(frozen=True)
class TeacherRoles:
    """The teachers (by name) that feed each term of Eq. 7."""

    pixel_labeled: tuple[str, ...] = ()  # Eq. 2 on x_l
    pixel_unlabeled: tuple[str, ...] = ()  # Eq. 2 on x_mix
    image: tuple[str, ...] = ()  # Eq. 3-4
    region: tuple[str, ...] = ()  # Eq. 5-6

    @property
    def pixel(self) -> tuple[str, ...]:
        """Teachers whose pseudo labels feed Eq. 2 on x_l, x_mix or both, in order."""
        return tuple(dict.fromkeys(self.pixel_labeled + self.pixel_unlabeled))

    @classmethod
    def every(cls, names: tuple[str, ...]) -> TeacherRoles:
        """Every teacher in every role: what a cache holds for a study that varies the roles."""
        return cls(names, names, names, names)


def teacher_roles(cfg: DistillJobConfig) -> TeacherRoles:
    """Which teacher feeds which term: ``losses.pixel_teachers`` (default: every teacher) feed the
    pixel-level terms that are switched on, ``image_teachers`` and ``region_teachers`` theirs."""
    lc = cfg.losses
    pixel = lc.pixel_teachers if lc.pixel_teachers is not None else tuple(cfg.teachers)
    return TeacherRoles(
        pixel_labeled=tuple(pixel) if lc.pixel_labeled else (),
        pixel_unlabeled=tuple(pixel) if lc.pixel_unlabeled else (),
        image=tuple(lc.image_teachers),
        region=tuple(lc.region_teachers),
    )


@dataclass
class TeacherSignals:
    """What one teacher contributes to a step; fields no loss uses stay None."""

    pl_l: Tensor | None = None  # hard labels on x_l
    pl_mix: Tensor | None = None  # hard labels for x_mix, mixed from predictions on u0 and u1
    logits_mix: Tensor | None = None  # logits on x_mix (image level); a cache holds them GAP'd, (N, C)
    feats_mix: Tensor | None = None  # decoder features on x_mix (region level); a cache holds them pooled


def teacher_signals(
    teacher: nn.Module, b: Batch, pixel: bool, image: bool, region: bool, batched: bool
) -> TeacherSignals:
    """Run a frozen teacher on exactly the inputs whose outputs some loss uses.

    Teachers run under ``inference_mode``; the signals are cloned out of it because a loss may save
    them for its backward pass, which inference tensors forbid. ``batched`` runs one forward over
    the concatenated inputs, which is exact for an eval-mode teacher; a train-mode teacher (the
    official code's) normalises each input with its own batch statistics, so it gets one forward
    per input as in the official code.
    """
    with torch.inference_mode():
        s = _teacher_signals(teacher, b, pixel, image, region, batched)
    return TeacherSignals(*(None if t is None else t.clone() for t in (s.pl_l, s.pl_mix, s.logits_mix, s.feats_mix)))


def _teacher_signals(
    teacher: nn.Module, b: Batch, pixel: bool, image: bool, region: bool, batched: bool
) -> TeacherSignals:
    inputs: dict[str, Tensor] = {}
    if pixel:
        inputs |= {"u0": b.u0, "u1": b.u1, "x_l": b.x_l}
    if image or region:
        inputs["x_mix"] = b.x_mix
    if not inputs:
        return TeacherSignals()
    if batched:
        out = teacher(torch.cat(list(inputs.values())))
        sizes = [t.shape[0] for t in inputs.values()]
        logits = dict(zip(inputs, out.logits.split(sizes), strict=True))
        feats = dict(zip(inputs, out.features.split(sizes), strict=True))
    else:
        outs = {k: teacher(v) for k, v in inputs.items()}
        logits = {k: o.logits for k, o in outs.items()}
        feats = {k: o.features for k, o in outs.items()}
    s = TeacherSignals()
    if pixel:
        s.pl_l = logits["x_l"].argmax(dim=1)
        s.pl_mix = losses.mixed_pseudo_labels(logits["u0"], logits["u1"], b.m)
    if image:
        s.logits_mix = logits["x_mix"]
    if region:
        s.feats_mix = feats["x_mix"]
    return s


def step_signals(
    teachers: dict[str, nn.Module], b: Batch, roles: TeacherRoles, batched: bool
) -> dict[str, TeacherSignals]:
    """Every teacher's signals for one step, each computed for the roles it plays."""
    return {
        name: teacher_signals(t, b, name in roles.pixel, name in roles.image, name in roles.region, batched)
        for name, t in teachers.items()
    }


class FrozenTeacher(nn.Module):
    """A teacher run the fast way the config allows, returning float32 outputs either way.

    ``channels_last`` stores weights and inputs NHWC (what cuDNN's tensor-core kernels want; exact
    up to float rounding); ``bf16`` runs the forward under autocast (about 2× on tensor cores;
    pseudo labels and signals change slightly, so it is opt-in and part of the teacher-cache key).
    """

    def __init__(self, net: nn.Module, precision: str = "fp32", channels_last: bool = False):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.precision = precision
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> SegmenterOutput:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.net(x)
        return SegmenterOutput(*(t.float().contiguous() for t in out))


def load_teacher(
    ref: CheckpointRef,
    num_classes: int,
    device: torch.device,
    what: str = "teacher",
    mode: str = "eval",
    precision: str = "fp32",
    channels_last: bool = False,
) -> nn.Module:
    """One frozen teacher from its checkpoint, in ``mode`` (the official code keeps train mode).

    Always a ``FrozenTeacher``, so that it runs in its own ``precision`` whatever the step around it
    does: under a bf16 student's autocast (``optim.precision: bf16``) an fp32 teacher stays fp32, and
    its signals stay those a teacher-signal cache holds.
    """
    teacher = load_segmenter(ref.checkpoint, ref.model, num_classes, what=what).to(device)
    teacher.requires_grad_(False)
    return FrozenTeacher(teacher, precision, channels_last).train(mode == "train")


def load_teachers(cfg: DistillJobConfig, num_classes: int, device: torch.device) -> dict[str, nn.Module]:
    """A distillation's frozen teachers, run as its ``teacher_mode``/``_precision``/``_channels_last`` say."""
    return {
        name: load_teacher(
            ref,
            num_classes,
            device,
            f"teacher {name}",
            cfg.teacher_mode,
            cfg.teacher_precision,
            cfg.teacher_channels_last,
        )
        for name, ref in cfg.teachers.items()
    }
