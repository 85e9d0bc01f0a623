"""The pass a loader's workers are making, shared with them through shared memory.

The main process announces a new pass (an epoch out of sequence, a resume point, a validation)
by bumping a generation number that each worker checks before every batch (pipeline.workers);
an idle worker sleeps on a doorbell of its own until the next pass or the pool's end.
"""

import os

# The shared integers.
_GENERATION, _CLOSING, _EPOCH, _START_BATCH, _CHAIN = range(5)
_PARENT_CHECK_SECONDS = 1.0


class PassControl:
    """The current pass (generation, epoch, start batch, chain), shared with the workers.

    Nothing the main process does here can wait on a worker, so a worker killed at any point
    (train.py SIGKILLs them on a stop signal, the OOM killer may) never blocks close() or the
    next start(): the values sit behind a lock that a worker holds only for the four reads of
    current(), and a waiting worker is woken through a doorbell of its own, a semaphore that
    the main process only ever releases. (A multiprocessing.Condition would not do: its
    notify_all() waits for every sleeper to acknowledge, forever for one that was killed.)
    """

    def __init__(self, context, workers: int):
        self._values = context.RawArray("q", 5)
        self._lock = context.Lock()
        self._doorbells = [context.Semaphore(0) for _ in range(workers)]
        self._parent = os.getpid()

    @property
    def generation(self) -> int:
        return self._values[_GENERATION]  # an aligned machine word: read without the lock

    def start(self, epoch: int, start_batch: int, chain: bool) -> int:
        """Announce a new pass; returns its generation."""
        with self._lock:
            self._values[_EPOCH], self._values[_START_BATCH], self._values[_CHAIN] = epoch, start_batch, chain
            self._values[_GENERATION] += 1
            generation = self._values[_GENERATION]
        self._ring()
        return generation

    def close(self) -> None:
        self._values[_CLOSING] = 1  # one word, read after the doorbell: no lock needed
        self._ring()

    @property
    def closing(self) -> bool:
        return bool(self._values[_CLOSING])

    def _ring(self) -> None:
        # A worker that was busy finds its bell rung at its next wait and looks again: harmless.
        for doorbell in self._doorbells:
            doorbell.release()

    def current(self) -> tuple[int, int, int, bool]:
        """(generation, epoch, start batch, chain), read together."""
        with self._lock:
            return (self._values[_GENERATION], self._values[_EPOCH], self._values[_START_BATCH],
                    bool(self._values[_CHAIN]))

    def wait_for_new_pass(self, worker: int, generation: int) -> bool:
        """Block worker `worker` until a pass after `generation` starts (True) or the pool
        closes (False)."""
        while not self._values[_CLOSING] and self._values[_GENERATION] == generation:
            self._doorbells[worker].acquire(timeout=_PARENT_CHECK_SECONDS)
            if os.getppid() != self._parent:
                return False  # the main process died: end this worker, as DataLoader's watchdog would
        return not self._values[_CLOSING]
