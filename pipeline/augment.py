"""Paired augmentation: one random draw per sample drives all four images.

The geometry (horizontal flip, random resized crop) is drawn in fractions of the image, so
members of different sizes (a half-size depth map) get the same crop. RGB is resized
bilinearly with antialiasing, the depth map the same way, the 0/1 mask with nearest
neighbour (so it stays 0/1). Photometric jitter touches bg and bgfg only, identically, so
their difference still shows the pasted object. Everything stays uint8 on the CPU.
"""

import math
import random
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from pipeline import schema

_GRAY = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
_RGB_PAIR = (schema.BG, schema.BGFG)


@dataclass(frozen=True)
class AugmentParams:
    """One sample's draw. `box` = (top, left, height, width) as fractions of the image."""

    flip: bool
    box: tuple[float, float, float, float]
    brightness: float
    contrast: float
    saturation: float


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    """The RNG of one sample's augmentation: independent of order, workers and skipping."""
    return random.Random(f"augment/{seed}/{epoch}/{key}")


def draw_params(rng: random.Random, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3),
                jitter: float = 0.2) -> AugmentParams:
    """Draw a flip, a crop (area fraction in `scale`, aspect in `ratio`) and jitter factors."""
    flip = rng.random() < 0.5
    box = (0.0, 0.0, 1.0, 1.0)
    for _ in range(10):  # as torchvision's RandomResizedCrop: retry, then fall back to all
        area = rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        width, height = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if width <= 1 and height <= 1:
            box = (rng.uniform(0, 1 - height), rng.uniform(0, 1 - width), height, width)
            break
    brightness, contrast, saturation = (rng.uniform(1 - jitter, 1 + jitter) for _ in range(3))
    return AugmentParams(flip, box, brightness, contrast, saturation)


def _crop(image: torch.Tensor, params: AugmentParams, size: int, interpolation) -> torch.Tensor:
    height, width = image.shape[-2:]
    top, left, box_h, box_w = params.box
    y, x = round(top * height), round(left * width)
    h, w = max(1, min(height - y, round(box_h * height))), max(1, min(width - x, round(box_w * width)))
    out = F.resized_crop(image, y, x, h, w, [size, size], interpolation=interpolation, antialias=True)
    return out.flip(-1) if params.flip else out


def _jitter(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Brightness, contrast, saturation in one pass over [N,3,H,W] uint8 (N images, same factors).

    Equal to applying the three in that order without clamping in between: with gray(x)
    the luminance and m its mean, b*c*(s*x + (1-s)*gray(x)) + (1-c)*b*m.
    """
    x = images.float()
    gray = (x * _GRAY).sum(1, keepdim=True)
    mean = gray.mean((2, 3), keepdim=True)
    b, c, s = params.brightness, params.contrast, params.saturation
    out = (b * c) * (s * x + (1 - s) * gray) + (1 - c) * b * mean
    return out.round_().clamp_(0, 255).to(torch.uint8)


def augment(images: dict[str, torch.Tensor], params: AugmentParams, size: int) -> dict[str, torch.Tensor]:
    """Apply one draw to a decoded sample; every output is `size` x `size`."""
    bilinear = InterpolationMode.BILINEAR
    rgb = _crop(_stack_rgb(images), params, size, bilinear)
    out = dict(zip(_RGB_PAIR, _jitter(rgb, params)))
    out[schema.MASK] = _crop(images[schema.MASK], params, size, InterpolationMode.NEAREST_EXACT)
    out[schema.DEPTH] = _crop(images[schema.DEPTH], params, size, bilinear)
    return out


def _stack_rgb(images: dict[str, torch.Tensor]) -> torch.Tensor:
    bg, bgfg = images[schema.BG], images[schema.BGFG]
    if bg.shape != bgfg.shape:  # one op for both when possible; else bring bg to bgfg's size
        bg = F.resize(bg, list(bgfg.shape[-2:]), antialias=True)
    return torch.stack((bg, bgfg))


def resize_only(images: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Eval: bring each member to `size` x `size` (mask by nearest neighbour), nothing else."""
    out = {}
    for name, image in images.items():
        if image.shape[-2:] != (size, size):
            nearest = name == schema.MASK
            image = F.resize(image, [size, size], antialias=True,
                             interpolation=InterpolationMode.NEAREST_EXACT if nearest else InterpolationMode.BILINEAR)
        out[name] = image
    return out
