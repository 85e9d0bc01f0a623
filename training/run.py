"""One training run's state, in two parts: what train.py builds at setup (Setup, frozen) and
the position the run has reached (Progress, changed only by its own methods). Checkpoints
save and restore the Progress (training/checkpoint.py)."""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from model import LossWeights, UNetConfig
from pipeline import Pipeline
from training import distributed, signals


@dataclass(frozen=True, kw_only=True)
class Setup:
    """The parts of a run built before its first step; none of them is replaced while it runs."""

    args: object
    ctx: distributed.Context
    stop_request: signals.StopRequest
    train_urls: list
    loader_args: dict  # make_loader's arguments, but for train and epoch
    train_data: Pipeline  # the training shards' batches, epoch after epoch, from workers that live all run
    val_data: dict  # validation source name -> its shards' Pipeline, workers of its own (empty: no validation)
    config: UNetConfig
    model: torch.nn.Module
    forward: torch.nn.Module  # the model as trained: DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    weights: LossWeights
    amp_dtype: torch.dtype | None

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    @property
    def steps_per_epoch(self) -> int:
        return self.train_data.batches_per_epoch

    @property
    def total_steps(self) -> int:
        return self.args.steps or self.args.epochs * self.steps_per_epoch

    def say(self, message: str) -> None:
        if self.ctx.is_main:
            tqdm.write(message)


@dataclass(kw_only=True)
class Progress:
    """Where the run stands: steps taken, the position in the epoch (the training loader's
    state: pipeline.elastic, so any topology can go on from it), bad samples met (all ranks),
    the best validation loss. Each field changes in one method below."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # steps taken in this epoch, on whatever topologies
    loader_state: dict | None = None  # after the last step; None at an epoch's top
    epoch_done: bool = False  # the last step took the epoch's last batch
    skipped_before: int = 0  # bad samples met in earlier epochs and earlier runs, all ranks
    skipped_this_epoch: int = 0  # as last agreed over the ranks (at a log line)
    best_loss: float = math.inf
    last_validated: int = -1  # the step of this process's last validation; -1 before its first

    @property
    def skipped(self) -> int:
        """Every bad sample the run has met so far, all ranks."""
        return int(self.skipped_before + self.skipped_this_epoch)

    def took_step(self, loader) -> None:
        """One step on a batch of `loader` (a pipeline.Loader)."""
        self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
        self.loader_state = loader.state_dict()
        self.epoch_done = loader.start_batch + loader.taken == loader.batches_per_epoch

    def count_skipped(self, this_epoch: int) -> None:
        """The bad samples this epoch's loader has met so far, summed over the ranks."""
        self.skipped_this_epoch = int(this_epoch)

    def finish_epoch(self, skipped: int) -> None:
        """The epoch ran out, having met `skipped` bad samples (all ranks): the next starts at its top."""
        self.skipped_before += int(skipped)
        self.skipped_this_epoch = 0
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        self.loader_state, self.epoch_done = None, False

    def validated(self, loss: float) -> bool:
        """Record a validation at this step; True when its loss is the best yet."""
        self.last_validated = self.step
        improved = loss < self.best_loss
        self.best_loss = min(self.best_loss, loss)
        return improved

    def state_dict(self) -> dict:
        """The checkpoint's part of it; a finished epoch is saved as the next one's top."""
        done = self.epoch_done
        return {"step": self.step, "epoch": self.epoch + done, "batch_in_epoch": 0 if done else self.batch_in_epoch,
                "loader_state": None if done else self.loader_state,
                "skipped": self.skipped, "best_val_loss": self.best_loss}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Progress":
        """From state_dict(); a checkpoint without a loader state (an earlier version's) goes on
        at its batch_in_epoch, on the same topology."""
        return cls(step=state["step"], epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
                   loader_state=state.get("loader_state"), skipped_before=state["skipped"],
                   best_loss=state["best_val_loss"])

    def pass_start(self) -> dict:
        """Pipeline.epoch's arguments for the rest of the epoch this progress is in."""
        if self.loader_state is not None:
            return {"state": self.loader_state}
        return {"epoch": self.epoch, "start_batch": self.batch_in_epoch}
