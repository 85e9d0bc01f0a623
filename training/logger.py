"""Run records on rank 0: OUT/metrics.jsonl always, TensorBoard events when it is installed."""

import json
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline import cache
from pipeline.batches import STAGES
from training import distributed

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # tensorboard is optional
    SummaryWriter = None


# The loader's stats a window adds up: its stages' seconds, and its cache's counts (with a cache_dir).
CACHE_COUNTS = tuple(f"cache_{name}" for name in cache.COUNTS)
_COUNTED = tuple(f"{stage}_s" for stage in STAGES) + CACHE_COUNTS + ("restarts",)


class Window:
    """Totals since the last log line: loss summed over samples (a device tensor), samples,
    data wait, the loader's worker seconds per stage (`loader`, by pipeline.batches.STAGES),
    its cache's counts (`cache`, by CACHE_COUNTS), the bytes its cache_dir held when last
    seen (`cache_bytes`; None without one) and its workers' restarts (`worker_restarts`)."""

    def __init__(self):
        self._followed, self._seen, self.cache_bytes = None, {}, None
        self.restart()

    def restart(self) -> None:
        """Start the next window; the loader's stages count on from where this one stopped."""
        self.start = time.perf_counter()
        self.loss, self.samples, self.data_wait = 0.0, 0, 0.0
        self.loader = dict.fromkeys(STAGES, 0.0)
        self.cache = dict.fromkeys(CACHE_COUNTS, 0)
        self.worker_restarts = 0

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def follow(self, loader) -> None:
        """Count `loader`'s stage seconds and cache counts from now on (a window can span two
        epochs' loaders)."""
        self._followed, self._seen = loader, {name: loader.stats.get(name, 0) for name in _COUNTED}

    def take_loader_stats(self, loader) -> None:
        """Add what `loader`'s stages took, and its cache counted, since last seen."""
        if loader is not self._followed:
            self.follow(loader)
        for name in _COUNTED:
            now = loader.stats.get(name, 0)
            added, self._seen[name] = now - self._seen[name], now
            if name in self.cache:
                self.cache[name] += added
            elif name == "restarts":
                self.worker_restarts += added
            else:
                self.loader[name.removesuffix("_s")] += added
        self.cache_bytes = loader.stats.get("cache_bytes")


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


@dataclass(frozen=True)
class WindowTotals:
    """A window's figures summed over all ranks, and the bad samples the epoch's loader met so far."""

    loss_sum: float
    samples: int
    skipped_this_epoch: int


def count_window(window: Window, loader) -> WindowTotals:
    """Sum `window` and the bad samples `loader` has met over all ranks (a collective: every
    rank calls it at the same step)."""
    window.take_loader_stats(loader)
    loss_sum, samples, skipped = distributed.all_sum([float(window.loss), window.samples, len(loader.skipped)])
    return WindowTotals(loss_sum, int(samples), int(skipped))


def window_record(window: Window, totals: WindowTotals, *, epoch: int, terms: dict | None, lr: float,
                  skipped: int) -> dict:
    """The metrics.jsonl line of a window (`terms`: the last step's loss terms; `skipped`: the
    run's bad samples so far, all ranks).

    Besides data_wait (the share of the time the loop waited for a batch), it says where this
    rank's loader spent its time: loader_<stage>_ms for each of pipeline.batches.STAGES, worker
    milliseconds per sample summed over the workers, so a slow step shows whether the data or
    the model held it up, and which stage of the data; with a cache_dir, this rank's loader's
    cache_hits, cache_misses and cache_evictions in the window and cache_bytes, the folder's bytes;
    worker_restarts, the times this rank's loader restarted its workers in the window (after deaths).
    """
    seconds = window.seconds()
    local_samples = max(window.samples, 1)
    return {"epoch": epoch, "loss": totals.loss_sum / totals.samples if totals.samples else float("nan"),
            **{k: float(v) for k, v in (terms or {}).items()}, "lr": lr,
            "samples_per_s": totals.samples / seconds, "data_wait": window.data_wait / seconds,
            **{f"loader_{stage}_ms": 1000 * window.loader[stage] / local_samples for stage in STAGES},
            "skipped": skipped, "worker_restarts": window.worker_restarts,
            **({} if window.cache_bytes is None else {**window.cache, "cache_bytes": window.cache_bytes})}
