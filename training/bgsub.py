"""Background subtraction: the mask a model gets without learning anything.

A pixel is "object" where the largest channel of |bgfg - bg| is above a threshold; a 5x5
median filter then drops isolated pixels (JPEG noise in the background) and fills pinholes
(object pixels that happen to match the background). The threshold is the one that scores the
best IoU on training samples, found over the 8-bit levels; the filter's window is fixed.
Images are the loader's uint8 tensors, so the difference is exact and the same on every device.
"""

import torch
import torch.nn.functional as nn_functional

from .distributed import all_sum

MEDIAN = 5  # the filter's window, pixels
_COARSE_STEP = 8  # levels between the first search's thresholds; the second tries every level between


def difference(bg: torch.Tensor, bgfg: torch.Tensor) -> torch.Tensor:
    """The largest channel of |bgfg - bg|: uint8 [B,3,H,W] pairs -> uint8 [B,H,W]."""
    return (bgfg.to(torch.int16) - bg.to(torch.int16)).abs().amax(1).to(torch.uint8)


def predict(diff: torch.Tensor, threshold: int) -> torch.Tensor:
    """Object pixels (bool [B,1,H,W]) of differences `diff` [B,H,W]: above `threshold`, then the
    median filter (the border pixels repeated outward, so an object at the edge keeps its edge)."""
    above = (diff > threshold).float().unsqueeze(1)
    padded = nn_functional.pad(above, (MEDIAN // 2,) * 4, mode="replicate")
    votes = nn_functional.avg_pool2d(padded, MEDIAN, stride=1) * MEDIAN**2
    return votes > MEDIAN**2 / 2  # a binary median is a majority vote


def _iou_per_threshold(diff: torch.Tensor, mask: torch.Tensor, thresholds: list[int]) -> list[float]:
    """IoU of predict(diff, t) against `mask` (bool [B,1,H,W]) for each t, all ranks together."""
    counts = []
    for threshold in thresholds:
        pred = predict(diff, threshold)
        counts += [(pred & mask).sum(), (pred | mask).sum()]
    counts = all_sum(torch.stack(counts).tolist())  # one device-to-host copy, not one per count
    return [inter / union if union else 1.0 for inter, union in zip(counts[::2], counts[1::2])]


def fit_threshold(diff: torch.Tensor, mask: torch.Tensor) -> int:
    """The threshold (0..254) whose prediction has the best IoU against `mask` over this rank's
    `diff` [B,H,W] and every other rank's (the lowest of equals). Every 8th level first, then
    every level around the best of those: IoU rises and falls once as the threshold sweeps from
    taking the whole background to taking nothing."""
    mask = mask.bool().view(diff.shape[0], 1, *diff.shape[1:])
    coarse = list(range(0, 255, _COARSE_STEP))
    scores = _iou_per_threshold(diff, mask, coarse)
    best = coarse[scores.index(max(scores))]
    fine = list(range(max(0, best - _COARSE_STEP + 1), min(254, best + _COARSE_STEP - 1) + 1))
    scores = _iou_per_threshold(diff, mask, fine)
    return fine[scores.index(max(scores))]
