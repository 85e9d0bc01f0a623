"""Trivial predictors fitted on the training shards: the bar a depth model must clear.

"constant" predicts the training set's mean depth everywhere; "per-row" predicts each image
row's mean training depth (the ground-plane prior: lower rows are nearer). Both predict "no
object" for the mask. A model whose validation depth RMSE is not clearly below theirs has
learned the training backgrounds, not depth. "bgsub" predicts the mask alone, by background
subtraction (training.bgsub: |bgfg - bg| above a threshold fitted on the first
BGSUB_FIT_SAMPLES of the same samples, then a median filter): a mask model must beat it, since
it needs no model. The fit reads un-augmented training samples at the
training image size, at most `limit` of them (split over the ranks, sums all-reduced), so its
cost is bounded however large the dataset is.
"""

from dataclasses import dataclass

import torch

from model import SegDepthMetrics
from pipeline import make_loader

from . import UserError
from . import bgsub
from .distributed import all_sum

FIT_SAMPLES = 1024  # enough for a mean per row to settle to about 1/255 on these datasets
BGSUB_FIT_SAMPLES = 200  # the threshold settles to a level or two by then; each costs a pass of the search
DEPTH_NAMES = ("constant", "per-row")
MASK_NAMES = ("bgsub",)
NAMES = DEPTH_NAMES + MASK_NAMES
MASK_METRICS = ("iou", "dice")  # what a mask-only predictor is scored on


@dataclass
class Baselines:
    mean: float  # mean training depth, 0..1
    row_mean: torch.Tensor  # [H] mean training depth of each row, 0..1
    samples: int  # training samples the means come from (all ranks)
    threshold: int  # background subtraction's, on the 0..255 scale of |bgfg - bg|

    def predict(self, depth_like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each predictor's depth map, shaped like `depth_like` [B,1,H,W]."""
        rows = self.row_mean.to(depth_like.device, depth_like.dtype).view(1, 1, -1, 1)
        return {"constant": torch.full_like(depth_like, self.mean), "per-row": rows.expand_as(depth_like)}


def _targets(batches, device):
    """(batch, mask 0/1, depth 0..1): un-augmented `batches` and their float targets on `device`."""
    for batch in batches:
        if len(batch["key"]):  # a rank with fewer samples than batches gets empty ones
            images = batch.to(device)
            yield batch, images["mask"], images["depth"] / 255


def _difference(batch, device) -> torch.Tensor:
    return bgsub.difference(batch["bg"].to(device), batch["bgfg"].to(device))


def fit(train_urls, loader_args: dict, device, limit: int = FIT_SAMPLES,
        bgsub_limit: int = BGSUB_FIT_SAMPLES) -> Baselines:
    """Mean depth and mean depth per row over the first `limit` training samples (eval order;
    the converter pre-shuffles the shards, so they are a random mix of backgrounds), and the
    background-subtraction threshold over the first `bgsub_limit` of them."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    share, bgsub_share = -(-limit // world), -(-min(bgsub_limit, limit) // world)
    size = loader_args["image_size"]
    row_sums, count = torch.zeros(size, dtype=torch.float64, device=device), 0
    diffs, masks = [], []
    for batch, mask, depth in _targets(make_loader(train_urls, train=False, epoch=0, **loader_args), device):
        depth = depth[: share - count]
        row_sums += depth.double().sum((0, 1, 3))
        if count < bgsub_share:
            diffs.append(_difference(batch, device)[: bgsub_share - count])
            masks.append(mask[: bgsub_share - count])
        count += depth.shape[0]
        if count >= share:
            break
    *row_sums, count = all_sum(row_sums.tolist() + [count])
    if not count:
        raise UserError("no training sample could be read to fit the baselines")
    row_mean = torch.tensor(row_sums, dtype=torch.float64) / (count * size)
    empty = torch.zeros(0, size, size, dtype=torch.uint8, device=device)  # a rank that read nothing
    threshold = bgsub.fit_threshold(torch.cat(diffs) if diffs else empty, torch.cat(masks) if masks else empty)
    return Baselines(mean=float(row_mean.mean()), row_mean=row_mean.float(), samples=int(count), threshold=threshold)


class Scorer:
    """Each predictor's metrics, batch by batch: update() with a batch and its float targets (it
    can ride along a model's validation pass: training.steps.evaluate's `also`), then compute()."""

    def __init__(self, baselines: Baselines, device):
        self.baselines = baselines
        self.metrics = {name: SegDepthMetrics(device) for name in NAMES}

    @torch.no_grad()
    def update(self, batch, mask: torch.Tensor, depth: torch.Tensor) -> None:
        """`batch`: an un-augmented loader batch (its uint8 bg and bgfg); its targets as floats
        (mask 0/1, depth 0..1) on the scorer's device."""
        no_object = torch.full_like(mask, -1.0)
        depths = self.baselines.predict(depth)
        for name in DEPTH_NAMES:
            self.metrics[name].update(no_object, depths[name], mask, depth)
        found = bgsub.predict(_difference(batch, mask.device), self.baselines.threshold)
        self.metrics["bgsub"].update(found.float() * 2 - 1, depths["per-row"], mask, depth)

    def compute(self) -> dict[str, dict[str, float]]:
        """SegDepthMetrics.compute of each predictor, all ranks together (MASK_METRICS only for
        the mask predictors, whose depth is not their own)."""
        for accumulator in self.metrics.values():
            accumulator.all_reduce()
        scores = {name: accumulator.compute() for name, accumulator in self.metrics.items()}
        for name in MASK_NAMES:
            scores[name] = {metric: scores[name][metric] for metric in MASK_METRICS}
        return scores


def score(baselines: Baselines, batches, device) -> dict[str, dict[str, float]]:
    """Each predictor's metrics on this rank's eval `batches` (a validation pass, e.g.
    Pipeline.epoch(0) of the val shards), all ranks together."""
    scorer = Scorer(baselines, device)
    for batch, mask, depth in _targets(batches, device):
        scorer.update(batch, mask, depth)
    return scorer.compute()


def summary(scores: dict, fitted: Baselines, model: dict) -> str:
    """One line that says at a glance whether the model beats not looking (depth) and not
    learning (mask)."""
    rmse = ", ".join(f"{scores[name]['rmse']:.4g} {name}" for name in DEPTH_NAMES)
    return (f"baselines fitted on {fitted.samples} training samples, on the validation shards: depth rmse "
            f"{rmse}, the model {model['rmse']:.4g}; mask iou {scores['bgsub']['iou']:.4g} background subtraction "
            f"(|bgfg - bg| > {fitted.threshold}, {bgsub.MEDIAN}x{bgsub.MEDIAN} median), the model {model['iou']:.4g}")
