"""Paired augmentation, device side: a train batch's draw applied to all four images at once.

The worker ships uint8 images fitted to image_size and each sample's draw (pipeline.augment,
field `aug`); here, on the training device, one affine sampling grid per sample crops,
resizes and flips bg, bgfg and depth (bilinear) and the mask (nearest, so it stays 0/1), and
bg and bgfg get the same photometric jitter, so their difference still shows only the pasted
object. The crop never enlarges the field of view, so sampling needs no antialiasing.
"""

import torch
from torch.nn import functional as nn_functional

from pipeline.augment import AUG_FIELDS

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale
_COLUMN = {name: i for i, name in enumerate(AUG_FIELDS)}


def to_device(batch: dict, device, *, non_blocking: bool = True) -> dict[str, torch.Tensor]:
    """A loader batch as float tensors on `device`: bg, bgfg [B,3,H,W] and depth [B,1,H,W] in
    0..255, mask [B,1,H,W] 0/1; augmented when the batch carries a draw (train mode)."""
    images = {name: batch[name].to(device, non_blocking=non_blocking).float()
              for name in ("bg", "bgfg", "mask", "depth")}
    if "aug" in batch:
        images = augment(images, batch["aug"].to(device, non_blocking=non_blocking))
    return images


def augment(images: dict[str, torch.Tensor], aug: torch.Tensor) -> dict[str, torch.Tensor]:
    """Apply draws `aug` [B, len(AUG_FIELDS)] to float images (see to_device)."""
    column = lambda name: aug[:, _COLUMN[name]].float()  # noqa: E731
    grid = nn_functional.affine_grid(_crop_theta(column), list(images["mask"].shape), align_corners=False)
    sample = lambda x, mode: nn_functional.grid_sample(  # noqa: E731
        x, grid, mode=mode, padding_mode="border", align_corners=False)
    bg, bgfg, depth = sample(torch.cat([images["bg"], images["bgfg"], images["depth"]], 1), "bilinear").split([3, 3, 1], 1)
    factors = [column(name).view(-1, 1, 1, 1) for name in ("brightness", "contrast", "saturation")]
    return {"bg": _jitter(bg, *factors), "bgfg": _jitter(bgfg, *factors),
            "mask": sample(images["mask"], "nearest"), "depth": depth}


def _crop_theta(column) -> torch.Tensor:
    """[B,2,3] affine maps from output to input coordinates (-1..1) of each crop box + flip."""
    top, left, height, width = (column(name) for name in ("top", "left", "height", "width"))
    sign = 1 - 2 * column("flip")
    zero = torch.zeros_like(top)
    return torch.stack([torch.stack([width * sign, zero, 2 * left + width - 1], 1),
                        torch.stack([zero, height, 2 * top + height - 1], 1)], 1)


def _jitter(x: torch.Tensor, b, c, s) -> torch.Tensor:
    """torchvision's adjust_brightness, _contrast, _saturation in that order, without clamping
    in between: with gray(x) the luma and m its mean, b*c*s*x + b*c*(1-s)*gray(x) + (1-c)*b*m."""
    gray = _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]
    offset = gray.mean((2, 3), keepdim=True) * ((1 - c) * b)
    return (x * (b * c * s) + gray * (b * c * (1 - s)) + offset).clamp_(0, 255)
