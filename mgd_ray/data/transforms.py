"""Joint image/mask augmentation (torchvision transforms v2) and the CutMix box masks of CPS/MGD.

Train order, as in the official (CPS) pipeline: horizontal flip → random scale → float → normalise →
random crop padded to the crop size (image with 0, mask with 255). Normalising *before* padding
makes padded image pixels 0 in normalised space (the mean colour), as the official code does.
One difference: when an image is smaller than the crop, v2.RandomCrop places it at a random
offset inside the padded crop where the official code centres it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mgd_ray.data.datasets import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_SCALES = (0.5, 0.75, 1.0, 1.5, 1.75, 2.0)


def normalise_uint8(
    images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 (N, H, W, 3) images → (N, 3, H, W) float ``(x / 255 - mean) / std`` on their device.

    The one normalisation of batches that skip the per-sample transforms: serving, prediction and
    pretraining, so a model sees the same input everywhere.
    """
    x = images.permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(std, device=x.device).view(
        1, 3, 1, 1
    )


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from `scales` to (int(h·s), int(w·s)) as CPS does.

    Images are resized bilinearly without antialiasing, which is what cv2.INTER_LINEAR in the
    official code does; v2 resizes tv_tensors.Mask with nearest neighbour (floor, like
    cv2.INTER_NEAREST) whatever interpolation is asked for, so label ids are never blended.
    """

    def __init__(self, scales: Sequence[float]) -> None:
        super().__init__()
        if not scales or min(scales) <= 0:
            raise ValueError(f"scales must be positive factors, got {scales}")
        self.scales = tuple(scales)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        scale = self.scales[int(torch.randint(len(self.scales), ()))]
        return {"size": [max(1, int(height * scale)), max(1, int(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(
            F.resize, inpt, size=params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=False
        )


class JointTransform:
    """Run one v2 pipeline on an image and, when given, its mask with the same random parameters.

    Takes a uint8 tv_tensors.Image (3×H×W) and an optional tv_tensors.Mask (H×W); returns a plain
    float image tensor and a long mask tensor (or None).
    """

    def __init__(self, pipeline: v2.Transform) -> None:
        self.pipeline = pipeline

    def __call__(
        self, image: tv_tensors.Image, mask: tv_tensors.Mask | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if mask is None:
            return self.pipeline(image).as_subclass(torch.Tensor), None
        image, mask = self.pipeline(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"JointTransform({self.pipeline})"


def train_transform(
    crop_size: int,
    scales: Sequence[float] = TRAIN_SCALES,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    hflip: bool = True,
) -> JointTransform:
    """Flip, scale, normalise, then crop to crop_size×crop_size, padding image 0 / mask 255."""
    steps: list[v2.Transform] = [v2.RandomHorizontalFlip(0.5)] if hflip else []
    steps += [
        RandomScale(scales),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE_INDEX}),
    ]
    return JointTransform(v2.Compose(steps))


def eval_transform(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> JointTransform:
    """Float + normalise only; padding or sliding windows for evaluation belong to inference."""
    return JointTransform(v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]))


def box_mask(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator,
    prop_range: tuple[float, float] = (0.25, 0.5),
    n_boxes: int = 3,
    random_aspect_ratio: bool = True,
) -> torch.Tensor:
    """CutMix masks (n, 1, H, W) in {0, 1}: CPS's BoxMaskGenerator with invert=True, within_bounds=True.

    Per box: area proportion p ~ U(prop_range); side proportions exp(U·log p) and p / that (or √p
    each), both × √(1/n_boxes); sizes and positions rounded half to even like numpy. Boxes toggle the
    mask (m = 1 − m), so overlapping boxes cancel, exactly as the original.
    """
    low, high = prop_range
    draw = {"generator": generator, "dtype": torch.float64}
    props = low + (high - low) * torch.rand(n, n_boxes, **draw)
    if random_aspect_ratio:
        y_props = torch.exp(torch.rand(n, n_boxes, **draw) * torch.log(props))
        x_props = props / y_props
    else:
        y_props = x_props = torch.sqrt(props)
    factor = math.sqrt(1.0 / n_boxes)
    shape = torch.tensor([height, width], dtype=torch.float64)
    sizes = torch.round(torch.stack([y_props * factor, x_props * factor], dim=2) * shape)
    sizes = torch.where(props[..., None] == 0, torch.zeros_like(sizes), sizes)
    positions = torch.round((shape - sizes) * torch.rand(n, n_boxes, 2, **draw))
    corners = torch.cat([positions, positions + sizes], dim=2).long().tolist()
    masks = torch.zeros(n, 1, height, width)
    for index, boxes in enumerate(corners):
        for y0, x0, y1, x1 in boxes:
            masks[index, 0, y0:y1, x0:x1] = 1 - masks[index, 0, y0:y1, x0:x1]
    return masks


def cutmix(u0: torch.Tensor, u1: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x_mix = u0·(1 − m) + u1·m: inside the boxes the pixels come from u1."""
    return u0 * (1 - mask) + u1 * mask
