"""Background subtraction: the mask a model gets without learning anything.

A pixel is "object" where the largest channel of |bgfg - bg| is above a threshold; a 5x5
median filter then drops isolated pixels (JPEG noise in the background) and fills pinholes
(object pixels that happen to match the background). The threshold is the one that scores the
best IoU on training samples, over all 8-bit levels at once; the filter's window is fixed.
Images are the loader's uint8 tensors, so the difference is exact and the same on every device.
"""

import torch

from .distributed import all_sum

MEDIAN = 5  # the filter's window, pixels


def difference(bg: torch.Tensor, bgfg: torch.Tensor) -> torch.Tensor:
    """The largest channel of |bgfg - bg|: uint8 [B,3,H,W] pairs -> uint8 [B,H,W]."""
    return (bgfg.to(torch.int16) - bg.to(torch.int16)).abs().amax(1).to(torch.uint8)


def median_difference(diff: torch.Tensor) -> torch.Tensor:
    """The 5x5 median of `diff` [B,H,W] (the border pixels repeated outward, so an object at
    the edge keeps its edge), uint8 [B,1,H,W]. Thresholding it is thresholding `diff` and then
    taking the majority of each window (at least 13 of 25 above t is: the median above t), so
    one filtered image serves every threshold."""
    height, width = diff.shape[-2:]
    half = MEDIAN // 2
    rows = torch.arange(-half, height + half, device=diff.device).clamp(0, height - 1)
    cols = torch.arange(-half, width + half, device=diff.device).clamp(0, width - 1)
    padded = diff[:, rows][:, :, cols]
    windows = [padded[:, i:i + height, j:j + width] for i in range(MEDIAN) for j in range(MEDIAN)]
    # Bit by bit from the highest, the largest m with more than half the window at or above m:
    # 8 rounds of comparisons, some 8x faster than sorting every window on the CPU.
    median = torch.zeros_like(diff)
    for bit in (128, 64, 32, 16, 8, 4, 2, 1):
        candidate = median | bit
        count = torch.zeros_like(diff)
        for window in windows:
            count += window >= candidate
        median = torch.where(count > MEDIAN**2 // 2, candidate, median)
    return median.unsqueeze(1)


def predict(diff: torch.Tensor, threshold: int) -> torch.Tensor:
    """Object pixels (bool [B,1,H,W]) of differences `diff` [B,H,W]: above `threshold`, then the
    median filter."""
    return median_difference(diff) > threshold


def fit_threshold(diff: torch.Tensor, mask: torch.Tensor) -> int:
    """The threshold (0..254) whose prediction has the best IoU against `mask` over this rank's
    `diff` [B,H,W] and every other rank's (the lowest of equals), over every level at once:
    from the histograms of the filtered differences inside and outside the mask, the object
    pixels above t are the overlap, and the mask plus the background pixels above t the union."""
    medians = median_difference(diff).flatten().long()
    inside = mask.bool().flatten()
    histograms = torch.cat([torch.bincount(medians[inside], minlength=256),
                            torch.bincount(medians[~inside], minlength=256)])
    histograms = torch.tensor(all_sum(histograms.tolist()), dtype=torch.float64).view(2, 256)
    above = histograms.flip(1).cumsum(1).flip(1)[:, 1:]  # [:, t]: pixels whose median is above t, t = 0..254
    overlap, union = above[0], histograms[0].sum() + above[1]
    scores = torch.where(union > 0, overlap / union.clamp(min=1), torch.ones_like(union))
    return int(torch.nonzero(scores == scores.max())[0])
