"""Run records on rank 0: OUT/metrics.jsonl always, TensorBoard events when it is installed."""

import json
import time
from pathlib import Path

from training import distributed

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # tensorboard is optional
    SummaryWriter = None


class Window:
    """Totals since the last log line: loss summed over samples (a device tensor), samples,
    data wait, and the loader's worker seconds per stage (`loader`: read, decode, fit)."""

    STAGES = ("read", "decode", "fit")

    def __init__(self):
        self.start = time.perf_counter()
        self.loss, self.samples, self.data_wait = 0.0, 0, 0.0
        self.loader = dict.fromkeys(self.STAGES, 0.0)
        self._followed, self._seen = None, {}

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def follow(self, loader) -> None:
        """Count `loader`'s stage seconds from now on (a window can span two epochs' loaders)."""
        self._followed, self._seen = loader, {stage: loader.stats[f"{stage}_s"] for stage in self.STAGES}

    def next(self) -> "Window":
        """The window after this one: it counts the loader's stages from where this one stopped."""
        following = Window()
        following._followed, following._seen = self._followed, dict(self._seen)
        return following

    def take_loader_stats(self, loader) -> None:
        """Add what `loader`'s stages took since last seen."""
        if loader is not self._followed:
            self.follow(loader)
        for stage in self.STAGES:
            now = loader.stats[f"{stage}_s"]
            self.loader[stage] += now - self._seen[stage]
            self._seen[stage] = now


class RunLogger:
    """One JSON object per call to `log` (appended, so a resumed run continues the file)."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.file = open(out / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.writer = SummaryWriter(str(out / "tensorboard")) if enabled and SummaryWriter else None

    def log(self, kind: str, step: int, values: dict) -> None:
        """kind is 'train' or 'val'; numbers also go to TensorBoard as kind/name."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer:
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()


def log_window(run, loader, terms: dict | None, bar) -> None:
    """One metrics.jsonl line (and progress-bar figures) for `run`'s steps since the last one
    (a training.run.Run; `terms` the last step's loss terms, `bar` its tqdm bar).

    Besides data_wait (the share of the time the loop waited for a batch), it says where this
    rank's loader spent its time: loader_read_ms, loader_decode_ms, loader_fit_ms are worker
    milliseconds per sample (summed over the workers: read = tar stream and shuffle buffer,
    decode = JPEGs, fit = resizing, thresholding and drawing the augmentation), so a slow
    step shows whether the data or the model held it up, and which stage of the data.
    """
    window = run.window
    window.take_loader_stats(loader)
    loss_sum, samples, run.skipped_this_epoch = distributed.all_sum(
        [float(window.loss), window.samples, len(loader.skipped)])
    seconds = window.seconds()
    local_samples = max(window.samples, 1)
    record = {"epoch": run.epoch, "loss": loss_sum / samples if samples else float("nan"),
              **{k: float(v) for k, v in (terms or {}).items()}, "lr": run.scheduler.get_last_lr()[0],
              "samples_per_s": samples / seconds, "data_wait": window.data_wait / seconds,
              **{f"loader_{stage}_ms": 1000 * window.loader[stage] / local_samples for stage in Window.STAGES},
              "skipped": int(run.skipped_before + run.skipped_this_epoch)}
    run.logger.log("train", run.step, record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
    run.window = window.next()
