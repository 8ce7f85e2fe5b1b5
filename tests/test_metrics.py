"""Metrics against hand-computed confusion matrices and IoUs."""

import math

import pytest
import torch

from mgd_ray import metrics


def test_confusion_matrix_and_iou_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    conf = metrics.confusion_matrix(pred, target, num_classes=4)
    expected = torch.tensor([[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(conf, expected)
    iou = metrics.iou_per_class(conf)
    # class 0: tp 2, fp 1, fn 1 -> 2/4; class 1: 2/3; class 2: 1/2; class 3 absent -> NaN.
    assert iou[:3].tolist() == pytest.approx([0.5, 2 / 3, 0.5])
    assert math.isnan(iou[3].item())
    assert metrics.mean_iou(conf) == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert metrics.pixel_accuracy(conf) == pytest.approx(5 / 7)


def test_predicted_but_absent_class_counts_as_zero():
    target = torch.tensor([0, 0, 0, 0])
    pred = torch.tensor([0, 0, 1, 1])
    conf = metrics.confusion_matrix(pred, target, num_classes=2)
    assert metrics.iou_per_class(conf).tolist() == pytest.approx([0.5, 0.0])
    assert metrics.mean_iou(conf) == pytest.approx(0.25)


def test_accumulation_is_over_the_whole_split_not_per_image():
    cm = metrics.ConfusionMatrix(num_classes=2)
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 0, 0]))  # image 1: perfect
    cm.update(torch.tensor([1, 0]), torch.tensor([1, 1]))  # image 2
    # Pooled: class 0 tp 4, fp 1 -> 4/5; class 1 tp 1, fn 1 -> 1/2.
    assert cm.iou() == pytest.approx([0.8, 0.5])
    assert cm.miou() == pytest.approx(0.65)


def test_bad_ground_truth_value_is_reported():
    with pytest.raises(ValueError, match="outside \\[0, 3\\)"):
        metrics.confusion_matrix(torch.tensor([0]), torch.tensor([7]), num_classes=3)


def test_sliding_window_averages_overlaps_and_crops_back():
    calls = []

    def predict(x):
        calls.append(tuple(x.shape))
        # Logit of class 0 = the input's first channel, class 1 = a constant per window call.
        return torch.cat([x[:, :1], torch.full_like(x[:, :1], float(len(calls)))], dim=1)

    image = torch.arange(2 * 3 * 5 * 7, dtype=torch.float32).reshape(2, 3, 5, 7)
    out = metrics.sliding_window_logits(predict, image, num_classes=2, window=4, stride=3)
    assert out.shape == (2, 2, 5, 7)
    # Windows start at y in {0, 1} and x in {0, 3}: four calls of 4x4 crops.
    assert calls == [(2, 3, 4, 4)] * 4
    torch.testing.assert_close(out[:, 0], image[:, 0])
    # Window index k (1-based) covers rows y..y+3, cols x..x+3; pixel (0, 0) is only in window 1,
    # pixel (4, 6) only in window 4, pixel (2, 3) in all four -> mean 2.5.
    assert out[0, 1, 0, 0].item() == 1.0
    assert out[0, 1, 4, 6].item() == 4.0
    assert out[0, 1, 2, 3].item() == 2.5


def test_sliding_window_pads_small_images():
    image = torch.ones(1, 3, 3, 2)
    out = metrics.sliding_window_logits(lambda x: x[:, :2] * 2, image, num_classes=2, window=4)
    assert out.shape == (1, 2, 3, 2)
    assert torch.equal(out, torch.full((1, 2, 3, 2), 2.0))
