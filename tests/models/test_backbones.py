"""Backbones: parameter counts against torchvision and the paper, strides, dilation, weight loading."""

from __future__ import annotations

from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import nn

from mgd_ray.models.backbones import BACKBONES, build_backbone


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_backbone(name: str, output_stride: int = 16, stem: str = "plain"):
    with torch.device("meta"):
        return build_backbone(name, output_stride, stem=stem)


def torchvision_trunk_params(name: str) -> int:
    """torchvision's full classifier minus the parts the backbone drops, counted independently."""
    with torch.device("meta"):
        tv = getattr(torchvision.models, name)()
    if name == "mobilenet_v2":
        return n_params(tv) - n_params(tv.features[18]) - n_params(tv.classifier)
    return n_params(tv) - n_params(tv.fc)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_plain_params_equal_torchvision_without_classifier(name, output_stride):
    assert n_params(meta_backbone(name, output_stride)) == torchvision_trunk_params(name)


def test_torchvision_param_counts_reference():
    # Guard the independent reference itself with torchvision's published totals.
    for name, weights in [
        ("resnet18", "ResNet18_Weights"),
        ("resnet101", "ResNet101_Weights"),
        ("wide_resnet50_2", "Wide_ResNet50_2_Weights"),
        ("mobilenet_v2", "MobileNet_V2_Weights"),
    ]:
        with torch.device("meta"):
            tv = getattr(torchvision.models, name)()
        assert n_params(tv) == getattr(torchvision.models, weights).DEFAULT.meta["num_params"]


def deep_stem_delta(w: int, layer1_in_extra: int) -> int:
    """Params added by the deep stem over the 7×7 one, by hand: 3 convs + 3 BN, minus 7×7 conv + BN."""
    deep = 3 * w * 9 + 2 * w + w * w * 9 + 2 * w + w * 2 * w * 9 + 2 * 2 * w
    plain = 3 * 64 * 49 + 2 * 64
    return deep - plain + layer1_in_extra


def test_deep_stem_param_counts():
    # ResNet-101: stem 64 → 128 channels, so layer1[0].conv1 (→64) and its shortcut (→256) gain 64 inputs.
    r101 = meta_backbone("resnet101", stem="deep")
    assert n_params(r101) == torchvision_trunk_params("resnet101") + deep_stem_delta(64, 64 * 64 + 64 * 256)
    assert n_params(r101) == 42_623_936
    assert r101.layer1[0].conv1.in_channels == 128 and r101.layer1[0].downsample[0].in_channels == 128
    # ResNet-18: stem 32 → 64 channels, layer1 unchanged.
    r18 = meta_backbone("resnet18", stem="deep")
    assert n_params(r18) == torchvision_trunk_params("resnet18") + deep_stem_delta(32, 0)
    assert n_params(r18) == 11_195_744
    convs = [m for m in r18.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (3, 32, (3, 3), (2, 2)),
        (32, 32, (3, 3), (1, 1)),
        (32, 64, (3, 3), (1, 1)),
    ]


@pytest.mark.parametrize(
    ("name", "stem", "paper_m"),
    [
        ("resnet101", "deep", 42.63),
        ("wide_resnet50_2", "plain", 66.83),
        ("resnet18", "deep", 11.19),
        ("resnet18", "plain", 11.19),
        ("mobilenet_v2", "plain", 1.81),
    ],
)
def test_params_match_paper_table1(name, stem, paper_m):
    assert n_params(meta_backbone(name, stem=stem)) / 1e6 == pytest.approx(paper_m, rel=0.01)


CHANNELS = {
    "resnet18": (64, 512),
    "resnet34": (64, 512),
    "resnet50": (256, 2048),
    "resnet101": (256, 2048),
    "wide_resnet50_2": (256, 2048),
    "mobilenet_v2": (24, 320),
}


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_feature_shapes_and_strides(name, output_stride):
    backbone = meta_backbone(name, output_stride)
    low, high = backbone(torch.zeros(2, 3, 64, 64, device="meta"))
    low_c, high_c = CHANNELS[name]
    assert (backbone.low_level_channels, backbone.high_level_channels) == (low_c, high_c)
    assert backbone.output_stride == output_stride
    assert low.shape == (2, low_c, 16, 16)
    assert high.shape == (2, high_c, 64 // output_stride, 64 // output_stride)


def conv3x3_dilations(block: nn.Module) -> list[int]:
    return [m.dilation[0] for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


@pytest.mark.parametrize(
    ("name", "output_stride", "layer3", "layer4"),
    [
        ("resnet101", 16, [1] * 23, [2, 4, 8]),
        ("resnet101", 8, [2] * 23, [4, 8, 16]),
        ("resnet101", 32, [1] * 23, [1, 1, 1]),
        ("resnet18", 16, [1, 1], [2, 4]),
        ("resnet18", 8, [2, 2], [4, 8]),
        ("wide_resnet50_2", 16, [1] * 6, [2, 4, 8]),
    ],
)
def test_resnet_multigrid_dilation(name, output_stride, layer3, layer4):
    backbone = meta_backbone(name, output_stride)
    for layer, rates in [(backbone.layer3, layer3), (backbone.layer4, layer4)]:
        for block, rate in zip(layer, rates, strict=True):
            # every 3×3 conv of a block (1 in a bottleneck, 2 in a basic block) has the block's rate
            assert set(conv3x3_dilations(block)) == {rate}
            assert all(
                m.padding == m.dilation for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
            )
    strided = {
        m.stride for layer in (backbone.layer3, backbone.layer4) for m in layer.modules() if isinstance(m, nn.Conv2d)
    }
    expected = {(1, 1)} if output_stride == 8 else {(1, 1), (2, 2)}
    assert strided == expected
    # layer1/layer2 are never touched
    assert set(conv3x3_dilations(backbone.layer2)) == {1}


@pytest.mark.parametrize(("output_stride", "rate_7_13", "rate_14_17"), [(32, 1, 1), (16, 1, 2), (8, 2, 4)])
def test_mobilenet_dilation(output_stride, rate_7_13, rate_14_17):
    features = meta_backbone("mobilenet_v2", output_stride).features
    assert len(features) == 18  # the 1×1 conv to 1280 channels is dropped
    for i in range(4, 18):
        expected = rate_7_13 if 7 <= i < 14 else rate_14_17 if i >= 14 else 1
        assert conv3x3_dilations(features[i]) == [expected]  # one depthwise 3×3 per block

    def max_stride(block: nn.Module) -> int:
        return max(max(m.stride) for m in block.modules() if isinstance(m, nn.Conv2d))

    assert max_stride(features[7]) == (1 if output_stride == 8 else 2)
    assert max_stride(features[14]) == (2 if output_stride == 32 else 1)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="unknown backbone 'resnet152'"):
        build_backbone("resnet152")
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("resnet18", output_stride=4)
    with pytest.raises(ValueError, match="stem"):
        build_backbone("resnet18", stem="wide")
    with pytest.raises(ValueError, match="only for ResNets"):
        build_backbone("mobilenet_v2", stem="deep")


def test_deterministic_construction():
    torch.manual_seed(3)
    a = build_backbone("resnet18", stem="deep").state_dict()
    torch.manual_seed(3)
    b = build_backbone("resnet18", stem="deep").state_dict()
    torch.manual_seed(4)
    c = build_backbone("resnet18", stem="deep").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.0.weight"], c["conv1.0.weight"])


# --- pretrained weights -------------------------------------------------------------------------


def assert_same_weights(module: nn.Module, state: dict) -> None:
    own = module.state_dict()
    assert set(own) <= set(state)
    assert all(torch.equal(own[k], state[k]) for k in own)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_local_state_dict_loads(tmp_path, wrap):
    torch.manual_seed(0)
    source = build_backbone("resnet18", output_stride=8, stem="deep")
    state = source.state_dict()
    path = tmp_path / "r18.pth"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    torch.manual_seed(1)
    loaded = build_backbone("resnet18", output_stride=16, pretrained=str(path), stem="deep")
    assert_same_weights(loaded, state)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_full_torchvision_checkpoint_loads_without_its_classifier(tmp_path, name):
    torch.manual_seed(0)
    state = getattr(torchvision.models, name)().state_dict()
    torch.save(state, tmp_path / "tv.pth")
    loaded = build_backbone(name, pretrained=tmp_path / "tv.pth")
    assert_same_weights(loaded, state)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "r18.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_backbone("resnet18", pretrained=str(path))


def test_mismatched_architecture_is_a_clear_error(tmp_path):
    torch.save(build_backbone("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"r18\.pth.*does not fit backbone") as err:
        build_backbone("resnet34", pretrained=str(tmp_path / "r18.pth"))
    assert "Missing key" in str(err.value)
    with pytest.raises(ValueError, match="does not fit"):  # plain-stem weights into a deep stem
        build_backbone("resnet18", pretrained=str(tmp_path / "r18.pth"), stem="deep")


def test_file_without_state_dict_is_a_clear_error(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth.*holds no state dict"):
        build_backbone("resnet18", pretrained=str(tmp_path / "list.pth"))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"could not read.*junk\.pth"):
        build_backbone("resnet18", pretrained=str(tmp_path / "junk.pth"))


def test_imagenet_with_deep_stem_is_refused_where_layer1_would_change():
    with pytest.raises(ValueError, match="no ImageNet weights for a deep-stem resnet101"):
        build_backbone("resnet101", pretrained="imagenet", stem="deep")


def test_imagenet_with_the_deep_stem_of_resnet18_is_the_official_students_quirk(monkeypatch, caplog):
    """The official ResNet-18 student loads torchvision's weights with strict=False into its deep-stem
    network: every weight but the stem's is ImageNet's, and the stem stays as initialised."""
    torch.manual_seed(0)
    fake = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", lambda self, *a, **k: fake)
    torch.manual_seed(1)
    backbone = build_backbone("resnet18", pretrained="imagenet", stem="deep")
    torch.manual_seed(1)
    random = build_backbone("resnet18", stem="deep")
    stem = {k for k in backbone.state_dict() if k.startswith(("conv1.", "bn1."))}
    assert stem and all(torch.equal(backbone.state_dict()[k], random.state_dict()[k]) for k in stem)
    rest = {k: v for k, v in backbone.state_dict().items() if k not in stem}
    assert rest.keys() == {k for k in fake if not k.startswith(("conv1.", "bn1.", "fc."))}
    assert all(torch.equal(v, fake[k]) for k, v in rest.items())
    assert "stays random" in caplog.text


@pytest.mark.parametrize("output_stride", [8, 16])
def test_imagenet_weights_are_torchvision_default_and_load_before_dilation(monkeypatch, output_stride):
    torch.manual_seed(0)
    fake = torchvision.models.resnet18().state_dict()
    urls = []

    def get_state_dict(self, *args, **kwargs):
        urls.append(self.url)
        return fake

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", get_state_dict)
    backbone = build_backbone("resnet18", output_stride, pretrained="imagenet")
    assert urls == [torchvision.models.ResNet18_Weights.DEFAULT.url]
    assert_same_weights(backbone, fake)
    assert backbone.layer4[1].conv2.dilation == ((8, 8) if output_stride == 8 else (4, 4))


def test_offline_imagenet_download_explains_the_way_out(monkeypatch):
    def offline(self, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="offline") as err:
        build_backbone("mobilenet_v2", pretrained=True)
    assert "mobilenet_v2-7ebf99e0.pth" in str(err.value) and "pretrained=" in str(err.value)
