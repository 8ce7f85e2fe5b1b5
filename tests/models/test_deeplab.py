"""DeepLabv3+: output shapes, ASPP as the official code wires it, decoder, init, attributes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mgd_ray.config import ModelConfig
from mgd_ray.models.deeplab import ASPP, DeepLabV3Plus, SegmenterOutput, build_segmenter, from_official_state_dict


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


def official_mobilenet_shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
    """The authors' SingleSmallNetwork parameters and buffers (exp.voc/voc8.mobilev2_deeplabv3plus/
    network.py), written from their layout: torchvision's MobileNetV2 features[0:18] (their copy has the
    same keys and drops the 1280-channel conv) and HeadSmall: ASPP(320, 256, [6, 12, 18]), a 24→24
    low-level projection, two 3×3 convs (280→256, 256→256) and a 1×1 classifier."""
    import torchvision

    shapes = {
        f"backbone.features.{k}": tuple(v.shape)
        for k, v in torchvision.models.mobilenet_v2().features[:18].state_dict().items()
    }

    def bn(prefix: str, c: int) -> None:
        shapes.update({f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["head.aspp.map_convs.0.weight"] = (256, 320, 1, 1)
    for i in (1, 2, 3):
        shapes[f"head.aspp.map_convs.{i}.weight"] = (256, 320, 3, 3)
    bn("head.aspp.map_bn", 1024)
    shapes["head.aspp.global_pooling_conv.weight"] = (256, 320, 1, 1)
    bn("head.aspp.global_pooling_bn", 256)
    shapes["head.aspp.red_conv.weight"] = (256, 1024, 1, 1)
    shapes["head.aspp.pool_red_conv.weight"] = (256, 256, 1, 1)
    bn("head.aspp.red_bn", 256)
    shapes["head.reduce.0.weight"] = (24, 24, 1, 1)
    bn("head.reduce.1", 24)
    shapes["head.last_conv.0.weight"] = (256, 280, 3, 3)
    bn("head.last_conv.1", 256)
    shapes["head.last_conv.3.weight"] = (256, 256, 3, 3)
    bn("head.last_conv.4", 256)
    shapes["classifier.weight"] = (num_classes, 256, 1, 1)
    shapes["classifier.bias"] = (num_classes,)
    return shapes


def test_official_mobilenet_layout_matches_the_authors_network():
    cfg = ModelConfig(backbone="mobilenet_v2", output_stride=32, layout="official")
    model = build_segmenter(cfg, 21)
    # The authors' network, key by key: a random state dict in their layout loads strictly.
    shapes = official_mobilenet_shapes(21)
    g = torch.Generator().manual_seed(0)
    official = {k: torch.randn(s, generator=g) if s else torch.tensor(3) for k, s in shapes.items()}
    official = {k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in official.items()}
    model.load_state_dict(from_official_state_dict(official), strict=True)
    n_params = sum(
        math.prod(s)
        for k, s in shapes.items()
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    assert sum(p.numel() for p in model.parameters()) == n_params
    # Output stride 32 kept: only the depthwise 3×3 convs of features[15:18] dilate, at 2, 4, 8.
    for index, rate in zip((15, 16, 17), (2, 4, 8), strict=True):
        depthwise = [
            c for c in model.backbone.features[index].modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)
        ]
        assert [(c.dilation, c.padding, c.stride) for c in depthwise] == [((rate, rate), (rate, rate), (1, 1))]
    assert [c.dilation[0] for c in model.head.aspp.map_convs[1:]] == [6, 12, 18]
    model.eval()
    x = torch.randn(2, 3, 64, 96, generator=g)
    low, high = model.backbone(x)
    assert low.shape == (2, 24, 16, 24) and high.shape == (2, 320, 2, 3)  # strides 4 and 32
    out = model(x)
    assert out.logits.shape == (2, 21, 64, 96) and out.features.shape == (2, 256, 16, 24)
    assert torch.isfinite(out.logits).all()
    # The default layout at output stride 32 is another network (rates 3/6/9, a 48-channel projection).
    default = build_segmenter(ModelConfig(backbone="mobilenet_v2", output_stride=32), 21)
    assert [c.dilation[0] for c in default.head.aspp.map_convs[1:]] == [3, 6, 9]
    assert default.head.reduce[0].out_channels == 48


def test_official_layout_is_only_the_mobilenet_at_stride_32():
    for bad in ({"backbone": "resnet18", "output_stride": 32}, {"backbone": "mobilenet_v2", "output_stride": 16}):
        with pytest.raises(ValueError, match="layout: official is the authors' MobileNetV2 head, at output stride 32"):
            ModelConfig(layout="official", **bad)


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
