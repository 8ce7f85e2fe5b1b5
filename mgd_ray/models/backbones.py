"""torchvision backbones that return (low-level, high-level) features, with output stride by dilation.

Each backbone keeps torchvision's parameter names, so torchvision's ImageNet checkpoints load into it
directly. The classifier (ResNet `fc`, MobileNetV2's last 1×1 conv `features.18` and `classifier`) is
dropped: the segmenter never uses it, and the paper's Table 1 does not count it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import cycle
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum

log = logging.getLogger(__name__)

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2")
BACKBONES = (*RESNETS, "mobilenet_v2")
OUTPUT_STRIDES = (8, 16, 32)
STEMS = ("plain", "deep")

# DeepLabv3 multi-grid: block i of the last dilated ResNet stage gets rate × MULTI_GRID[i % 3],
# i.e. 2/4/8 in layer4 at output stride 16, as in the official code.
MULTI_GRID = (1, 2, 4)

# Width w of the official deep stem (3→w, w→w, w→2w): 64 for bottleneck ResNets, 32 for basic-block ones.
DEEP_STEM_WIDTH = {"resnet18": 32, "resnet34": 32, "resnet50": 64, "resnet101": 64, "wide_resnet50_2": 64}

# Keys of a full torchvision checkpoint that belong to the classifier the backbones drop.
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "features.18.")

Pretrained = bool | str | Path | None


class Backbone(nn.Module):
    """A feature extractor: forward(x) -> (low_level at stride 4, high_level at `output_stride`)."""

    name: str
    stem: str
    low_level_channels: int
    high_level_channels: int
    output_stride: int

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def _dilate_stage(stage: nn.Sequential, rates: Sequence[int]) -> None:
    """Make a downsampling stage keep its input size: stride 1 everywhere, block i's 3×3 convs at rates[i].

    Only a stage's first block strides (its 3×3 conv and 1×1 shortcut); padding = rate keeps the map size.
    No weight changes shape, so weights load the same before or after.
    """
    for block, rate in zip(stage, rates, strict=True):
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d):
                conv.stride = (1, 1)
                if conv.kernel_size == (3, 3):
                    conv.dilation = (rate, rate)
                    conv.padding = (rate, rate)


def _dilate(stages: Sequence[nn.Sequential], output_stride: int, multi_grid: bool) -> None:
    """Dilate the stride-16 and stride-32 `stages` as `output_stride` requires (32: none, 16: last, 8: both).

    The first dilated stage runs at rate 2, the next at rate 4; the last one optionally with multi-grid.
    """
    dilated = stages[{32: 2, 16: 1, 8: 0}[output_stride] :]
    for i, stage in enumerate(dilated):
        grid = cycle(MULTI_GRID if multi_grid and i == len(dilated) - 1 else (1,))
        _dilate_stage(stage, [2 ** (i + 1) * next(grid) for _ in stage])


def _init_conv_bn(module: nn.Module) -> None:
    """torchvision's ResNet init, for the layers the deep stem adds or replaces."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
    _init_conv_bn(conv)
    return conv


class ResNetBackbone(Backbone):
    """torchvision ResNet `arch` without avgpool/fc: stem → layer1 (low level, stride 4) → … → layer4 (high level).

    stem="deep" is the official code's stem: three 3×3 conv (3→w→w→2w, w = DEEP_STEM_WIDTH[arch]) instead
    of the 7×7 conv; when 2w ≠ 64 layer1's first block takes 2w channels, as in the official ResNet-101
    (42.63 M parameters in the paper against torchvision's 42.50 M).
    """

    def __init__(
        self, arch: str, output_stride: int = 16, stem: str = "plain", weights: WeightsEnum | None = None
    ) -> None:
        super().__init__()
        net: torchvision.models.ResNet = getattr(torchvision.models, arch)(weights=weights)
        self.conv1: nn.Module = net.conv1
        self.bn1 = net.bn1
        if stem == "deep":
            w = DEEP_STEM_WIDTH[arch]
            self.conv1 = nn.Sequential(
                nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            )  # fmt: skip
            self.bn1 = nn.BatchNorm2d(2 * w)
            _init_conv_bn(self.conv1)
            _init_conv_bn(self.bn1)
            first = net.layer1[0]
            if first.conv1.in_channels != 2 * w:  # bottleneck blocks; their layer1 always has a 1×1 shortcut
                first.conv1 = _conv1x1(2 * w, first.conv1.out_channels)
                first.downsample[0] = _conv1x1(2 * w, first.downsample[0].out_channels)
        self.relu = net.relu
        self.maxpool = net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        _dilate([self.layer3, self.layer4], output_stride, multi_grid=True)
        self.name, self.stem, self.output_stride = arch, stem, output_stride
        self.low_level_channels = net.layer2[0].conv1.in_channels
        self.high_level_channels = net.fc.in_features

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        low = self.layer1(x)
        return low, self.layer4(self.layer3(self.layer2(low)))


class MobileNetV2Backbone(Backbone):
    """torchvision MobileNetV2 `features[:18]`: features[:4] → 24 ch at stride 4 (low), features[4:18] → 320 ch.

    The final 1×1 conv to 1280 channels is dropped, as in the official code (1.81 M parameters). Output
    stride 16/8 removes the stride of features[14] (and features[7]) and dilates the depthwise convs of
    the stages behind it at rate 2 (and 4), as torchvision's dilated MobileNets do.
    """

    def __init__(self, output_stride: int = 16, weights: WeightsEnum | None = None, official: bool = False) -> None:
        super().__init__()
        net = torchvision.models.mobilenet_v2(weights=weights)
        self.features = net.features[:18]
        if official:  # the authors' layout: stride 32 kept, the last three blocks' 3×3 convs at rates 2, 4, 8
            if output_stride != 32:
                raise ValueError(f"the official MobileNetV2 layout runs at output stride 32, not {output_stride}")
            _dilate_stage(self.features[15:18], [2, 4, 8])
        _dilate([self.features[7:14], self.features[14:18]], output_stride, multi_grid=False)
        self.name, self.stem, self.output_stride = "mobilenet_v2", "plain", output_stride
        self.low_level_channels = self.features[3].out_channels
        self.high_level_channels = self.features[17].out_channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low = self.features[:4](x)
        return low, self.features[4:](low)


def load_backbone_weights(backbone: Backbone, path: str | Path) -> None:
    """Strictly load a local state dict into `backbone`.

    The file holds a state dict, raw or under "state_dict" / "model"; a full torchvision classification
    checkpoint is accepted (its classifier keys are dropped, the backbone has no classifier).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights file {str(path)!r} does not exist; pass False, 'imagenet' or the path of a state dict"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"could not read pretrained weights file {str(path)!r}: {err}") from err
    if isinstance(obj, dict):
        obj = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"pretrained weights file {str(path)!r} holds no state dict "
            "(expected a dict of tensors, raw or under 'state_dict' or 'model')"
        )
    state = {k: v for k, v in obj.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"pretrained weights file {str(path)!r} does not fit backbone {type(backbone).__name__} "
            f"(check the backbone name and stem): {err}"
        ) from err


def _imagenet_weights(name: str) -> WeightsEnum:
    return torchvision.models.get_model_weights(name).DEFAULT


def build_backbone(
    name: str, output_stride: int = 16, pretrained: Pretrained = False, stem: str = "plain", layout: str = "default"
) -> Backbone:
    """Build backbone `name` at `output_stride` (8/16/32).

    pretrained: False/None random init; True or "imagenet" torchvision's DEFAULT ImageNet weights (downloaded
    once into the torch hub cache); "builtin" is resolved by a study (its corpus pretraining) before any job
    builds a network; any other string a local state-dict file (see load_backbone_weights).
    stem: "plain" (torchvision's 7×7, which the ImageNet weights need) or "deep" (the official code's, ResNets).
    layout: "official" dilates MobileNetV2's last three blocks 2/4/8 at output stride 32, as the authors do.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
    if stem == "deep" and name not in RESNETS:
        raise ValueError(f"stem='deep' exists only for ResNets ({', '.join(RESNETS)}), not {name}")
    if pretrained == "builtin":
        raise ValueError(
            "pretrained: builtin names weights a study pretrains on the built-in corpus (its pretrain stage); "
            "a job on its own takes their file: pretrained: <path of backbone.pt> (`mgd-ray pretrain` writes one)"
        )
    imagenet = pretrained is True or pretrained == "imagenet"
    if imagenet and stem == "deep" and 2 * DEEP_STEM_WIDTH.get(name, 0) != 64:
        raise ValueError(
            f"torchvision has no ImageNet weights for a deep-stem {name}: use stem='plain' with "
            "pretrained='imagenet', or pass pretrained='/path/to/deep_stem_state_dict.pth'"
        )
    if imagenet and stem == "deep":
        # The official ResNet-18 student's quirk: torchvision's weights loaded non-strictly, so
        # everything but the deep stem (whose output keeps layer1's 64 channels) is ImageNet's.
        log.warning(
            "%s: ImageNet weights everywhere but the deep stem, which stays random (as the official code)", name
        )
    weights = _imagenet_weights(name) if imagenet else None
    try:
        if name in RESNETS:
            backbone: Backbone = ResNetBackbone(name, output_stride, stem, weights)
        else:
            backbone = MobileNetV2Backbone(output_stride, weights, official=layout == "official")
    except OSError as err:  # urllib's URLError and socket errors are OSErrors
        if weights is None:
            raise
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise RuntimeError(
            f"could not download torchvision's ImageNet weights for {name} from {weights.url} ({err}); this "
            f"machine looks offline. Fetch that file where there is network and either copy it into {cache} "
            f"or pass its path as pretrained='/path/to/{weights.url.rsplit('/', 1)[-1]}'"
        ) from err
    if pretrained not in (None, False, True, "imagenet"):
        load_backbone_weights(backbone, pretrained)
    return backbone
