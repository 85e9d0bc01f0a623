"""Run records on rank 0: OUT/metrics.jsonl always, TensorBoard events when it is installed."""

import json
import time
from pathlib import Path

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # tensorboard is optional
    SummaryWriter = None


class Window:
    """Totals since the last log line: loss (a device tensor), steps, samples, data wait."""

    def __init__(self):
        self.start = time.perf_counter()
        self.loss, self.steps, self.samples, self.data_wait = 0.0, 0, 0, 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self.start


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
