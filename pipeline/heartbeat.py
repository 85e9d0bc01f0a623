"""What each loader worker is doing, in shared memory, so the main process can say why it waits,
and how a dead one ended.

Each worker writes a few numbers into its own row as it goes (its pid, the stage it is in
and since when, the shard range it reads, the sample and bytes it is at): plain stores into
shared memory, a fraction of a microsecond each, a few per sample. The main process only reads
them: in the line of a stall report, of a restart, or of the error that ends a pass. A row may
be read half written; the worst that does is one line naming the previous sample.
"""

import os
import signal
import time
from dataclasses import dataclass

import numpy as np

# A row's fields.
_PID, _STAGE, _SINCE, _SHARD, _START, _STOP, _SAMPLE, _BEGIN, _END = range(9)
_WIDTH = 9
STAGES = ("starting", "reading", "decoding", "waiting for the main process to take its batches",
          "waiting for the next pass")
STARTING, READING, DECODING, HANDING_OVER, IDLE = range(len(STAGES))

_mine: "tuple[np.ndarray, int] | None" = None  # (the rows, this worker's) in a worker process


class Heartbeats:
    """One row per worker in memory shared with the workers (made before they start)."""

    def __init__(self, context, workers: int):
        self._raw = context.RawArray("d", workers * _WIDTH)
        self._rows = None

    def rows(self) -> np.ndarray:
        if self._rows is None:  # per process: a forked worker makes its own view of the pages
            self._rows = np.frombuffer(self._raw, dtype=np.float64).reshape(-1, _WIDTH)
        return self._rows

    def __getstate__(self):
        return {"_raw": self._raw, "_rows": None}

    def bind(self, worker: int) -> None:
        """In worker `worker`'s process: its row is the one the functions below write."""
        global _mine
        rows = self.rows()
        rows[worker] = -1
        rows[worker, _PID], rows[worker, _STAGE], rows[worker, _SINCE] = os.getpid(), STARTING, time.monotonic()
        _mine = rows, worker

    def pid(self, worker: int) -> int | None:
        """Worker `worker`'s pid, once it has started."""
        pid = int(self.rows()[worker, _PID])
        return pid if pid > 0 else None

    def doing(self, worker: int, shards) -> str:
        """What worker `worker` is doing, for a line: its stage for how long, and where it reads
        (`shards`: the ShardInfo list its shard numbers refer to)."""
        row = self.rows()[worker].copy()
        if row[_PID] <= 0:
            return "not started yet"
        text = f"{STAGES[int(row[_STAGE])]} for {time.monotonic() - row[_SINCE]:.0f} s"
        if row[_SHARD] >= 0:
            text += f", its range samples {int(row[_START])}-{int(row[_STOP]) - 1} of {shards[int(row[_SHARD])].url}"
            if row[_SAMPLE] >= 0:
                text += f", at sample {int(row[_SAMPLE])}"
                if row[_BEGIN] >= 0:
                    text += f" (bytes {int(row[_BEGIN])}-{int(row[_END]) - 1})"
        return text


def stage(number: int) -> None:
    """This worker entered stage `number` (one of STAGES) now; a no-op outside a worker."""
    if _mine is not None:
        rows, worker = _mine
        if rows[worker, _STAGE] != number:
            rows[worker, _STAGE], rows[worker, _SINCE] = number, time.monotonic()


def reading_range(shard: int, start: int, stop: int) -> None:
    """This worker starts reading samples start..stop-1 of shard number `shard`."""
    if _mine is not None:
        rows, worker = _mine
        rows[worker, _SHARD], rows[worker, _START], rows[worker, _STOP] = shard, start, stop
        rows[worker, _SAMPLE] = rows[worker, _BEGIN] = rows[worker, _END] = -1


def reading_sample(number: int, begin: int, end: int) -> None:
    """This worker reads sample `number` of its shard, bytes begin..end-1."""
    if _mine is not None:
        rows, worker = _mine
        rows[worker, _SAMPLE], rows[worker, _BEGIN], rows[worker, _END] = number, begin, end


@dataclass(frozen=True)
class Death:
    """A worker found dead: its number, pid, exit code (-N: signal N) and what it was doing."""

    worker: int
    pid: int
    exitcode: int
    doing: str


class WorkersDied(Exception):
    """Raised by WorkerPool.next_record: these workers are dead (restart() the pool, or give up)."""

    def __init__(self, deaths: list[Death]):
        super().__init__(deaths)
        self.deaths = deaths


def how_it_ended(exitcode: int) -> tuple[str, str]:
    """(how a process with this exit code ended, its likely cause) for a line about a dead worker."""
    if exitcode >= 0:
        return f"exited with status {exitcode}", "an error in the worker (its traceback is above, if it left one)"
    signum = -exitcode
    causes = {signal.SIGKILL: "out of memory (the kernel's OOM killer sends SIGKILL)",
              signal.SIGBUS: "/dev/shm is full (its shared memory could not be given a page)",
              signal.SIGSEGV: "a crash in native code"}
    return (f"was killed by {signal.Signals(signum).name}" if signum in signal.Signals._value2member_map_
            else f"was killed by signal {signum}"), causes.get(signum, "a signal from outside the run")
