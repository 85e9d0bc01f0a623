"""Trivial predictors fitted on the training shards: the bar a depth model must clear.

"constant" predicts the training set's mean depth everywhere; "per-row" predicts each image
row's mean training depth (the ground-plane prior: lower rows are nearer). Both predict "no
object" for the mask. A model whose validation depth RMSE is not clearly below theirs has
learned the training backgrounds, not depth. The fit reads un-augmented training samples at the
training image size, at most `limit` of them (split over the ranks, sums all-reduced), so its
cost is bounded however large the dataset is.
"""

from dataclasses import dataclass

import torch

from model import SegDepthMetrics
from pipeline import make_loader

from . import UserError
from .distributed import all_sum

FIT_SAMPLES = 1024  # enough for a mean per row to settle to about 1/255 on these datasets
NAMES = ("constant", "per-row")


@dataclass
class Baselines:
    mean: float  # mean training depth, 0..1
    row_mean: torch.Tensor  # [H] mean training depth of each row, 0..1
    samples: int  # training samples the means come from (all ranks)

    def predict(self, depth_like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each predictor's depth map, shaped like `depth_like` [B,1,H,W]."""
        rows = self.row_mean.to(depth_like.device, depth_like.dtype).view(1, 1, -1, 1)
        return {"constant": torch.full_like(depth_like, self.mean), "per-row": rows.expand_as(depth_like)}


def _targets(batches, device):
    """(mask 0/1, depth 0..1) float targets of un-augmented `batches`, on `device`."""
    for batch in batches:
        if len(batch["key"]):  # a rank with fewer samples than batches gets empty ones
            images = batch.to(device)
            yield images["mask"], images["depth"] / 255


def fit(train_urls, loader_args: dict, device, limit: int = FIT_SAMPLES) -> Baselines:
    """Mean depth and mean depth per row over the first `limit` training samples (eval order;
    the converter pre-shuffles the shards, so they are a random mix of backgrounds)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    share = -(-limit // world)
    size = loader_args["image_size"]
    row_sums, count = torch.zeros(size, dtype=torch.float64, device=device), 0
    for _, depth in _targets(make_loader(train_urls, train=False, epoch=0, **loader_args), device):
        depth = depth[: share - count]
        row_sums += depth.double().sum((0, 1, 3))
        count += depth.shape[0]
        if count >= share:
            break
    *row_sums, count = all_sum(row_sums.tolist() + [count])
    if not count:
        raise UserError("no training sample could be read to fit the baselines")
    row_mean = torch.tensor(row_sums, dtype=torch.float64) / (count * size)
    return Baselines(float(row_mean.mean()), row_mean.float(), int(count))


class Scorer:
    """Each predictor's metrics, batch by batch: update() with a batch's float targets (it can
    ride along a model's validation pass: training.steps.evaluate's `also`), then compute()."""

    def __init__(self, baselines: Baselines, device):
        self.baselines = baselines
        self.metrics = {name: SegDepthMetrics(device) for name in NAMES}

    @torch.no_grad()
    def update(self, mask: torch.Tensor, depth: torch.Tensor) -> None:
        no_object = torch.full_like(mask, -1.0)
        for name, prediction in self.baselines.predict(depth).items():
            self.metrics[name].update(no_object, prediction, mask, depth)

    def compute(self) -> dict[str, dict[str, float]]:
        """SegDepthMetrics.compute of each predictor, all ranks together."""
        for accumulator in self.metrics.values():
            accumulator.all_reduce()
        return {name: accumulator.compute() for name, accumulator in self.metrics.items()}


def score(baselines: Baselines, batches, device) -> dict[str, dict[str, float]]:
    """Each predictor's metrics on this rank's eval `batches` (a validation pass, e.g.
    Pipeline.epoch(0) of the val shards), all ranks together."""
    scorer = Scorer(baselines, device)
    for mask, depth in _targets(batches, device):
        scorer.update(mask, depth)
    return scorer.compute()


def summary(scores: dict, fit_samples: int, model_rmse: float) -> str:
    """One line that says at a glance whether the model's depth beats not looking."""
    rmse = ", ".join(f"{scores[name]['rmse']:.4g} {name}" for name in NAMES)
    return (f"baselines fitted on {fit_samples} training samples, depth rmse on the validation shards: "
            f"{rmse}; the model {model_rmse:.4g}")
