"""Validation metrics as accumulators: update per batch, all-reduce across ranks, compute.

Mask: IoU and Dice over all pixels of the evaluated set (pixel sums, not a mean of per-image
scores, so images with an empty mask do not need a special case). Depth, on the 0..1 scale
of the targets: RMSE over all pixels; AbsRel = mean |pred - true| / true and delta1 = share
of pixels with max(pred/true, true/pred) < 1.25, both over pixels whose true depth is at
least one 8-bit level (>= 1/255), because the ratio is undefined at 0; predictions are
clamped to the same floor before dividing. ssi_rmse, the scale-and-shift-invariant RMSE of
monocular depth work: each image's prediction is first mapped by the least-squares scale and
shift onto its truth (so it scores the depth's shape, not its units), then the residuals of all
pixels are pooled as for RMSE. A constant prediction scores each image's own spread.
"""

import torch
import torch.distributed as dist

DEPTH_FLOOR = 1 / 255
_FIELDS = ("intersection", "union", "mask_sum", "pixels", "sq_err", "valid", "abs_rel", "delta1", "ssi_sq_err")


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def aligned_sq_err(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Sum over images of the squared residual after the least-squares fit true ~ s * pred + t
    per image ([B,...] float64): var(true) - cov^2 / var(pred), summed over pixels."""
    pred, true = pred.flatten(1), true.flatten(1)
    pred, true = pred - pred.mean(1, keepdim=True), true - true.mean(1, keepdim=True)
    var_pred, cov = (pred * pred).sum(1), (pred * true).sum(1)
    explained = torch.where(var_pred > 1e-12, cov * cov / var_pred.clamp(min=1e-12), torch.zeros_like(cov))
    return ((true * true).sum(1) - explained).clamp(min=0).sum()


class SegDepthMetrics:
    """Sums in float64 so millions of pixels add up exactly enough."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.sums = torch.zeros(len(_FIELDS), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, mask_logits, depth, mask_target, depth_target) -> None:
        """Predictions as the model returns them; targets as floats (mask 0/1, depth 0..1)."""
        pred = (mask_logits > 0).double()
        true = (mask_target > 0.5).double()
        depth, depth_target = depth.double(), depth_target.double()
        valid = depth_target >= DEPTH_FLOOR - 1e-9
        ratio_pred = depth.clamp(min=DEPTH_FLOOR)[valid]
        ratio_true = depth_target[valid]
        ratio = torch.maximum(ratio_pred / ratio_true, ratio_true / ratio_pred)
        self.sums += torch.stack(
            [
                (pred * true).sum(),
                ((pred + true) > 0).double().sum(),
                pred.sum() + true.sum(),
                torch.ones_like(depth).sum(),  # the pixel count, made where the data is
                ((depth - depth_target) ** 2).sum(),
                valid.double().sum(),
                ((ratio_pred - ratio_true).abs() / ratio_true).sum(),
                (ratio < 1.25).double().sum(),
                aligned_sq_err(depth, depth_target),
            ]
        ).to(self.sums.device)

    def all_reduce(self) -> None:
        """Sum the accumulators over all ranks (no-op without torch.distributed)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)

    def compute(self) -> dict[str, float]:
        """iou, dice, rmse, abs_rel, delta1, ssi_rmse (NaN for a ratio with nothing to count)."""
        s = dict(zip(_FIELDS, self.sums.tolist()))
        return {
            # Both masks empty everywhere is a perfect score, not 0/0.
            "iou": _ratio(s["intersection"], s["union"]) if s["union"] else 1.0,
            "dice": _ratio(2 * s["intersection"], s["mask_sum"]) if s["mask_sum"] else 1.0,
            "rmse": _ratio(s["sq_err"], s["pixels"]) ** 0.5,
            "abs_rel": _ratio(s["abs_rel"], s["valid"]),
            "delta1": _ratio(s["delta1"], s["valid"]),
            "ssi_rmse": _ratio(s["ssi_sq_err"], s["pixels"]) ** 0.5,
        }
