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

_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision
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


def _jitter(images: torch.Tensor, params: AugmentParams, out: list[torch.Tensor]) -> None:
    """Brightness, contrast, saturation on [N,3,H,W] uint8 (same factors), into out[0..N-1].

    Equal to applying the three in that order without clamping in between: with gray(x)
    the luminance and m its mean, b*c*s*x + b*c*(1-s)*gray(x) + (1-c)*b*m. Written as
    in-place steps on one float copy: this runs once per sample, and allocations dominate.
    """
    b, c, s = params.brightness, params.contrast, params.saturation
    x = images.float()
    gray = x[:, 0] * _GRAY_WEIGHTS[0]
    gray.add_(x[:, 1], alpha=_GRAY_WEIGHTS[1]).add_(x[:, 2], alpha=_GRAY_WEIGHTS[2])
    offset = gray.mean((1, 2), keepdim=True).mul_((1 - c) * b).add_(0.5)  # +0.5: round, not truncate
    gray.mul_(b * c * (1 - s)).add_(offset)
    x.mul_(b * c * s).add_(gray.unsqueeze(1)).clamp_(0, 255)
    for image, target in zip(x, out):
        target.copy_(image)  # float to uint8 truncates; the +0.5 above made that rounding


def new_outputs(size: int) -> dict[str, torch.Tensor]:
    """Empty uint8 output images of one sample (3 channels for RGB members, 1 otherwise)."""
    return {name: torch.empty((3 if name in _RGB_PAIR else 1, size, size), dtype=torch.uint8)
            for name in schema.IMAGE_MEMBERS}


def augment(images: dict[str, torch.Tensor], params: AugmentParams, size: int,
            out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Apply one draw to a decoded sample, writing `size` x `size` images into `out`
    (member -> uint8 [C,size,size], e.g. slots of a batch; new ones when None)."""
    out = new_outputs(size) if out is None else out
    bilinear = InterpolationMode.BILINEAR
    rgb = _crop(_stack_rgb(images), params, size, bilinear)
    _jitter(rgb, params, [out[name] for name in _RGB_PAIR])
    out[schema.MASK].copy_(_crop(images[schema.MASK], params, size, InterpolationMode.NEAREST_EXACT))
    out[schema.DEPTH].copy_(_crop(images[schema.DEPTH], params, size, bilinear))
    return out


def _stack_rgb(images: dict[str, torch.Tensor]) -> torch.Tensor:
    bg, bgfg = images[schema.BG], images[schema.BGFG]
    if bg.shape != bgfg.shape:  # one op for both when possible; else bring bg to bgfg's size
        bg = F.resize(bg, list(bgfg.shape[-2:]), antialias=True)
    return torch.stack((bg, bgfg))


def resize_only(images: dict[str, torch.Tensor], size: int,
                out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Eval: bring each member to `size` x `size` (mask by nearest neighbour) into `out`."""
    out = new_outputs(size) if out is None else out
    for name, image in images.items():
        if image.shape[-2:] != (size, size):
            nearest = name == schema.MASK
            image = F.resize(image, [size, size], antialias=True,
                             interpolation=InterpolationMode.NEAREST_EXACT if nearest else InterpolationMode.BILINEAR)
        out[name].copy_(image)
    return out
