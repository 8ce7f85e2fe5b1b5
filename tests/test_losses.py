"""Losses against values computed independently (numpy loops or by hand)."""

import math

import numpy as np
import pytest
import torch

from mgd_ray import losses


def np_log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def np_ce(logits: np.ndarray, target: np.ndarray, ignore: int = 255) -> float:
    """Mean over non-ignored pixels of -log softmax(logits)[target], with explicit loops."""
    lsm = np_log_softmax(logits, axis=1)
    total, count = 0.0, 0
    n, _, h, w = logits.shape
    for b in range(n):
        for i in range(h):
            for j in range(w):
                t = target[b, i, j]
                if t == ignore:
                    continue
                total -= lsm[b, t, i, j]
                count += 1
    return total / count


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_supervised_loss_by_hand():
    # One pixel, two classes, logits (0, ln 3): p(class 1) = 3/4, so CE = -ln(3/4).
    logits = torch.tensor([0.0, math.log(3.0)]).reshape(1, 2, 1, 1)
    assert losses.supervised_loss(logits, torch.tensor([[[1]]])).item() == pytest.approx(-math.log(0.75))
    assert losses.supervised_loss(logits, torch.tensor([[[0]]])).item() == pytest.approx(-math.log(0.25))


def test_supervised_loss_ignores_255(rng):
    logits = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    target = rng.integers(0, 3, size=(2, 4, 4))
    target[0, :2] = 255
    got = losses.supervised_loss(torch.from_numpy(logits), torch.from_numpy(target)).item()
    assert got == pytest.approx(np_ce(logits, target), rel=1e-5)


def test_pixel_consistency_uses_teacher_argmax(rng):
    s = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    t = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    got = losses.pixel_consistency_loss(torch.from_numpy(s), torch.from_numpy(t)).item()
    assert got == pytest.approx(np_ce(s, t.argmax(axis=1)), rel=1e-5)


def test_pixel_consistency_precomputed_labels_with_ignore(rng):
    s = rng.normal(size=(1, 3, 3, 3)).astype(np.float32)
    labels = np.array([[[0, 1, 2], [255, 255, 1], [2, 0, 255]]])
    got = losses.pixel_consistency_loss(torch.from_numpy(s), torch.from_numpy(labels).to(torch.uint8)).item()
    assert got == pytest.approx(np_ce(s, labels), rel=1e-5)


def test_image_level_loss_by_hand():
    # Student logits: class 0 map [[1,3],[5,7]] -> GAP 4; class 1 all 2 -> GAP 2.
    s = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]], [[2.0, 2.0], [2.0, 2.0]]]])
    # Teacher: class 0 GAP 1, class 1 GAP 5.
    t = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[0.0, 10.0], [0.0, 10.0]]]])
    # |4-1| + |2-5| = 6 summed; mean over 2 classes = 3.
    assert losses.image_level_loss(s, t, reduction="sum").item() == pytest.approx(6.0)
    assert losses.image_level_loss(s, t, reduction="mean").item() == pytest.approx(3.0)
    # Already pooled teacher vectors give the same value (the cache path).
    assert losses.image_level_loss(s, t.mean(dim=(2, 3)), reduction="sum").item() == pytest.approx(6.0)
    with pytest.raises(ValueError, match="reduction"):
        losses.image_level_loss(s, t, reduction="max")


def test_image_level_sum_over_batch(rng):
    s = rng.normal(size=(3, 4, 5, 5))
    t = rng.normal(size=(3, 4, 5, 5))
    expected = sum(abs(s[b, c].mean() - t[b, c].mean()) for b in range(3) for c in range(4))
    got = losses.image_level_loss(torch.from_numpy(s), torch.from_numpy(t)).item()
    assert got == pytest.approx(expected, rel=1e-9)
    got_mean = losses.image_level_loss(torch.from_numpy(s), torch.from_numpy(t), reduction="mean").item()
    assert got_mean == pytest.approx(expected / 12, rel=1e-9)


def test_self_similarity_by_hand():
    # pool_size equal to the map size: no pooling. Vectors v0=(1,0), v1=(0,2), v2=(1,1), v3=(-3,0).
    feats = torch.tensor([[[[1.0, 0.0], [1.0, -3.0]], [[0.0, 2.0], [1.0, 0.0]]]])
    m = losses.self_similarity(feats, pool_size=2)[0]
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[1, 0, r, -1], [0, 1, r, 0], [r, r, 1, -r], [-1, 0, -r, 1]], dtype=torch.float32)
    torch.testing.assert_close(m, expected, atol=1e-6, rtol=0)


def np_region_loss(fs: np.ndarray, ft: np.ndarray, p: int) -> float:
    """Independent Eq. 5-6: block-average pooling (sizes divisible), cosine loops, squared error mean."""

    def pooled(f):
        n, c, h, w = f.shape
        return f.reshape(n, c, p, h // p, p, w // p).mean(axis=(3, 5)).reshape(n, c, p * p)

    vs, vt = pooled(fs), pooled(ft)
    err = []
    for b in range(fs.shape[0]):
        for i in range(p * p):
            for j in range(p * p):
                ms = vs[b, :, i] @ vs[b, :, j] / (np.linalg.norm(vs[b, :, i]) * np.linalg.norm(vs[b, :, j]))
                mt = vt[b, :, i] @ vt[b, :, j] / (np.linalg.norm(vt[b, :, i]) * np.linalg.norm(vt[b, :, j]))
                err.append((ms - mt) ** 2)
    return float(np.mean(err))


def test_region_level_loss_matches_independent_formula(rng):
    fs = rng.normal(size=(2, 5, 6, 6))
    ft = rng.normal(size=(2, 5, 6, 6))
    got = losses.region_level_loss(torch.from_numpy(fs), torch.from_numpy(ft), pool_size=3).item()
    assert got == pytest.approx(np_region_loss(fs, ft, 3), rel=1e-9)
    # Pooled teacher vectors (the cache path) give the same value.
    vt = losses.region_vectors(torch.from_numpy(ft), 3)
    assert losses.region_level_loss(torch.from_numpy(fs), vt, pool_size=3).item() == pytest.approx(got, rel=1e-12)


def test_region_loss_zero_for_scaled_teacher(rng):
    # Cosine similarity ignores positive scaling of features, so a scaled copy gives zero loss.
    f = torch.from_numpy(rng.normal(size=(1, 4, 8, 8)))
    assert losses.region_level_loss(f, 3.0 * f, pool_size=4).item() == pytest.approx(0.0, abs=1e-12)


def test_cps_loss_is_symmetric_sum(rng):
    a = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    b = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    got = losses.cps_loss(torch.from_numpy(a), torch.from_numpy(b)).item()
    assert got == pytest.approx(np_ce(a, b.argmax(1)) + np_ce(b, a.argmax(1)), rel=1e-5)


def test_mean_teacher_loss_by_hand():
    # Student probs (1/2, 1/2), teacher probs (1/4, 3/4): MSE = ((1/4)^2 + (1/4)^2) / 2.
    s = torch.zeros(1, 2, 1, 1)
    t = torch.tensor([0.0, math.log(3.0)]).reshape(1, 2, 1, 1)
    assert losses.mean_teacher_loss(s, t).item() == pytest.approx(1 / 16)


def test_kd_loss_matches_numpy(rng):
    s = rng.normal(size=(2, 4, 3, 3))
    t = rng.normal(size=(2, 4, 3, 3))
    temp = 2.0
    ls, lt = np_log_softmax(s / temp, 1), np_log_softmax(t / temp, 1)
    expected = (np.exp(lt) * (lt - ls)).sum(axis=1).mean() * temp**2
    got = losses.kd_loss(torch.from_numpy(s), torch.from_numpy(t), temperature=temp).item()
    assert got == pytest.approx(expected, rel=1e-9)
    assert losses.kd_loss(torch.from_numpy(s), torch.from_numpy(s), 3.0).item() == pytest.approx(0.0, abs=1e-12)


def test_cwd_loss_matches_numpy(rng):
    s = rng.normal(size=(2, 3, 4, 5))
    t = rng.normal(size=(2, 3, 4, 5))
    tau = 4.0
    total = 0.0
    for b in range(2):
        for c in range(3):
            ls = np_log_softmax(s[b, c].reshape(1, -1) / tau, 1)[0]
            lt = np_log_softmax(t[b, c].reshape(1, -1) / tau, 1)[0]
            total += (np.exp(lt) * (lt - ls)).sum()
    expected = tau**2 * total / 6
    got = losses.cwd_loss(torch.from_numpy(s), torch.from_numpy(t), tau=tau).item()
    assert got == pytest.approx(expected, rel=1e-9)


def test_ohem_keeps_only_hard_pixels():
    # Four pixels, two classes; true-class probabilities 0.9, 0.8, 0.6, 0.3.
    probs = torch.tensor([0.9, 0.8, 0.6, 0.3])
    logits = torch.stack([torch.zeros(4), torch.log(probs / (1 - probs))]).reshape(1, 2, 2, 2)
    target = torch.ones(1, 2, 2, dtype=torch.long)
    # min_kept=1: threshold = max(0.7, 0.3) = 0.7 -> pixels with p <= 0.7 kept: 0.6 and 0.3.
    got = losses.ohem_cross_entropy(logits, target, thresh=0.7, min_kept=1).item()
    assert got == pytest.approx(-(math.log(0.6) + math.log(0.3)) / 2, rel=1e-5)
    # min_kept=3: the 3rd smallest probability 0.8 > 0.7 becomes the threshold -> 0.8, 0.6, 0.3 kept.
    got = losses.ohem_cross_entropy(logits, target, thresh=0.7, min_kept=3).item()
    assert got == pytest.approx(-(math.log(0.8) + math.log(0.6) + math.log(0.3)) / 3, rel=1e-5)
    # Fewer valid pixels than min_kept: plain CE over all of them.
    got = losses.ohem_cross_entropy(logits, target, thresh=0.7, min_kept=10).item()
    assert got == pytest.approx(-np.log(probs.numpy()).mean(), rel=1e-5)


@pytest.mark.parametrize("images", [1, 2])
def test_ohem_supervised_loss_keeps_50000_pixels_per_image_of_the_batch(images):
    """The official ``min_kept = 50000 * batch_size // world_size``: 50,000 per image on its GPU."""
    # 256 x 256 = 65,536 pixels per image whose true-class probabilities are all above 0.7, spread
    # uniformly: OHEM keeps exactly the 50,000 · images hardest (lowest-probability) pixels.
    n = images * 256 * 256
    probs = torch.linspace(0.71, 0.99, n, dtype=torch.float64)[
        torch.randperm(n, generator=torch.Generator().manual_seed(0))
    ]
    logits = torch.stack([torch.zeros(n, dtype=torch.float64), torch.log(probs / (1 - probs))])
    logits = logits.reshape(2, images, 256, 256).transpose(0, 1)
    target = torch.ones(images, 256, 256, dtype=torch.long)
    kept = probs.sort().values[: 50_000 * images]
    got = losses.ohem_supervised_loss(logits, target).item()
    assert got == pytest.approx(-torch.log(kept).mean().item(), rel=1e-9)


@pytest.mark.parametrize(
    "fn",
    [
        lambda s, t: losses.pixel_consistency_loss(s, t),
        lambda s, t: losses.image_level_loss(s, t),
        lambda s, t: losses.region_level_loss(s, t, pool_size=2),
        lambda s, t: losses.mean_teacher_loss(s, t),
        lambda s, t: losses.kd_loss(s, t, 2.0),
        lambda s, t: losses.cwd_loss(s, t, 4.0),
    ],
    ids=["pixel", "image", "region", "mean_teacher", "kd", "cwd"],
)
def test_gradient_reaches_student_only(fn):
    torch.manual_seed(0)
    student = torch.randn(2, 3, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = fn(student, teacher)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_mixed_pseudo_labels_by_hand():
    # Two classes, one row of 3 pixels; m = 1 takes u1's prediction (u0·(1−m) + u1·m).
    u0 = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]]])  # argmax 0, 1, 0
    u1 = torch.tensor([[[[0.0, 3.0, 0.0]], [[1.0, 0.0, 2.0]]]])  # argmax 1, 0, 1
    m = torch.tensor([[[[0.0, 1.0, 1.0]]]])
    assert losses.mixed_pseudo_labels(u0, u1, m).tolist() == [[[0, 0, 1]]]


def test_cps_loss_with_given_pseudo_labels(rng):
    # Each branch learns the other branch's labels (here its mixed pseudo labels), not its own.
    a = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    b = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    pl_a, pl_b = rng.integers(0, 3, (1, 4, 4)), rng.integers(0, 3, (1, 4, 4))
    got = losses.cps_loss(
        torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(pl_a), torch.from_numpy(pl_b)
    ).item()
    assert got == pytest.approx(np_ce(a, pl_b) + np_ce(b, pl_a), rel=1e-5)


def _bf16_cases() -> dict:
    """Each loss term on fixed fp32 inputs shaped like a small batch (student, teacher, labels)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 8, 8, generator=g) * 3
    t = torch.randn(2, 5, 8, 8, generator=g) * 3
    fs, ft = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    y = torch.randint(0, 5, (2, 8, 8), generator=g)
    m = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    return {
        "supervised (Eq. 1)": (losses.supervised_loss, (s, y)),
        "pixel consistency (Eq. 2)": (losses.pixel_consistency_loss, (s, t)),
        "image level (Eq. 3-4, sum)": (losses.image_level_loss, (s, t)),
        "region level (Eq. 5-6)": (losses.region_level_loss, (fs, ft, 4)),
        "cps": (losses.cps_loss, (s, t)),
        "mean teacher": (losses.mean_teacher_loss, (s, t)),
        "kd": (losses.kd_loss, (s, t, 2.0)),
        "cwd": (losses.cwd_loss, (s, t, 4.0)),
        "ohem": (losses.ohem_cross_entropy, (s, y, 0.7, 10)),
        "mixed pseudo labels": (losses.mixed_pseudo_labels, (s, t, m)),
    }


@pytest.mark.parametrize("name", list(_bf16_cases()))
def test_under_bf16_autocast_each_loss_is_computed_in_fp32_from_bf16_network_outputs(name):
    """``optim.precision: bf16``: the networks' outputs arrive in bf16; the loss itself runs in fp32
    (the same value as fp32 arithmetic on those rounded inputs, to the bit), so its only error against
    fp32 training is the rounding of its inputs to bf16's 8 significant bits."""
    loss, args = _bf16_cases()[name]
    exact = loss(*args)
    output = lambda a: isinstance(a, torch.Tensor) and a.is_floating_point() and a.shape[1] > 1  # not the CutMix mask
    rounded = tuple(a.bfloat16() if output(a) else a for a in args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(*rounded)
    same_in_fp32 = loss(*(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in rounded))
    assert got.dtype == exact.dtype
    assert torch.equal(got, same_in_fp32)
    if exact.is_floating_point():
        assert abs(got.item() - exact.item()) <= 2e-3 * abs(exact.item()), (got.item(), exact.item())  # ~ 2^-9
    else:  # hard labels: the argmax of rounded logits differs only where two classes were within bf16's rounding
        assert (got != exact).float().mean().item() <= 0.02


def test_without_fp32_the_region_loss_matmul_would_run_in_bf16():
    """The guard matters: autocast alone would run Eq. 5's cosine self-similarity in bf16 (a matmul)."""
    _, (fs, ft, pool) = _bf16_cases()["region level (Eq. 5-6)"]
    fs, ft = fs.bfloat16(), ft.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unguarded = losses.region_level_loss.__wrapped__(fs, ft, pool)
        guarded = losses.region_level_loss(fs, ft, pool)
    assert guarded.dtype == torch.float32
    assert not torch.equal(unguarded.float(), guarded)
