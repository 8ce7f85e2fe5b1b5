"""Loss functions of MGD (Qin et al., ECCV 2022, Eq. 1-7) and of the baselines it is compared with.

Conventions: logits are (N, C, H, W); labels are (N, H, W) integer tensors with ``ignore_index``
for pixels without a label. Every teacher-side input is detached here, so a teacher never receives
gradient even when the caller forgets ``no_grad``.

Losses whose normaliser varies between batches (valid pixels of a CE, OHEM's kept pixels, a sum
over the batch) take ``batch_reduction``: left out, they reduce over the batch they are given; under DDP,
``batch_reduction=mgd_ray.distributed.global_batch(env)`` makes them reduce over the global batch of all
ranks. The other losses average over a count fixed by the shapes (images, classes, all pixels),
the same on every rank, so per-rank means already average to the global one.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Literal, ParamSpec, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mgd_ray.data.datasets import IGNORE_INDEX
from mgd_ray.data.transforms import cutmix

P = ParamSpec("P")
R = TypeVar("R")


def fp32(loss: Callable[P, R]) -> Callable[P, R]:
    """Run ``loss`` in fp32 under bf16 autocast (``optim.precision: bf16``): its floating tensor arguments
    are cast to float32 and autocast is off inside, so softmax/CE, the cosine self-similarity's matmul and
    the image-level sum keep fp32 precision while the networks ran in bf16. Without autocast, a no-op.

    (``torch.amp.custom_fwd(cast_inputs=...)`` does this for one device type; a loss here may run under
    either, so this checks both.)
    """

    @functools.wraps(loss)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        active = [d for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
        if not active:
            return loss(*args, **kwargs)
        cast = lambda v: v.float() if isinstance(v, Tensor) and v.is_floating_point() else v
        with contextlib.ExitStack() as stack:
            for device in active:
                stack.enter_context(torch.autocast(device, enabled=False))
            return loss(*(cast(a) for a in args), **{k: cast(v) for k, v in kwargs.items()})  # type: ignore[arg-type]

    return wrapper


class BatchReduction(Protocol):
    """Reduces this process's part of a batch loss as a loss over a larger (global) batch."""

    def mean(self, total: Tensor, count: Tensor) -> Tensor:
        """The share of ``Σ loss / Σ count`` over the global batch, given this part's sum and count."""
        ...

    def sum(self, total: Tensor) -> Tensor:
        """The share of ``Σ loss`` over the global batch, given this part's sum."""
        ...


def _cross_entropy(logits: Tensor, target: Tensor, ignore_index: int, batch_reduction: BatchReduction | None) -> Tensor:
    """CE averaged over the non-ignored pixels of this batch, or of the global batch with ``batch_reduction``."""
    if batch_reduction is None:
        return F.cross_entropy(logits, target, ignore_index=ignore_index)
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return batch_reduction.mean(total, (target != ignore_index).sum())


@fp32
def supervised_loss(
    logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX, batch_reduction: BatchReduction | None = None
) -> Tensor:
    """Eq. 1: pixel-wise cross-entropy against ground truth, averaged over labeled pixels."""
    return _cross_entropy(logits, target.long(), ignore_index, batch_reduction)


@fp32
def ohem_cross_entropy(
    logits: Tensor,
    target: Tensor,
    thresh: float = 0.7,
    min_kept: int = 50_000,
    ignore_index: int = IGNORE_INDEX,
    batch_reduction: BatchReduction | None = None,
) -> Tensor:
    """Online hard-example-mined CE, used by the official code for Cityscapes' ground-truth term.

    Pixels whose probability for the true class exceeds ``max(thresh, p_k)`` are dropped, where
    ``p_k`` is the ``min_kept``-th smallest true-class probability, so at least ``min_kept`` pixels
    always contribute (TorchSemiSeg ``ProbOhemCrossEntropy2d``). With ``batch_reduction``, the mean runs over
    the kept pixels of the global batch, but pixels are mined per batch part, ``min_kept`` per
    part, as the official code mines per GPU.
    """
    target = target.long()
    valid = target != ignore_index
    num_valid = int(valid.sum())
    if num_valid >= max(min_kept, 1):
        with torch.no_grad():
            true_prob = logits.softmax(dim=1).gather(1, target.clamp(0, logits.shape[1] - 1).unsqueeze(1))
            true_prob = true_prob.squeeze(1).masked_fill(~valid, 1.0)
            threshold = torch.tensor(thresh, device=logits.device, dtype=true_prob.dtype)
            if min_kept > 0:
                kth = torch.kthvalue(true_prob[valid], min_kept).values
                threshold = torch.maximum(kth, threshold)
            target = target.masked_fill(true_prob > threshold, ignore_index)
    return _cross_entropy(logits, target, ignore_index, batch_reduction)


# The official Cityscapes jobs mine ``50000 * batch_size // world_size`` pixels per GPU, their batch_size
# being the total over GPUs: 50,000 per labeled image of a GPU's batch (100,000 with 16 images on 8 GPUs).
OHEM_MIN_KEPT_PER_IMAGE = 50_000


@fp32
def ohem_supervised_loss(
    logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX, batch_reduction: BatchReduction | None = None
) -> Tensor:
    """Eq. 1 with OHEM as the official code applies it on Cityscapes: threshold 0.7 and
    ``OHEM_MIN_KEPT_PER_IMAGE`` per image of this process's batch, mined per process."""
    min_kept = OHEM_MIN_KEPT_PER_IMAGE * logits.shape[0]
    return ohem_cross_entropy(logits, target, 0.7, min_kept, ignore_index, batch_reduction)


def hard_pseudo_labels(teacher: Tensor) -> Tensor:
    """Hard pseudo labels: argmax over classes of (N, C, H, W) logits, or labels passed through."""
    if teacher.is_floating_point():
        return teacher.detach().argmax(dim=1)
    return teacher.long()


@fp32
def pixel_consistency_loss(
    student_logits: Tensor,
    teacher: Tensor,
    ignore_index: int = IGNORE_INDEX,
    batch_reduction: BatchReduction | None = None,
) -> Tensor:
    """Eq. 2: CE between the student and one teacher's hard pseudo labels.

    ``teacher`` is either the teacher's logits (argmax taken here) or precomputed pseudo labels
    (N, H, W) such as the CutMix-ed labels ``argmax(T(u0)(1-m) + T(u1)m)``; pixels equal to
    ``ignore_index`` in precomputed labels do not contribute. The paper's L_P sums this over T_D and
    T_W; the caller adds one term per teacher.
    """
    return _cross_entropy(student_logits, hard_pseudo_labels(teacher), ignore_index, batch_reduction)


def global_semantic_vector(logits: Tensor) -> Tensor:
    """Eq. 3: K_G = GAP over H x W of the class logits, one value per class -> (N, C)."""
    return logits.mean(dim=(2, 3))


@fp32
def image_level_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    reduction: Literal["sum", "mean"] = "sum",
    batch_reduction: BatchReduction | None = None,
) -> Tensor:
    """Eq. 3-4, image-level semantic-sensitive loss: L1 between GAP'd student and teacher logits.

    ``reduction="sum"`` sums |k_S - k_T| over batch and classes as the official code does (and as
    its lambda_1 = 0.002 is tuned for); ``"mean"`` is the paper's 1/N average over classes, also
    averaged over the batch. ``teacher_logits`` may be an already pooled (N, C) tensor. With
    ``batch_reduction``, "sum" sums over the global batch, so lambda_1 weighs the same total on any number of
    workers (the official code sums per GPU, and its DDP then averages over GPUs).
    """
    k_s = global_semantic_vector(student_logits)
    k_t = teacher_logits.detach()
    if k_t.dim() == 4:
        k_t = global_semantic_vector(k_t)
    diff = (k_s - k_t).abs()
    if reduction == "sum":
        return diff.sum() if batch_reduction is None else batch_reduction.sum(diff.sum())
    if reduction == "mean":
        return diff.mean()
    raise ValueError(f"image_level_loss: reduction must be 'sum' or 'mean', got {reduction!r}")


def region_vectors(feats: Tensor, pool_size: int) -> Tensor:
    """Regional content vectors V (N, C, H_v*W_v): adaptive average pooling of decoder features.

    The official code has no learned projection head here, only the pooling (method notes).
    """
    return F.adaptive_avg_pool2d(feats, pool_size).flatten(2)


def self_similarity(feats: Tensor, pool_size: int) -> Tensor:
    """Eq. 5: cosine self-similarity M (N, H_v*W_v, H_v*W_v) of the pooled decoder features.

    ``feats`` are (N, C, H, W) decoder features, or vectors already pooled to (N, C, H_v*W_v).
    """
    v = feats if feats.dim() == 3 else region_vectors(feats, pool_size)
    v = F.normalize(v, dim=1)
    return v.transpose(1, 2) @ v


@fp32
def region_level_loss(student_feats: Tensor, teacher_feats: Tensor, pool_size: int = 7) -> Tensor:
    """Eq. 5-6, region-level content-aware loss: MSE between student and teacher M matrices.

    Averaged over the (H_v W_v)^2 entries of Eq. 6 and over the batch. ``teacher_feats`` may be
    pooled vectors (N, C, H_v*W_v), e.g. from a teacher-signal cache.
    """
    m_s = self_similarity(student_feats, pool_size)
    m_t = self_similarity(teacher_feats.detach(), pool_size)
    return F.mse_loss(m_s, m_t)


@fp32
def mixed_pseudo_labels(logits_u0: Tensor, logits_u1: Tensor, m: Tensor) -> Tensor:
    """Hard labels for x_mix from predictions on its sources: argmax(T(u0)·(1−m) + T(u1)·m) (method notes)."""
    return cutmix(logits_u0, logits_u1, m).argmax(dim=1)


@fp32
def cps_loss(
    logits_1: Tensor,
    logits_2: Tensor,
    pseudo_1: Tensor | None = None,
    pseudo_2: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    batch_reduction: BatchReduction | None = None,
) -> Tensor:
    """Cross pseudo supervision (Chen et al., CVPR 2021): each branch learns the other's hard labels.

    Returns CE(logits_1, ŷ_2) + CE(logits_2, ŷ_1); the caller multiplies by the CPS weight. ŷ_k is
    the argmax of ``logits_k`` unless ``pseudo_k`` gives branch k's labels, as on CutMix-ed images,
    where they are ``mixed_pseudo_labels`` of the branch's predictions on u0 and u1.
    """
    target_1 = logits_1 if pseudo_1 is None else pseudo_1
    target_2 = logits_2 if pseudo_2 is None else pseudo_2
    return pixel_consistency_loss(logits_1, target_2, ignore_index, batch_reduction) + pixel_consistency_loss(
        logits_2, target_1, ignore_index, batch_reduction
    )


@fp32
def mean_teacher_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Mean Teacher consistency (Tarvainen & Valpola, 2017): MSE between class probabilities."""
    return F.mse_loss(student_logits.softmax(dim=1), teacher_logits.detach().softmax(dim=1))


@fp32
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Pixel-wise KD (Hinton et al., 2015): T^2 * KL(p_T || p_S) over classes, mean over pixels."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return kl.mean() * t * t


@fp32
def cwd_loss(student_logits: Tensor, teacher_logits: Tensor, tau: float = 4.0) -> Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021).

    Each channel's map is turned into a distribution over the H*W locations by a softmax at
    temperature tau; loss = tau^2 * KL(teacher || student) summed over locations, averaged over
    the N*C channel maps.
    """
    n, c = student_logits.shape[:2]
    log_p_s = F.log_softmax(student_logits.reshape(n * c, -1) / tau, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().reshape(n * c, -1) / tau, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum()
    return kl * tau * tau / (n * c)
