"""Training losses: BCE + Dice (+ Lovasz hinge, + BCE near the outline) for the mask, L1 + SSIM +
image-gradient (+ squared error) for the depth map."""

from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True, kw_only=True)
class LossWeights:
    """How much each term adds to the total loss (0 switches a term off)."""

    bce: float = 1.0
    dice: float = 1.0
    l1: float = 3.0  # absolute depth counts most: 3 beat 1 on held-out backgrounds (bench/quality.py)
    ssim: float = 1.0
    grad: float = 1.0
    lovasz: float = 0.0  # the Lovasz hinge: a convex surrogate of 1 - IoU, sorted per image
    edge: float = 0.0  # BCE again on the pixels near the mask's outline, where the IoU is lost
    l2: float = 0.0  # squared depth error: what RMSE judges, weighing the few large errors more than L1

    def to_dict(self) -> dict:
        return asdict(self)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per image, averaged; `eps` keeps an empty mask + empty prediction at 0."""
    prob = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    overlap = (prob * target).sum(1)
    total = prob.sum(1) + target.sum(1)
    return (1 - (2 * overlap + eps) / (total + eps)).mean()


def lovasz_hinge(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The Lovasz hinge of Berman et al. (2018), per image then averaged: the hinge errors in
    descending order, each weighted by how much it moves that image's Jaccard loss."""
    logits, target = logits.flatten(1), target.flatten(1)
    errors = 1 - logits * (2 * target - 1)
    errors, order = errors.sort(1, descending=True)
    truth = target.gather(1, order)
    positives = truth.sum(1, keepdim=True)
    jaccard = 1 - (positives - truth.cumsum(1)) / (positives + (1 - truth).cumsum(1))
    weights = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], 1)
    return (F.relu(errors) * weights).sum(1).mean()


EDGE_RADIUS = 2  # pixels either side of the outline that edge_bce counts


def edge_bce(logits: torch.Tensor, target: torch.Tensor, radius: int = EDGE_RADIUS) -> torch.Tensor:
    """BCE averaged over the band within `radius` pixels of the target's outline (its dilation
    minus its erosion); 0 for a batch without any outline."""
    window = 2 * radius + 1
    dilated = F.max_pool2d(target, window, 1, radius)
    eroded = -F.max_pool2d(-target, window, 1, radius)
    band = dilated - eroded
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * band).sum() / band.sum().clamp(min=1)


def ssim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(1 - SSIM) / 2 over 3x3 windows (the monodepth form), for images in 0..1."""
    c1, c2 = 0.01**2, 0.03**2
    pred, target = F.pad(pred, (1, 1, 1, 1), mode="reflect"), F.pad(target, (1, 1, 1, 1), mode="reflect")
    mu_p, mu_t = F.avg_pool2d(pred, 3, 1), F.avg_pool2d(target, 3, 1)
    var_p = F.avg_pool2d(pred * pred, 3, 1) - mu_p**2
    var_t = F.avg_pool2d(target * target, 3, 1) - mu_t**2
    cov = F.avg_pool2d(pred * target, 3, 1) - mu_p * mu_t
    ssim = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return ((1 - ssim) / 2).clamp(0, 1).mean()


def gradient_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences: keeps depth edges sharp."""
    return F.l1_loss(_diff_x(pred), _diff_x(target)) + F.l1_loss(_diff_y(pred), _diff_y(target))


def _diff_x(t: torch.Tensor) -> torch.Tensor:
    return t[..., :, 1:] - t[..., :, :-1]


def _diff_y(t: torch.Tensor) -> torch.Tensor:
    return t[..., 1:, :] - t[..., :-1, :]


def total_loss(
    mask_logits: torch.Tensor,
    depth: torch.Tensor,
    mask_target: torch.Tensor,
    depth_target: torch.Tensor,
    weights: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of all terms and each term (detached) for logging.

    Targets are floats: mask 0/1 and depth 0..1, shaped like the predictions. Computed in
    float32 even under autocast, so bf16 rounding cannot swamp small terms.
    """
    mask_logits, depth = mask_logits.float(), depth.float()
    terms = {
        "bce": F.binary_cross_entropy_with_logits(mask_logits, mask_target),
        "dice": dice_loss(mask_logits, mask_target),
        "l1": F.l1_loss(depth, depth_target),
        "ssim": ssim_loss(depth, depth_target),
        "grad": gradient_loss(depth, depth_target),
    }
    if weights.lovasz:  # a sort of every pixel: only when it counts
        terms["lovasz"] = lovasz_hinge(mask_logits, mask_target)
    if weights.edge:
        terms["edge"] = edge_bce(mask_logits, mask_target)
    if weights.l2:
        terms["l2"] = F.mse_loss(depth, depth_target)
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, {name: value.detach() for name, value in terms.items()}
