"""DeepLabv3+ as the official MGD code builds it: forward returns the logits and the 256-channel decoder features.

The region-level loss (Eq. 5-6) distills the decoder features, so the segmenter exposes them next to
the logits instead of hiding them behind hooks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mgd_ray.config import ModelConfig
from mgd_ray.models.backbones import Backbone, Pretrained, build_backbone

ASPP_RATES_OS16 = (6, 12, 18)
OFFICIAL_MOBILENET_LOW_LEVEL_PROJ = 24  # HeadSmall's reduce: features[3]'s 24 channels to 24


class SegmenterOutput(NamedTuple):
    logits: Tensor  # (N, num_classes, H, W), at input resolution
    features: Tensor  # (N, 256, ⌈H/4⌉, ⌈W/4⌉), the decoder output before the 1×1 classifier


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling, (N, in_channels, h, w) -> (N, channels, h, w), as in the official code.

    A 1×1 and three dilated 3×3 branches are concatenated, BN + LeakyReLU, projected to `channels`;
    the image-pooling branch is projected separately and *added* to that projection (not concatenated),
    then BN + LeakyReLU.
    """

    def __init__(self, in_channels: int, channels: int = 256, rates: tuple[int, int, int] = ASPP_RATES_OS16) -> None:
        super().__init__()
        self.rates = rates
        self.map_convs = nn.ModuleList(
            [nn.Conv2d(in_channels, channels, 1, bias=False)]
            + [nn.Conv2d(in_channels, channels, 3, padding=r, dilation=r, bias=False) for r in rates]
        )
        self.map_bn = nn.BatchNorm2d(channels * len(self.map_convs))
        self.red_conv = nn.Conv2d(channels * len(self.map_convs), channels, 1, bias=False)
        self.pool_conv = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.pool_bn = nn.BatchNorm2d(channels)
        self.pool_red_conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.red_bn = nn.BatchNorm2d(channels)
        self.act = nn.LeakyReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.red_conv(self.act(self.map_bn(torch.cat([conv(x) for conv in self.map_convs], dim=1))))
        pool = x.mean(dim=(2, 3), keepdim=True)
        pool = self.pool_red_conv(self.act(self.pool_bn(self.pool_conv(pool))))
        return self.act(self.red_bn(out + pool))  # (N, C, 1, 1) broadcasts over h × w


class DeepLabV3PlusHead(nn.Module):
    """ASPP on the high-level map + decoder: (low (N, low_channels, H/4, W/4), high) -> (N, channels, H/4, W/4).

    The decoder reduces the low-level map to `low_level_proj` channels, concatenates the ASPP output
    upsampled to its size, and applies two 3×3 conv-BN-ReLU.
    """

    def __init__(
        self,
        high_channels: int,
        low_channels: int,
        aspp_rates: tuple[int, int, int] = ASPP_RATES_OS16,
        low_level_proj: int = 48,
        channels: int = 256,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(high_channels, channels, aspp_rates)
        self.reduce = _conv_bn_relu(low_channels, low_level_proj, 1)
        self.fuse = nn.Sequential(
            _conv_bn_relu(channels + low_level_proj, channels, 3), _conv_bn_relu(channels, channels, 3)
        )

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        high = F.interpolate(self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.fuse(torch.cat([high, self.reduce(low)], dim=1))


class DeepLabV3Plus(nn.Module):
    """Backbone → DeepLabV3PlusHead → 1×1 classifier → bilinear upsampling to the input size."""

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        aspp_rates: tuple[int, int, int] = ASPP_RATES_OS16,
        low_level_proj: int = 48,
        channels: int = 256,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = DeepLabV3PlusHead(
            backbone.high_level_channels, backbone.low_level_channels, aspp_rates, low_level_proj, channels
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.backbone_name, self.stem, self.output_stride = backbone.name, backbone.stem, backbone.output_stride
        self.num_classes = num_classes
        for m in [*self.head.modules(), self.classifier]:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> SegmenterOutput:
        features = self.head(*self.backbone(x))
        logits = F.interpolate(self.classifier(features), size=x.shape[-2:], mode="bilinear", align_corners=True)
        return SegmenterOutput(logits, features)


# The authors' DeepLabv3+ keys (network.py's Head / HeadSmall) that differ from ours; the backbone's,
# the rest of the ASPP's, the low-level projection's and the classifier's are the same.
OFFICIAL_KEYS = {
    "head.aspp.global_pooling_conv.": "head.aspp.pool_conv.",
    "head.aspp.global_pooling_bn.": "head.aspp.pool_bn.",
    "head.last_conv.0.": "head.fuse.0.0.",
    "head.last_conv.1.": "head.fuse.0.1.",
    "head.last_conv.3.": "head.fuse.1.0.",
    "head.last_conv.4.": "head.fuse.1.1.",
}


def from_official_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict of one of the authors' DeepLabv3+ networks (a ``branch`` of their Network) with
    mgd_ray's key names, for ``load_state_dict`` on the segmenter of the same layout."""
    renamed = {}
    for key, value in state.items():
        prefix = next((p for p in OFFICIAL_KEYS if key.startswith(p)), None)
        renamed[key if prefix is None else OFFICIAL_KEYS[prefix] + key.removeprefix(prefix)] = value
    return renamed


class LogitsOnly(nn.Module):
    """Export wrapper: image batch (N,3,H,W) → logits (N,C,H,W), the one tensor an ONNX/TorchScript graph returns."""

    def __init__(self, segmenter: nn.Module) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, x: Tensor) -> Tensor:
        return self.segmenter(x).logits


def build_segmenter(
    model: ModelConfig | str,
    num_classes: int,
    output_stride: int | None = None,
    pretrained: Pretrained | None = None,
    stem: str | None = None,
    aspp_rates: tuple[int, int, int] | None = None,
    low_level_proj: int = 48,
) -> DeepLabV3Plus:
    """DeepLabv3+ for a ``ModelConfig`` (its backbone, output stride, stem and ``pretrained``), or for a
    backbone name with the settings given here (output stride 16, plain stem, random init by default).

    See build_backbone for output_stride, pretrained and stem. ``pretrained=False`` with a config
    skips its ImageNet weights where a checkpoint's weights replace them anyway. aspp_rates default
    to (6, 12, 18) scaled by 16 / output_stride (12/24/36 at 8, 3/6/9 at 32). A config's
    ``layout: official`` builds the authors' MobileNetV2 student: output stride 32, features[15:18]
    dilated 2/4/8, rates (6, 12, 18) and low_level_proj=24.
    """
    layout = "default"
    if isinstance(model, ModelConfig):
        if output_stride is not None or stem is not None:
            raise TypeError("build_segmenter: output_stride and stem come from the ModelConfig; do not pass them too")
        backbone, output_stride, stem, layout = model.backbone, model.output_stride, model.stem, model.layout
        pretrained = model.pretrained if pretrained is None else pretrained
    else:
        backbone = model
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    output_stride = 16 if output_stride is None else output_stride
    net = build_backbone(backbone, output_stride, pretrained or False, stem or "plain", layout)
    if layout == "official":
        aspp_rates, low_level_proj = ASPP_RATES_OS16, OFFICIAL_MOBILENET_LOW_LEVEL_PROJ
    if aspp_rates is None:
        r1, r2, r3 = (r * 16 // output_stride for r in ASPP_RATES_OS16)
        aspp_rates = (r1, r2, r3)
    return DeepLabV3Plus(net, num_classes, aspp_rates, low_level_proj)
