"""Paired augmentation: one random draw per sample, applied to all four images at once.

Drawn in the workers, applied on the training device. A worker draws each sample's
augmentation (a horizontal flip, a random resized crop box in fractions of the image, and
brightness/contrast/saturation factors) from an RNG seeded by (seed, epoch, key), and the draw
travels with the batch as `aug` rows (AUG_FIELDS) beside the uint8 images, which are decoded
and fitted to size but not yet augmented. `Batch.to(device)` applies it there: one affine
sampling grid per sample crops, resizes and flips bg, bgfg and depth (bilinear) and the mask
(nearest, so it stays 0/1; or bilinear on request, so an outline pixel covered in part gets
that fraction, as the images' pixels do, not 0 or 1 from half a pixel away), and bg and bgfg
get the same photometric jitter, computed from the bg's statistics for both, so their
difference still shows only the pasted object. Per-pixel work in a worker cost three times
the JPEG decode; on the training device it is free.
"""

import math
import random

import torch
from torch.nn import functional as nn_functional

AUG_FIELDS = ("flip", "top", "left", "height", "width", "brightness", "contrast", "saturation")
IMAGES = ("bg", "bgfg", "mask", "depth")  # the batch fields that hold images
_COLUMN = {name: i for i, name in enumerate(AUG_FIELDS)}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


# --- Worker side: the draw ------------------------------------------------------------------
def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The RNG of one sample's augmentation: independent of order, workers and skipping."""
    return random.Random(f"augment/{seed}/{epoch}/{key}")


def draw(rng: random.Random, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3), jitter: float = 0.2) -> tuple:
    """One sample's draw, as AUG_FIELDS: a flip (0/1), a crop box (area fraction in `scale`,
    aspect in `ratio`; top, left, height, width as fractions) and three jitter factors.

    Crops keep at least 80% of the area: a stronger zoom makes objects look nearer than their
    depth says and shifts the horizon far from where validation images have it (bench/quality.py:
    held-out depth RMSE 0.060 vs 0.065 with 0.5, mean of two seeds; README)."""
    flip = float(rng.random() < 0.5)
    box = (0.0, 0.0, 1.0, 1.0)
    for _ in range(10):  # as torchvision's RandomResizedCrop: retry, then fall back to all
        area = rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        width, height = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if width <= 1 and height <= 1:
            box = (rng.uniform(0, 1 - height), rng.uniform(0, 1 - width), height, width)
            break
    return (flip, *box, *(rng.uniform(1 - jitter, 1 + jitter) for _ in range(3)))


# --- Device side: the draw applied --------------------------------------------------------
class Batch(dict):
    """One loader batch: ``bg``, ``bgfg`` uint8 [B,3,H,W], ``mask`` uint8 [B,1,H,W] (0/1),
    ``depth`` uint8 [B,1,H,W], ``key`` list of str, and in train mode ``aug`` float32
    [B, len(AUG_FIELDS)]: each sample's draw, NOT yet applied to the images.

    Train on ``batch.to(device)``, which applies it; ``batch["bgfg"].cuda().float()`` would
    train without augmentation.
    """

    @property
    def augmented(self) -> bool:
        """True when the batch carries draws that .to(device) applies (train mode)."""
        return "aug" in self

    def to(self, device, *, non_blocking: bool = True, soft_mask: bool = False) -> dict[str, torch.Tensor]:
        """The images as floats on `device`, augmented when the batch carries draws:
        bg, bgfg [B,3,H,W] and depth [B,1,H,W] on the 0..255 scale, mask [B,1,H,W] 0/1 (with
        `soft_mask`, an augmented mask is resampled bilinearly: 0..1 along the outline)."""
        images = {name: self[name].to(device, non_blocking=non_blocking).float() for name in IMAGES}
        if self.augmented and len(self["aug"]):  # an empty batch (spares ran out) has nothing to augment
            images = apply(images, self["aug"].to(device, non_blocking=non_blocking), soft_mask=soft_mask)
        return images


def apply(images: dict[str, torch.Tensor], aug: torch.Tensor, *, soft_mask: bool = False) -> dict[str, torch.Tensor]:
    """Apply draws `aug` [B, len(AUG_FIELDS)] to float images (see Batch.to)."""
    columns = {name: aug[:, i].float() for name, i in _COLUMN.items()}
    grid = nn_functional.affine_grid(_crop_theta(columns), list(images["mask"].shape), align_corners=False)
    stacked = torch.cat([images["bg"], images["bgfg"], images["depth"]], 1)
    bg, bgfg, depth = _resample(stacked, grid, "bilinear").split([3, 3, 1], 1)
    factors = [columns[name].view(-1, 1, 1, 1) for name in ("brightness", "contrast", "saturation")]
    # One contrast mean for both, the bg's: a mean of each image would offset bgfg - bg
    # everywhere by (1 - contrast) * brightness * (mean(bgfg) - mean(bg)).
    bg_mean = _gray(bg).mean((2, 3), keepdim=True)
    return {"bg": _jitter(bg, bg_mean, *factors), "bgfg": _jitter(bgfg, bg_mean, *factors),
            "mask": _resample(images["mask"], grid, "bilinear" if soft_mask else "nearest"), "depth": depth}


def _resample(images: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    # The crop never enlarges the field of view, so sampling needs no antialiasing.
    return nn_functional.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


def _crop_theta(columns: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B,2,3] affine maps from output to input coordinates (-1..1) of each crop box + flip."""
    top, left, height, width = (columns[name] for name in ("top", "left", "height", "width"))
    sign = 1 - 2 * columns["flip"]
    zero = torch.zeros_like(top)
    return torch.stack([torch.stack([width * sign, zero, 2 * left + width - 1], 1),
                        torch.stack([zero, height, 2 * top + height - 1], 1)], 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return _LUMA[0] * x[:, 0:1] + _LUMA[1] * x[:, 1:2] + _LUMA[2] * x[:, 2:3]


def _jitter(x: torch.Tensor, mean: torch.Tensor, b, c, s) -> torch.Tensor:
    """torchvision's adjust_brightness, _contrast, _saturation in that order, without clamping
    in between, with the contrast mean m given: b*c*s*x + b*c*(1-s)*gray(x) + (1-c)*b*m."""
    return (x * (b * c * s) + _gray(x) * (b * c * (1 - s)) + mean * ((1 - c) * b)).clamp_(0, 255)
