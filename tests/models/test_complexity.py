"""Params and FLOPs: hand-computed counts, torchvision's published figures, the paper's Table 1."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from mgd_ray.models.backbones import build_backbone
from mgd_ray.models.complexity import (
    PAPER_TABLE1,
    ComplexityRow,
    complexity_table,
    count_flops,
    count_params,
    format_table,
)
from mgd_ray.models.deeplab import build_segmenter


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 16×16 out
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),  # 8×8 out
        nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16, bias=False),  # depthwise, 8×8 out
        nn.Conv2d(16, 4, 1),  # 8×8 out
    )


def test_count_params_by_hand():
    expected = (3 * 8 * 9 + 8) + 2 * 8 + 8 * 16 * 9 + 16 * 9 + (16 * 4 + 4)
    assert count_params(small_net()) == expected


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_count_flops_by_hand(device):
    # 2 · (Cin / groups) · Cout · k² · Hout · Wout per conv; BN, ReLU and bias adds are not counted.
    expected = 2 * (3 * 8 * 9 * 16 * 16 + 8 * 16 * 9 * 8 * 8 + 1 * 16 * 9 * 8 * 8 + 16 * 4 * 1 * 8 * 8)
    net = small_net().to(device)
    assert count_flops(net, (16, 16)) == expected
    assert count_flops(net, (16, 16), batch_size=3) == 3 * expected


def test_count_flops_restores_training_mode():
    net = small_net().train()
    count_flops(net, (8, 8))
    assert net.training
    net.eval()
    count_flops(net, (8, 8))
    assert not net.training


@pytest.mark.parametrize(
    ("name", "weights"),
    [
        ("resnet18", "ResNet18_Weights"),
        ("resnet101", "ResNet101_Weights"),
        ("wide_resnet50_2", "Wide_ResNet50_2_Weights"),
        ("mobilenet_v2", "MobileNet_V2_Weights"),
    ],
)
def test_flops_over_two_match_torchvision_published_gmacs(name, weights):
    # torchvision publishes each classifier's multiply-accumulates at 224×224 ("_ops", in billions).
    with torch.device("meta"):
        model = getattr(torchvision.models, name)()
    published = getattr(torchvision.models, weights).DEFAULT.meta["_ops"]
    assert count_flops(model, (224, 224)) / 2e9 == pytest.approx(published, abs=0.001)


def backbone_macs_and_bn_elements(name: str, stem: str, output_stride: int) -> tuple[float, float]:
    with torch.device("meta"):
        backbone = build_backbone(name, output_stride, stem=stem)
    bn_elements = []
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, inputs, out: bn_elements.append(inputs[0].numel()))
    macs = count_flops(backbone, (512, 512)) / 2
    return macs / 1e9, sum(bn_elements) / 1e9


@pytest.mark.parametrize("name", list(PAPER_TABLE1))
def test_paper_table1_is_backbone_macs(name):
    """The paper's "FLOPs" are backbone multiply-accumulates at 512×512 in PAPER_TABLE1's setting.

    Convolution MACs are within 0.5 % for the ResNets, 4 % under for MobileNetV2; adding the
    2 operations per BatchNorm element that thop counts brings all four within 1 %.
    """
    paper = PAPER_TABLE1[name]
    macs, bn_elements = backbone_macs_and_bn_elements(name, paper.stem, paper.output_stride)
    assert macs == pytest.approx(paper.gmacs, rel=0.005 if name != "mobilenet_v2" else 0.045)
    assert macs + 2 * bn_elements == pytest.approx(paper.gmacs, rel=0.01)
    with torch.device("meta"):
        params = count_params(build_backbone(name, paper.output_stride, stem=paper.stem))
    assert params / 1e6 == pytest.approx(paper.params_m, rel=0.001)


@pytest.mark.parametrize(
    ("name", "stem", "output_stride"),
    [("resnet101", "plain", 16), ("resnet18", "plain", 16), ("resnet18", "deep", 32), ("mobilenet_v2", "plain", 16)],
)
def test_other_settings_do_not_reproduce_the_paper(name, stem, output_stride):
    macs, _ = backbone_macs_and_bn_elements(name, stem, output_stride)
    assert abs(macs / PAPER_TABLE1[name].gmacs - 1) > 0.05


def test_paper_ratios_follow_from_table1():
    # Table 1's "(3.44× w.r.t. T_D)" etc. are ratios of these figures.
    t = PAPER_TABLE1
    assert t["resnet101"].gmacs / t["resnet18"].gmacs == pytest.approx(3.44, abs=0.005)
    assert t["wide_resnet50_2"].gmacs / t["mobilenet_v2"].gmacs == pytest.approx(59.95, abs=0.005)
    assert t["resnet101"].params_m / t["mobilenet_v2"].params_m == pytest.approx(23.55, abs=0.005)


def test_complexity_table_rows():
    rows = complexity_table(backbones=("resnet18", "mobilenet_v2"), num_classes=21, output_stride=16, stem="deep")
    assert [r.model for r in rows] == ["resnet18", "mobilenet_v2"]
    r18, mbv2 = rows
    assert isinstance(r18, ComplexityRow)
    assert (r18.stem, mbv2.stem, r18.output_stride, r18.input_size) == ("deep", "plain", 16, (512, 512))
    assert r18.backbone_params_m == pytest.approx(11_195_744 / 1e6)
    assert r18.backbone_gmacs == pytest.approx(r18.backbone_gflops / 2)
    assert r18.backbone_gmacs == pytest.approx(17.17, abs=0.01)
    assert mbv2.backbone_gmacs == pytest.approx(2.38, abs=0.01)  # output stride 16, not the paper's 32
    for r in rows:
        assert r.params_m > r.backbone_params_m and r.gflops > r.backbone_gflops


def test_whole_model_counts_equal_direct_counts():
    (row,) = complexity_table(backbones=("resnet18",), num_classes=21, input_size=(32, 48), output_stride=8)
    model = build_segmenter("resnet18", 21, 8)
    assert row.params_m == pytest.approx(count_params(model) / 1e6)
    assert row.gflops == pytest.approx(count_flops(model, (32, 48)) / 1e9)  # real CPU count, same as meta


def test_format_table():
    text = format_table(complexity_table(backbones=("resnet18", "mobilenet_v2"), input_size=(64, 64)))
    lines = text.splitlines()
    assert "params M" in lines[1] and "GMACs" in lines[1]
    assert lines[3].split()[:4] == ["resnet18", "plain", "16", "64x64"]
    assert lines[4].startswith("mobilenet_v2")
    assert len({len(line) for line in lines[:5]}) == 1  # fixed width
