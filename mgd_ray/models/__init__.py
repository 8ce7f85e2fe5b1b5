"""Segmentation models: torchvision backbones with output stride by dilation, DeepLabv3+, complexity counts."""

from mgd_ray.models.backbones import (
    BACKBONES,
    OUTPUT_STRIDES,
    RESNETS,
    STEMS,
    Backbone,
    build_backbone,
)
from mgd_ray.models.complexity import count_flops, count_params
from mgd_ray.models.deeplab import DeepLabV3Plus, SegmenterOutput, build_segmenter

__all__ = [
    "BACKBONES",
    "OUTPUT_STRIDES",
    "RESNETS",
    "STEMS",
    "Backbone",
    "DeepLabV3Plus",
    "SegmenterOutput",
    "build_backbone",
    "build_segmenter",
    "count_flops",
    "count_params",
]
