"""DeepLabv3+: output shapes, ASPP as the official code wires it, decoder, init, attributes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mgd_ray.config import ModelConfig
from mgd_ray.models.deeplab import ASPP, DeepLabV3Plus, SegmenterOutput, build_segmenter


@pytest.fixture(scope="module")
def r18() -> DeepLabV3Plus:
    torch.manual_seed(0)
    return build_segmenter("resnet18", num_classes=5)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_logits_at_input_size_for_odd_input(backbone, output_stride):
    with torch.device("meta"):
        model = build_segmenter(backbone, num_classes=7, output_stride=output_stride)
    out = model.eval()(torch.zeros(2, 3, 65, 49, device="meta"))
    assert isinstance(out, SegmenterOutput)
    assert out.logits.shape == (2, 7, 65, 49)
    assert out.features.shape == (2, 256, 17, 13)  # ⌈65/4⌉ × ⌈49/4⌉, the stride-4 low-level size


@pytest.mark.parametrize(("backbone", "output_stride"), [("resnet18", 16), ("mobilenet_v2", 8)])
def test_real_forward_on_odd_input(backbone, output_stride):
    torch.manual_seed(0)
    out = build_segmenter(backbone, num_classes=7, output_stride=output_stride)(torch.randn(2, 3, 33, 25))
    assert out.logits.shape == (2, 7, 33, 25) and out.features.shape == (2, 256, 9, 7)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("backbone", ["resnet101", "wide_resnet50_2", "resnet50", "resnet34"])
def test_large_backbones_shapes_on_meta(backbone):
    with torch.device("meta"):
        model = build_segmenter(backbone, num_classes=21, stem="deep")
    out = model.eval()(torch.zeros(2, 3, 64, 64, device="meta"))
    assert out.logits.shape == (2, 21, 64, 64) and out.features.shape == (2, 256, 16, 16)


def test_logits_are_upsampled_classifier_of_features(r18):
    r18.eval()
    x = torch.randn(1, 3, 33, 33)
    out = r18(x)
    expected = F.interpolate(r18.classifier(out.features), size=(33, 33), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out.logits, expected)
    assert out.features.min() >= 0  # decoder features end in ReLU, before the classifier


@pytest.mark.parametrize(("output_stride", "rates"), [(8, (12, 24, 36)), (16, (6, 12, 18)), (32, (3, 6, 9))])
def test_aspp_rates_scale_with_output_stride(output_stride, rates):
    with torch.device("meta"):
        model = build_segmenter("resnet18", 3, output_stride)
    convs = model.head.aspp.map_convs
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (3, 3), (3, 3)]
    assert tuple(c.dilation[0] for c in convs[1:]) == rates
    assert all(c.padding == c.dilation for c in convs[1:])


def test_official_mobilenet_head_is_expressible():
    with torch.device("meta"):
        model = build_segmenter("mobilenet_v2", 21, output_stride=32, aspp_rates=(6, 12, 18), low_level_proj=24)
    assert tuple(c.dilation[0] for c in model.head.aspp.map_convs[1:]) == (6, 12, 18)
    assert model.head.reduce[0].in_channels == 24 and model.head.reduce[0].out_channels == 24
    assert model.head.fuse[0][0].in_channels == 256 + 24


def test_aspp_structure_pool_is_added_not_concatenated():
    aspp = ASPP(in_channels=32, channels=16)
    assert aspp.red_conv.in_channels == 4 * 16  # four map branches; the pooling branch is not concatenated
    assert aspp.pool_red_conv.in_channels == 16 and aspp.pool_red_conv.out_channels == 16
    assert isinstance(aspp.act, nn.LeakyReLU)


def randomize_bn(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)


def test_aspp_with_zero_pool_projection_equals_the_map_path():
    torch.manual_seed(0)
    aspp = ASPP(in_channels=8, channels=6, rates=(1, 2, 3)).eval()
    randomize_bn(aspp)
    nn.init.zeros_(aspp.pool_red_conv.weight)
    x = torch.randn(2, 8, 9, 7)
    maps = torch.cat([conv(x) for conv in aspp.map_convs], dim=1)
    no_pool = F.leaky_relu(aspp.red_bn(aspp.red_conv(F.leaky_relu(aspp.map_bn(maps)))))
    torch.testing.assert_close(aspp(x), no_pool)


def test_aspp_pool_branch_adds_a_spatially_constant_term():
    torch.manual_seed(0)
    aspp = ASPP(in_channels=8, channels=6, rates=(1, 2, 3)).eval()
    randomize_bn(aspp)
    nn.init.zeros_(aspp.red_conv.weight)  # silence the map branches: what is left is the pooled term
    x = torch.randn(2, 8, 9, 7)
    out = aspp(x)
    pooled = x.mean(dim=(2, 3), keepdim=True)
    term = aspp.pool_red_conv(F.leaky_relu(aspp.pool_bn(aspp.pool_conv(pooled))))
    torch.testing.assert_close(out, F.leaky_relu(aspp.red_bn(term)).expand_as(out))
    assert out.std(dim=(2, 3)).max() < 1e-6


def test_decoder_structure(r18):
    head = r18.head
    assert (head.reduce[0].in_channels, head.reduce[0].out_channels, head.reduce[0].kernel_size) == (64, 48, (1, 1))
    assert head.aspp.map_convs[0].in_channels == 512
    convs = [m for m in head.fuse.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(304, 256, (3, 3)), (256, 256, (3, 3))]
    assert (r18.classifier.in_channels, r18.classifier.out_channels) == (256, 5)
    assert r18.classifier.bias is not None


def test_head_kaiming_init_and_bn_init(r18):
    big = r18.head.aspp.map_convs[1]  # 512 × 3 × 3 fan-in, 256 × 512 × 9 weights: a tight std estimate
    assert big.weight.std().item() == pytest.approx(math.sqrt(2 / (512 * 9)), rel=0.02)
    fuse = r18.head.fuse[0][0]
    assert fuse.weight.std().item() == pytest.approx(math.sqrt(2 / (304 * 9)), rel=0.02)
    for m in r18.head.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_attributes(r18):
    assert (r18.backbone_name, r18.num_classes, r18.output_stride, r18.stem) == ("resnet18", 5, 16, "plain")
    assert isinstance(r18.backbone, nn.Module) and isinstance(r18.head, nn.Module)
    with torch.device("meta"):
        deep = build_segmenter("resnet101", 21, output_stride=8, stem="deep")
    assert (deep.backbone_name, deep.num_classes, deep.output_stride, deep.stem) == ("resnet101", 21, 8, "deep")


def test_train_step_reaches_every_parameter(r18):
    out = r18.train()(torch.randn(2, 3, 33, 33))
    (out.logits.mean() + out.features.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in r18.parameters())
    r18.zero_grad(set_to_none=True)


def test_deterministic_construction():
    torch.manual_seed(11)
    a = build_segmenter("resnet18", 4).state_dict()
    torch.manual_seed(11)
    b = build_segmenter("resnet18", 4).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_invalid_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        build_segmenter("resnet18", 0)


def test_a_model_config_builds_the_same_network_as_its_fields():
    cfg = ModelConfig(backbone="resnet18", output_stride=8, stem="deep")
    torch.manual_seed(5)
    a = build_segmenter(cfg, 4)
    torch.manual_seed(5)
    b = build_segmenter("resnet18", 4, output_stride=8, stem="deep")
    assert a.output_stride == b.output_stride == 8 and a.stem == b.stem == "deep"
    assert a.head.aspp.rates == (12, 24, 36)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(TypeError, match="come from the ModelConfig"):
        build_segmenter(cfg, 4, output_stride=16)
