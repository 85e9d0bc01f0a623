"""A U-Net that reads (bgfg, bg) and predicts the pasted object's mask and the scene's depth.

One shared encoder sees both images stacked as 6 channels, so it can compare them pixel by
pixel (the difference is the object); one decoder with skip connections feeds two 1x1 heads.
"""

import functools
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

# ImageNet statistics: the usual normalisation for natural photographs.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MASK_PRIOR_LOGIT = -3.0


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """Everything needed to rebuild the network (stored in checkpoints)."""

    width: int = 24  # channels at full resolution; doubles per level up to `max_mult` x width
    levels: int = 5  # downsamplings; inputs must be divisible by 2**levels
    max_mult: int = 16
    in_channels: int = 6
    # |bgfg - bg| as 3 more input channels: what background subtraction sees, given to the stem
    # directly instead of learned from the two images by its first convolutions.
    difference_input: bool = False
    # A 3x3 convolution of each head's own before its 1x1: the two tasks stop sharing every
    # feature of the last level, so weighting the mask up pulls less on the depth.
    task_heads: bool = False

    @property
    def stride(self) -> int:
        return 2**self.levels

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UNetConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config fields {sorted(unknown)}")
        return cls(**data)


def check_image_size(size: int, config: UNetConfig) -> None:
    """Raise ValueError unless `size` can go through all the levels and come back intact."""
    if size <= 0 or size % config.stride:
        raise ValueError(
            f"image size {size} is not a positive multiple of {config.stride} "
            f"(the U-Net halves it {config.levels} times)"
        )


def _double_conv(in_ch: int, out_ch: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class _Up(nn.Module):
    """Upsample x2, concatenate the encoder's skip, then two convolutions."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int):
        super().__init__()
        self.conv = _double_conv(in_ch + skip_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], dim=1))


def _head_features(channels: int, own: bool) -> nn.Module:
    """A head's own 3x3 block, or nothing (parameter-free, so older checkpoints load unchanged)."""
    if not own:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                         nn.ReLU(inplace=True))


class UNet(nn.Module):
    """forward(x: [B,6,H,W] normalised) -> (mask logits [B,1,H,W], depth in 0..1 [B,1,H,W])."""

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = config
        chans = [config.width * min(2**i, config.max_mult) for i in range(config.levels + 1)]
        self.stem = _double_conv(config.in_channels + 3 * config.difference_input, chans[0])
        self.down = nn.ModuleList(_double_conv(chans[i], chans[i + 1]) for i in range(config.levels))
        self.up = nn.ModuleList(
            _Up(chans[i + 1], chans[i], chans[i]) for i in reversed(range(config.levels))
        )
        self.mask_features = _head_features(chans[0], config.task_heads)
        self.depth_features = _head_features(chans[0], config.task_heads)
        self.mask_head = nn.Conv2d(chans[0], 1, 1)
        self.depth_head = nn.Conv2d(chans[0], 1, 1)
        # Objects cover a few percent of the image: start the mask near that prior (about 5%)
        # instead of 50%, so early training is not spent unlearning false positives.
        nn.init.constant_(self.mask_head.bias, MASK_PRIOR_LOGIT)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_image_size(x.shape[-2], self.config)
        check_image_size(x.shape[-1], self.config)
        if self.config.difference_input:  # the halves share the normalisation: this is |bgfg - bg| / std
            x = torch.cat([x, (x[:, :3] - x[:, 3:]).abs()], 1)
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for block in self.up:
            y = block(y, skips.pop())
        mask, depth = self.mask_features(y), self.depth_features(y)
        # The 1x1 heads and the sigmoid in float32 also under autocast: in bf16 the predicted
        # depth near 1 would step by 2^-8, the size of the 8-bit target's own step.
        with torch.autocast(y.device.type, enabled=False):
            return self.mask_head(mask.float()), torch.sigmoid(self.depth_head(depth.float()))


def flip_averaged(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """model(x) averaged with the model's output for the mirrored input, mirrored back (test-time
    mirroring, as nnU-Net predicts by default): two forward passes, the errors of each half cancelling."""
    logits, depth = model(x)
    mirrored_logits, mirrored_depth = model(x.flip(-1))
    return (logits + mirrored_logits.flip(-1)) / 2, (depth + mirrored_depth.flip(-1)) / 2


@functools.cache
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a fresh host-to-GPU copy every step would stall the CUDA stream.
    mean = torch.tensor(MEAN * 2).view(1, 6, 1, 1).to(device)
    std = torch.tensor(STD * 2).view(1, 6, 1, 1).to(device)
    return mean, std


def to_input(bgfg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] pair on the 0..255 scale (uint8 or float) -> the normalised float [B,6,H,W] input."""
    x = torch.cat([bgfg, bg], dim=1).float().div_(255)
    mean, std = _normalisation(x.device)
    return (x - mean) / std


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
