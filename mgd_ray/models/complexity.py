"""Parameter and FLOP counts and latency of backbones and segmenters, to set beside the paper's Table 1.

The paper's "FLOPs" are multiply-accumulates of the backbone alone at 512×512 (thop's convention):
ResNet-101 (deep stem) and WRN (plain stem) at output stride 16, ResNet-18 (deep stem) at 16 and
MobileNetV2 at 32. Convolution MACs from torch.utils.flop_counter are within 0.4 % of the ResNet figures
and 4 % under MobileNetV2's; thop also counts 2 operations per BatchNorm element, which closes the gap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode

from mgd_ray.config import ModelConfig
from mgd_ray.models.backbones import BACKBONES, RESNETS
from mgd_ray.models.deeplab import build_segmenter


class PaperComplexity(NamedTuple):
    stem: str
    output_stride: int
    params_m: float  # backbone parameters, millions
    gmacs: float  # the paper's "FLOPs" column: backbone multiply-accumulates at 512×512, billions


# Table 1 of the paper, with the configuration (found by counting) that reproduces each row.
# The paper's mIoU figures (Tables 1–5) are models.paper_figures.PAPER_FIGURES.
PAPER_TABLE1 = {
    "resnet101": PaperComplexity("deep", 16, 42.63, 59.13),
    "wide_resnet50_2": PaperComplexity("plain", 16, 66.83, 91.12),
    "resnet18": PaperComplexity("deep", 16, 11.19, 17.20),
    "mobilenet_v2": PaperComplexity("plain", 32, 1.81, 1.52),
}


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers such as BN running stats excluded)."""
    return sum(p.numel() for p in module.parameters())


def count_flops(module: nn.Module, input_size: tuple[int, int], batch_size: int = 1, in_channels: int = 3) -> int:
    """FLOPs of one eval-mode forward pass on a (batch_size, in_channels, *input_size) input.

    Counted by torch.utils.flop_counter: 2 per multiply-add of convolutions and matrix products; norms,
    activations, pooling and interpolation count 0. The input is created on the module's device: build
    the module under `torch.device("meta")` to count shapes only, in milliseconds, without any memory.
    """
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(batch_size, in_channels, *input_size, device=device)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
    finally:
        module.train(was_training)
    return counter.get_total_flops()


def segmenter_cost(model: ModelConfig, num_classes: int, size: int) -> tuple[float, float]:
    """(params in M, GFLOPs at size×size) of a whole segmenter, counted on the meta device."""
    with torch.device("meta"):
        net = build_segmenter(model, num_classes, pretrained=False)
    return count_params(net) / 1e6, count_flops(net, (size, size)) / 1e9


def latency_ms(
    model: ModelConfig, num_classes: int, size: int, reps: int = 5, device: str | None = None, threads: int = 1
) -> float:
    """Median eager-PyTorch latency (ms) of one size×size image on ``device`` (default: CUDA when
    this process has it, else the CPU), with ``threads`` CPU threads.

    Untrained weights: latency does not depend on them. ``torch.utils.benchmark`` handles warm-up
    and CUDA synchronisation.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = build_segmenter(model, num_classes, pretrained=False).eval().to(device)
    x = torch.zeros(1, 3, size, size, device=device)
    with torch.inference_mode():
        net(x)  # warm-up
        return 1000 * Timer("net(x)", globals={"net": net, "x": x}, num_threads=threads).timeit(reps).median


@dataclass(frozen=True)
class ComplexityRow:
    model: str  # backbone name
    stem: str
    output_stride: int
    input_size: tuple[int, int]
    backbone_params_m: float
    backbone_gflops: float  # flop_counter FLOPs = 2 × multiply-accumulates
    backbone_gmacs: float  # multiply-accumulates, the paper's "FLOPs"
    params_m: float  # whole DeepLabv3+ segmenter
    gflops: float


def complexity_table(
    backbones: Sequence[str] = BACKBONES,
    num_classes: int = 21,
    input_size: tuple[int, int] = (512, 512),
    output_stride: int = 16,
    stem: str = "plain",
) -> list[ComplexityRow]:
    """Params and FLOPs of each backbone and its DeepLabv3+ segmenter, counted on the meta device.

    `stem` applies to the ResNets; MobileNetV2 has only its own. PAPER_TABLE1 gives the settings that
    reproduce the paper's numbers.
    """
    rows = []
    for name in backbones:
        row_stem = stem if name in RESNETS else "plain"
        with torch.device("meta"):
            model = build_segmenter(name, num_classes, output_stride, stem=row_stem)
        backbone_flops = count_flops(model.backbone, input_size)
        rows.append(
            ComplexityRow(
                model=name,
                stem=row_stem,
                output_stride=output_stride,
                input_size=input_size,
                backbone_params_m=count_params(model.backbone) / 1e6,
                backbone_gflops=backbone_flops / 1e9,
                backbone_gmacs=backbone_flops / 2e9,
                params_m=count_params(model) / 1e6,
                gflops=count_flops(model, input_size) / 1e9,
            )
        )
    return rows


def format_table(rows: Sequence[ComplexityRow]) -> str:
    """A fixed-width text table of `rows`, with a note on what the FLOP columns count."""
    header = (
        f"{'model':<16} {'stem':<5} {'OS':>2} {'input':>9}  {'backbone':>8} {'backbone':>8} {'backbone':>8}"
        f"  {'model':>8} {'model':>8}\n"
        f"{'':<16} {'':<5} {'':>2} {'':>9}  {'params M':>8} {'GFLOPs':>8} {'GMACs':>8}  {'params M':>8} {'GFLOPs':>8}"
    )
    lines = [header, "-" * len(header.splitlines()[1])]
    for r in rows:
        size = f"{r.input_size[0]}x{r.input_size[1]}"
        lines.append(
            f"{r.model:<16} {r.stem:<5} {r.output_stride:>2} {size:>9}  {r.backbone_params_m:>8.2f} "
            f"{r.backbone_gflops:>8.2f} {r.backbone_gmacs:>8.2f}  {r.params_m:>8.2f} {r.gflops:>8.2f}"
        )
    lines.append(
        "GFLOPs: torch.utils.flop_counter (2 per multiply-add, convs and matmuls only). "
        "The paper's 'FLOPs' are backbone GMACs."
    )
    return "\n".join(lines)
