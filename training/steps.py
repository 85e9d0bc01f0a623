"""Batches to device tensors, one optimizer step, one validation pass (train.py and bench/)."""

import torch

from model import LossWeights, SegDepthMetrics, to_input, total_loss
from pipeline import make_loader

from .distributed import all_sum


def prepare_batch(batch, device: torch.device, channels_last: bool = False):
    """Loader batch -> (network input, mask target 0/1, depth target 0..1) on `device`.

    Batch.to converts to float and applies the augmentation after the copy, so only bytes
    cross the bus and no worker spends a core on per-pixel float work.
    """
    images = batch.to(device)  # train batches are augmented there
    x = to_input(images["bgfg"], images["bg"])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, images["mask"], images["depth"].div_(255)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def train_step(forward, optimizer, scaler, x, mask, depth, *, weights: LossWeights = LossWeights(),
               amp_dtype=None):
    """Forward, loss, backward and optimizer step; returns (loss detached, terms dict).

    `scaler` is a torch.amp.GradScaler (enabled only for fp16). The LR schedule is the
    caller's, so the step can be timed alone.
    """
    with autocast(x.device, amp_dtype):
        logits, depth_pred = forward(x)
    loss, terms = total_loss(logits, depth_pred, mask, depth, weights)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), terms


@torch.no_grad()
def evaluate(model, urls, loader_args: dict, device, *, amp_dtype=None, channels_last=False,
             weights: LossWeights = LossWeights(), previews: int = 0):
    """Score `model` on every sample of `urls` (split across ranks, sums all-reduced).

    Returns (metrics dict with loss, iou, dice, rmse, abs_rel, delta1, ssi_rmse, samples; preview
    tensors (bg, bgfg, mask, logits, depth, predicted depth) of this rank's first samples or None).
    """
    was_training = model.training
    model.eval()
    metrics = SegDepthMetrics(device)
    loss_sum, count, preview = 0.0, 0, None
    for batch in make_loader(urls, train=False, epoch=0, **loader_args):
        if len(batch["key"]) == 0:  # a rank with fewer samples than batches gets empty ones
            continue
        x, mask, depth = prepare_batch(batch, device, channels_last)
        with autocast(device, amp_dtype):
            logits, depth_pred = model(x)
        loss, _ = total_loss(logits, depth_pred, mask, depth, weights)
        size = x.shape[0]
        loss_sum, count = loss_sum + loss.item() * size, count + size
        metrics.update(logits, depth_pred, mask, depth)
        if previews and preview is None:
            preview = (batch["bg"][:previews], batch["bgfg"][:previews], mask[:previews], logits[:previews].float(),
                       depth[:previews], depth_pred[:previews].float())
    model.train(was_training)
    metrics.all_reduce()
    loss_sum, count = all_sum([loss_sum, count], device)
    result = {"loss": loss_sum / count if count else float("nan"), **metrics.compute(), "samples": int(count)}
    return result, preview
