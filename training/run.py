"""The state of one training run: the parts train.py builds at setup and the position it
has reached, passed to its loop, validation, logging and checkpoints (training/checkpoint.py
saves and restores the position)."""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from model import LossWeights, UNetConfig
from pipeline import Pipeline
from training import distributed, signals
from training.logger import RunLogger, Window


@dataclass
class Run:
    """Everything one training run holds: the parts built at setup and the position reached."""

    args: object
    ctx: distributed.Context
    stop_request: signals.StopRequest
    out: Path
    train_urls: list
    loader_args: dict  # make_loader's arguments, but for train and epoch
    train_data: Pipeline  # the training shards' batches, epoch after epoch, from workers that live all run
    val_data: Pipeline | None  # the validation shards', from workers of their own (None: no validation)
    loader_identity: dict  # what must not change for a mid-epoch resume to see the same batches
    config: UNetConfig
    model: torch.nn.Module
    forward: torch.nn.Module  # the model as trained: DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    weights: LossWeights
    amp_dtype: torch.dtype | None
    total_steps: int
    logger: RunLogger | None = None
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped_before: int = 0  # bad samples met in earlier epochs, all ranks
    skipped_this_epoch: int = 0
    best_loss: float = math.inf
    last_validated: int = -1
    signum: int = 0  # the stop signal every rank has agreed on, 0 while none
    baselines_logged: bool = False
    window: Window = field(default_factory=Window)

    def say(self, message: str) -> None:
        if self.ctx.is_main:
            tqdm.write(message)
