"""The network, its losses and its metrics."""

from .losses import LossWeights, total_loss
from .metrics import SegDepthMetrics
from .unet import UNet, UNetConfig, check_image_size, count_parameters, flip_averaged, to_input

__all__ = [
    "LossWeights",
    "SegDepthMetrics",
    "UNet",
    "UNetConfig",
    "check_image_size",
    "count_parameters",
    "flip_averaged",
    "to_input",
    "total_loss",
]
