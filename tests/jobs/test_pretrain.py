"""Pretraining on the built-in corpus: metrics by hand, weights that load into every segmenter, resume."""

import numpy as np
import pytest
import torch

from mgd_ray.checkpoint import load_state
from mgd_ray.config import ModelConfig, PretrainJobConfig
from mgd_ray.jobs.pretrain import BACKBONE_FILE, average_precision, run_pretrain
from mgd_ray.models.deeplab import build_segmenter


def test_average_precision_by_hand():
    scores = np.array([[0.9, 0.1], [0.8, 0.7], [0.3, 0.2], [0.1, 0.9]])
    targets = np.array([[1, 0], [0, 1], [1, 0], [0, 0]], np.float32)
    # label 0: hits at ranks 1 and 3 → (1/1 + 2/3) / 2; label 1: its one hit at rank 2 → 1/2
    assert average_precision(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 1 / 2) / 2)


def tiny(tmp_path, backbone: str, **schedule) -> PretrainJobConfig:
    return PretrainJobConfig(
        corpus={"num_images": 40, "num_val": 8, "size": 32},
        model={"backbone": backbone},
        schedule={"iterations": 4, "batch": 8, "eval_every": 2} | schedule,
        cache=tmp_path / "corpus",
        output=tmp_path / "out",
    )


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet18", "resnet34"])  # the quickstart's three
def test_pretrained_weights_load_into_segmenters_of_any_stride(tmp_path, backbone):
    reports = []
    final = run_pretrain(tiny(tmp_path, backbone), lambda m, c: reports.append((m, c)), tmp_path / "ckpt")
    assert [m["step"] for m, _ in reports] == [2, 4]
    assert 0 <= final["pretrain/label_accuracy"] <= 1 and 0 <= final["pretrain/mAP"] <= 1
    record = torch.load(reports[-1][1] / BACKBONE_FILE, weights_only=True)
    assert record["backbone"] == backbone and record["metrics"]["step"] == 4
    for stride in (16, 8):
        net = build_segmenter(
            ModelConfig(backbone=backbone, output_stride=stride), 4, pretrained=reports[-1][1] / BACKBONE_FILE
        )
        for key, value in record["state_dict"].items():
            torch.testing.assert_close(net.backbone.state_dict()[key], value, rtol=0, atol=0)


def test_a_resumed_pretraining_ends_where_an_uninterrupted_one_does(tmp_path):
    whole: list = []
    run_pretrain(tiny(tmp_path, "mobilenet_v2"), lambda m, c: whole.append((m, c)), tmp_path / "a")
    first = torch.load(whole[-1][1] / BACKBONE_FILE, weights_only=True)["state_dict"]
    resumed: list = []
    state = load_state(whole[0][1])  # the step-2 checkpoint
    run_pretrain(tiny(tmp_path, "mobilenet_v2"), lambda m, c: resumed.append((m, c)), tmp_path / "b", resume=state)
    assert [m["step"] for m, _ in resumed] == [4]
    assert resumed[-1][0] == whole[-1][0]
    for key, value in torch.load(resumed[-1][1] / BACKBONE_FILE, weights_only=True)["state_dict"].items():
        torch.testing.assert_close(value, first[key], rtol=0, atol=0)
