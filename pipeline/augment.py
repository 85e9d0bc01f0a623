"""Paired augmentation, worker side: one random draw per sample, and members fitted to size.

A worker decodes, brings each member to image_size (a half-size depth map, or all of them
when training at a smaller size) and draws each sample's augmentation: a horizontal flip, a
random resized crop box in fractions of the image, and brightness/contrast/saturation
factors. The draw travels with the batch as `aug` rows (AUG_FIELDS) and pipeline.device
applies it to all four images at once on the training device: per-pixel work that a GPU does
for free and that cost a worker core three times what decoding the JPEGs did.
"""

import math
import random

import torch
from torch.nn import functional as nn_functional

from pipeline import schema

AUG_FIELDS = ("flip", "top", "left", "height", "width", "brightness", "contrast", "saturation")


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The RNG of one sample's augmentation: independent of order, workers and skipping."""
    return random.Random(f"augment/{seed}/{epoch}/{key}")


def draw(rng: random.Random, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), jitter: float = 0.2) -> tuple:
    """One sample's draw, as AUG_FIELDS: a flip (0/1), a crop box (area fraction in `scale`,
    aspect in `ratio`; top, left, height, width as fractions) and three jitter factors."""
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


def fit(images: dict[str, torch.Tensor], size: int, out: dict[str, torch.Tensor]) -> None:
    """Bring each decoded member to `size` x `size` (bilinear with antialiasing; the mask by
    nearest neighbour, so it stays 0/1) and write it into `out` (the sample's batch slots)."""
    for name, image in images.items():
        if image.shape[-2:] != (size, size):
            if name == schema.MASK:
                image = nn_functional.interpolate(image[None], size=(size, size), mode="nearest-exact")[0]
            else:
                image = nn_functional.interpolate(image[None], size=(size, size), mode="bilinear",
                                                  antialias=True, align_corners=False)[0]
        out[name].copy_(image)
