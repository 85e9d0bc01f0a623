"""Batches to device tensors, one optimizer step and its schedule, one validation pass (train.py
and bench/)."""

import math

import torch
import torch.distributed as dist

from model import LossWeights, SegDepthMetrics, flip_averaged, to_input, total_loss

from .distributed import all_sum


def prepare_batch(batch, device: torch.device, channels_last: bool = False, soft_mask: bool = False):
    """Loader batch -> (network input, mask target 0/1 (0..1 along the outline of an augmented
    batch with `soft_mask`), depth target 0..1) on `device`.

    Batch.to converts to float and applies the augmentation after the copy, so only bytes
    cross the bus and no worker spends a core on per-pixel float work.
    """
    images = batch.to(device, soft_mask=soft_mask)  # train batches are augmented there
    x = to_input(images["bgfg"], images["bg"])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, images["mask"], images["depth"].div_(255)


def warmup_cosine(warmup: int, total: int):
    """LR factor per step: linear warmup, then a cosine from 1 down to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(1, total - warmup), 1.0)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def amp_dtype_for(choice: str, device: torch.device) -> torch.dtype | None:
    """--amp's choice as an autocast dtype (None: full precision). auto: bf16 on a GPU with bf16
    arithmetic (Ampere and later), fp16 with loss scaling on older ones (T4, V100: there bf16 is
    emulated, slowly), off on the CPU. An explicit choice is taken as it is."""
    if choice == "auto":
        if device.type != "cuda":
            choice = "off"
        else:
            choice = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[choice]


def make_optimizer(parameters, *, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW; on CUDA its fused kernel, which also takes fp16's loss scale and inf check from
    the GradScaler on the device: with any other optimizer GradScaler.step reads the inf flag
    back (a host-device sync) every step. The CPU keeps the default kernel, whose results the
    figures in README were measured with."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=True if device.type == "cuda" else None)


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def samples_over_ranks(count: int, device: torch.device) -> tuple[torch.Tensor | int, int]:
    """(this step's samples summed over all ranks, world size). With a process group the sum
    is a device tensor, all-reduced without the host waiting for it; without one, `count`."""
    if not dist.is_initialized():
        return count, 1
    total = torch.full((), float(count), device=device)
    dist.all_reduce(total)
    return total, dist.get_world_size()


def train_step(forward, optimizer, scaler, x, mask, depth, *, weights: LossWeights = LossWeights(),
               amp_dtype=None):
    """Forward, loss, backward and optimizer step; returns (this batch's mean loss, detached;
    the loss terms, or None for an empty batch).

    A train batch can be smaller than planned, even empty (bad samples once the spares ran
    out), and under DDP every rank must still run forward and backward together, or the
    gradient all-reduce would hang. So every rank takes the step, an empty batch included,
    and each rank's loss is weighted by its share of the step's samples, world * n / N with
    N all-reduced: DDP's gradient average is then exactly the mean over all the step's
    samples, an empty batch adds a zero gradient, and full batches (the usual case) get weight
    1. That costs one scalar all-reduce per step, queued on the device (no host sync); only a
    rank whose batch is empty reads N back, to skip the optimizer step when every rank was
    empty (AdamW would still move the weights on zero gradients). `scaler` is a
    torch.amp.GradScaler (enabled only for fp16). The LR schedule is the caller's.
    """
    count = x.shape[0]
    with autocast(x.device, amp_dtype):
        logits, depth_pred = forward(x)
    total, world = samples_over_ranks(count, x.device)
    if count:
        loss, terms = total_loss(logits, depth_pred, mask, depth, weights)
        objective = loss if world == 1 else loss * (world * count / total)
    else:
        loss, terms = torch.zeros((), device=x.device), None
        objective = (logits.float().sum() + depth_pred.float().sum()) * 0.0  # a zero gradient for every parameter
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(objective).backward()
    if count or float(total) > 0:
        scaler.step(optimizer)
        scaler.update()
    return loss.detach(), terms


@torch.no_grad()
def evaluate(model, batches, device, *, amp_dtype=None, channels_last=False,
             weights: LossWeights = LossWeights(), previews: int = 0, also=None, flip_average: bool = False):
    """Score `model` on `batches` (this rank's share of a validation pass, e.g.
    Pipeline.epoch(0) of the val shards; sums all-reduced across ranks). `also`: an object
    whose update(batch, mask, depth) sees each batch and its float targets too
    (training.baselines.Scorer), so that it needs no pass of its own. `flip_average`: score
    model.flip_averaged's predictions.

    Returns (metrics dict with loss, iou, dice, rmse, abs_rel, delta1, ssi_rmse, samples; preview
    tensors (bg, bgfg, mask, logits, depth, predicted depth) of this rank's first samples or None).
    """
    was_training = model.training
    model.eval()
    metrics = SegDepthMetrics(device)
    loss_sum, count, preview = torch.zeros((), dtype=torch.float64, device=device), 0, None
    for batch in batches:
        if len(batch["key"]) == 0:  # a rank with fewer samples than batches gets empty ones
            continue
        x, mask, depth = prepare_batch(batch, device, channels_last)
        with autocast(device, amp_dtype):
            logits, depth_pred = flip_averaged(model, x) if flip_average else model(x)
        loss, _ = total_loss(logits, depth_pred, mask, depth, weights)
        size = x.shape[0]
        loss_sum, count = loss_sum + loss.detach().double() * size, count + size  # no sync per batch
        metrics.update(logits, depth_pred, mask, depth)
        if also is not None:
            also.update(batch, mask, depth)
        if previews and preview is None:
            preview = (batch["bg"][:previews].clone(), batch["bgfg"][:previews].clone(), mask[:previews],
                       logits[:previews].float(), depth[:previews], depth_pred[:previews].float())
    model.train(was_training)
    metrics.all_reduce()
    loss_sum, count = all_sum([loss_sum.item(), count])
    result = {"loss": loss_sum / count if count else float("nan"), **metrics.compute(), "samples": int(count)}
    return result, preview
