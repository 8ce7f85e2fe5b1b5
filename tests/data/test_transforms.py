import numpy as np
import pytest
import torch
from torch.nn.functional import max_pool2d
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from mgd_ray.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RandomScale,
    box_mask,
    cutmix,
    eval_transform,
    normalise_uint8,
    train_transform,
)

MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]


def encoded_pair(height: int, width: int, seed: int = 0, block: int = 4) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """A blocky mask (values 0..5 and 255) and an image whose red channel is 40·mask + 10 (250 for 255)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor([0, 1, 2, 3, 4, 5, 255], dtype=torch.uint8)
    blocks = values[torch.randint(len(values), (height // block, width // block), generator=generator)]
    mask = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)
    image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
    image[0] = torch.where(mask == 255, torch.full_like(mask, 250), mask * 40 + 10)
    return tv_tensors.Image(image), tv_tensors.Mask(mask)


def red_as_mask(image: torch.Tensor) -> torch.Tensor:
    """Invert the encoding: denormalise the red channel and map 40·m + 10 back to m (250 → 255)."""
    red = (image[0] * STD[0] + MEAN[0]) * 255
    decoded = torch.round((red - 10) / 40).long()
    return torch.where(red > 245, torch.full_like(decoded, 255), decoded)


def test_v2_resizes_masks_with_nearest_even_when_asked_for_bilinear():
    mask = tv_tensors.Mask(torch.tensor([[0, 5], [9, 255]], dtype=torch.uint8))
    resized = F.resize(mask, [7, 7], interpolation=F.InterpolationMode.BILINEAR)
    assert set(resized.unique().tolist()) == {0, 5, 9, 255}


def test_random_scale_sizes_follow_cps_truncation():
    torch.manual_seed(0)
    image, mask = encoded_pair(20, 12)
    sizes = set()
    for _ in range(40):
        out_image, out_mask = RandomScale((0.75, 1.5))(image, mask)
        assert out_image.shape[-2:] == out_mask.shape[-2:]
        sizes.add(tuple(out_mask.shape))
    assert sizes == {(15, 9), (30, 18)}


def test_train_transform_output_and_label_values():
    torch.manual_seed(1)
    transform = train_transform(24)
    for seed in range(20):
        image, mask = encoded_pair(16, 20, seed)
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 24, 24) and out_image.dtype == torch.float32
        assert out_mask.shape == (24, 24) and out_mask.dtype == torch.int64
        assert type(out_image) is torch.Tensor and type(out_mask) is torch.Tensor
        assert set(out_mask.unique().tolist()) <= set(mask.unique().tolist()) | {255}


def test_padding_is_zero_in_the_image_and_ignore_in_the_mask():
    torch.manual_seed(2)
    image, mask = encoded_pair(8, 12)
    mask[mask == 255] = 1  # so every 255 in the output is padding
    image[0] = mask * 40 + 10
    transform = train_transform(16, scales=(1.0,), hflip=False)
    offsets = set()
    for _ in range(30):
        out_image, out_mask = transform(image, mask)
        padded = out_mask == 255
        assert padded.sum() == 16 * 16 - 8 * 12
        assert (out_image[:, padded] == 0).all()
        assert (out_image[:, ~padded] != 0).all()
        rows, cols = torch.nonzero(~padded, as_tuple=True)
        top, left = int(rows.min()), int(cols.min())
        offsets.add((top, left))
        window = (slice(None), slice(top, top + 8), slice(left, left + 12))
        expected = (image.float() / 255 - MEAN) / STD
        assert torch.allclose(out_image[window], expected, atol=1e-6)
        assert torch.equal(out_mask[window[1:]], mask.long())
    assert len(offsets) > 1  # v2.RandomCrop places a small image at random inside the padded crop


def test_flip_and_crop_move_image_and_mask_together():
    torch.manual_seed(3)
    image, mask = encoded_pair(16, 16)
    transform = train_transform(12, scales=(1.0,))
    flipped = unflipped = 0
    for _ in range(30):
        out_image, out_mask = transform(image, mask)
        assert torch.equal(red_as_mask(out_image), out_mask)
        for top in range(5):
            for left in range(5):
                crop = mask[top : top + 12, left : left + 12].long()
                flipped += torch.equal(out_mask, crop.flip(-1))
                unflipped += torch.equal(out_mask, crop)
    assert flipped > 0 and unflipped > 0


def test_resized_image_and_mask_stay_aligned():
    """After bilinear (image) / nearest (mask) resizing, the red channel decodes exactly to the mask
    everywhere except within one pixel of a mask edge; padding (image exactly 0) is left out."""
    torch.manual_seed(4)
    for scale in (0.5, 0.75, 1.5, 1.75, 2.0):
        transform = train_transform(32, scales=(scale,))
        for seed in range(3):
            image, mask = encoded_pair(48, 48, seed, block=12)
            out_image, out_mask = transform(image, mask)
            as_float = out_mask[None].float()
            near_edge = (max_pool2d(as_float, 3, 1, 1) != -max_pool2d(-as_float, 3, 1, 1))[0]
            near_edge[[0, -1], :] = near_edge[:, [0, -1]] = True  # an edge may lie just outside the crop
            content = (out_image != 0).any(dim=0)
            checked = content & ~near_edge
            assert checked.sum() > 0.3 * content.sum()
            assert torch.equal(red_as_mask(out_image)[checked], out_mask[checked]), scale


def test_unlabeled_images_go_through_without_a_mask():
    torch.manual_seed(5)
    image, _ = encoded_pair(8, 8)
    out_image, out_mask = train_transform(12)(image)
    assert out_mask is None and out_image.shape == (3, 12, 12)
    out_image, out_mask = eval_transform()(image, None)
    assert out_mask is None


def test_eval_transform_only_normalises():
    image, mask = encoded_pair(8, 12)
    out_image, out_mask = eval_transform()(image, mask)
    assert torch.allclose(out_image, (image.float() / 255 - MEAN) / STD, atol=1e-6)
    assert torch.equal(out_mask, mask.long())


def cps_box_masks(props, aspect_u, position_u, shape, n_boxes, random_aspect_ratio):
    """CPS mask_gen.BoxMaskGenerator.generate_params (invert=True, within_bounds=True) given its draws."""
    mask_props = props.copy()
    zero_mask = mask_props == 0.0
    if random_aspect_ratio:
        y_props = np.exp(aspect_u * np.log(mask_props))
        x_props = mask_props / y_props
    else:
        y_props = x_props = np.sqrt(mask_props)
    fac = np.sqrt(1.0 / n_boxes)
    y_props = y_props * fac
    x_props = x_props * fac
    y_props[zero_mask] = 0
    x_props[zero_mask] = 0
    sizes = np.round(np.stack([y_props, x_props], axis=2) * np.array(shape)[None, None, :])
    positions = np.round((np.array(shape) - sizes) * position_u)
    rectangles = np.append(positions, positions + sizes, axis=2)
    masks = np.zeros((len(props), 1) + shape)
    for i, sample_rectangles in enumerate(rectangles):
        for y0, x0, y1, x1 in sample_rectangles:
            masks[i, 0, int(y0) : int(y1), int(x0) : int(x1)] = 1 - masks[i, 0, int(y0) : int(y1), int(x0) : int(x1)]
    return masks


@pytest.mark.parametrize(
    "n, shape, n_boxes, random_aspect_ratio",
    [(6, (33, 33), 3, True), (4, (20, 37), 1, True), (4, (24, 16), 3, False), (3, (9, 9), 5, True)],
)
def test_box_mask_matches_the_cps_generator(n, shape, n_boxes, random_aspect_ratio):
    generator = torch.Generator().manual_seed(10 + n)
    draws = torch.Generator().manual_seed(10 + n)
    props = 0.25 + 0.25 * torch.rand(n, n_boxes, generator=draws, dtype=torch.float64)
    aspect_u = torch.rand(n, n_boxes, generator=draws, dtype=torch.float64).numpy() if random_aspect_ratio else None
    position_u = torch.rand(n, n_boxes, 2, generator=draws, dtype=torch.float64).numpy()
    expected = cps_box_masks(props.numpy(), aspect_u, position_u, shape, n_boxes, random_aspect_ratio)
    masks = box_mask(n, *shape, generator, n_boxes=n_boxes, random_aspect_ratio=random_aspect_ratio)
    assert masks.shape == (n, 1, *shape) and masks.dtype == torch.float32
    assert np.array_equal(masks.numpy(), expected)


def test_overlapping_boxes_cancel():
    """With three big boxes in a small mask some pixels are covered twice and hence 0 again."""
    masks = box_mask(64, 8, 8, torch.Generator().manual_seed(0), prop_range=(0.9, 0.9))
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert (masks.mean(dim=(1, 2, 3)) < 0.9).any()


def test_single_box_area_is_in_the_proportion_range():
    masks = box_mask(200, 64, 64, torch.Generator().manual_seed(1), n_boxes=1)
    area = masks.mean(dim=(1, 2, 3))
    assert area.min() >= 0.25 - 0.02 and area.max() <= 0.5 + 0.02
    assert area.max() - area.min() > 0.15
    rows, cols = masks.sum(dim=3).gt(0).sum(dim=(1, 2)), masks.sum(dim=2).gt(0).sum(dim=(1, 2))
    assert torch.equal(rows * cols, masks.sum(dim=(1, 2, 3)).long())  # one solid rectangle each


def test_box_mask_is_reproducible_from_the_generator():
    a = box_mask(3, 16, 16, torch.Generator().manual_seed(5))
    b = box_mask(3, 16, 16, torch.Generator().manual_seed(5))
    c = box_mask(3, 16, 16, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cutmix_takes_u1_inside_the_boxes():
    u0 = torch.full((1, 2, 2, 2), 3.0)
    u1 = torch.full((1, 2, 2, 2), -1.0)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    mixed = cutmix(u0, u1, mask)
    assert mixed[0, :, 0, 0].tolist() == [-1.0, -1.0] and mixed[0, :, 0, 1].tolist() == [3.0, 3.0]
    assert mixed[0, 1].tolist() == [[-1.0, 3.0], [3.0, -1.0]]


def test_normalise_uint8_is_the_eval_transform_by_hand():
    images = torch.tensor([[[[0, 255, 51], [102, 153, 204]]]], dtype=torch.uint8)  # N=1, H=1, W=2, RGB
    x = normalise_uint8(images, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    assert x.shape == (1, 3, 1, 2)
    # red: (0/255 - .5)/.5 = -1, (102/255 - .5)/.5 = -0.2; green: (1 - .25)/.25 = 3, (.6 - .25)/.25 = 1.4;
    # blue: .2/2 = 0.1, .8/2 = 0.4
    expected = torch.tensor([[[[-1.0, -0.2]], [[3.0, 1.4]], [[0.1, 0.4]]]])
    torch.testing.assert_close(x, expected)
