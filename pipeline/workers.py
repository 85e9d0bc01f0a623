"""Loader workers that live for the whole run, told through shared memory which pass to make.

torch's DataLoader(persistent_workers=True) keeps its worker processes between iterations,
but every new iteration starts with a reset that drains and drops what the workers had
prefetched, and an iteration cannot be paused while another runs on the same workers. So a
pool runs ONE DataLoader iteration for its whole life, over an endless sequence of batch
records, and the main process announces a new pass (the next epoch out of sequence, a resume
point, another validation) by bumping a generation number in shared memory. Each worker
checks it before every batch and switches to the new pass's source; every record carries the generation it was
made for, and the main process discards (and frees the memory of) records of an older one.
A worker with nothing left to do waits on its doorbell for the next pass: no polling, and it
wakes for a new pass, for close(), or (checking every second) when the main process is gone.
"""

import atexit
import functools
import os
import signal
import weakref

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.batchmemory import BatchBuffers

# PassControl's shared integers.
_GENERATION, _CLOSING, _EPOCH, _START_BATCH, _CHAIN = range(5)
PREFETCH = 2  # batches each worker may have made ahead of the main process
# Batch buffers each worker needs to write every batch into one (pipeline.batchmemory): those
# it made ahead, the one it is making, and three the main process still holds (one put aside
# by the reordering, the training step's batch and the one before it, which lives until the
# loop's variable moves on). Fewer, and a worker falls back to fresh memory, slower.
BUFFERS_PER_WORKER = PREFETCH + 1 + 3
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


class _WorkerSource:
    """A worker's endless iterator of records: the current pass's, then it waits for the next."""

    def __init__(self, control: PassControl, source, worker: int, wait: bool):
        self.control, self.source, self.worker, self.wait = control, source, worker, wait
        self.generation, self.records = 0, None

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self.control.generation != self.generation:
                self.records = None  # let the old pass's files close before the new pass opens its own
                self.generation, epoch, start_batch, chain = self.control.current()
                self.records = self.source(self.worker, epoch, start_batch, self.generation, chain)
            if self.records is not None:
                record = next(self.records, None)
                if record is not None:
                    return record
                self.records = None
            if not self.wait or not self.control.wait_for_new_pass(self.worker, self.generation):
                raise StopIteration


class _SourceDataset(IterableDataset):
    """What the DataLoader iterates: in each of its workers, that worker's _WorkerSource."""

    def __init__(self, control: PassControl, source):
        super().__init__()
        self.control, self.source = control, source

    def __iter__(self):  # in a DataLoader worker: the pool makes no _SourceDataset without workers
        return _WorkerSource(self.control, self.source, get_worker_info().id, wait=True)


def _as_is(record):
    return record  # records are made whole in the worker: nothing to collate


def _on_stop_signal(control: PassControl, _signum, _frame) -> None:
    if control.closing:
        os._exit(0)  # a clean exit: the DataLoader reports any other as a crashed worker


def _start_worker(control: PassControl, worker_init_fn, worker_id: int) -> None:
    # Ctrl-C and a scheduler's SIGTERM reach every process of the job, workers included: the
    # main process decides when to stop (train.py saves first) and ends its workers itself, so
    # they ignore both. Once their pool is closing, though, SIGTERM is how the DataLoader and
    # multiprocessing end a worker that outstays the shutdown, and it must work.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, functools.partial(_on_stop_signal, control))
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


# Pools not closed by the time the interpreter exits. multiprocessing's exit handler sends each
# daemonic process SIGTERM and waits for it, which a worker of an open pool ignores: so these
# are closed first (atexit runs its handlers last registered first, and multiprocessing
# registered its own when torch imported it).
_open_pools = weakref.WeakSet()


@atexit.register
def _close_open_pools() -> None:
    for pool in list(_open_pools):
        pool.close()


class WorkerPool:
    """`workers` persistent processes (none: the main process makes the records itself)
    producing the records of source(worker, epoch, start_batch, generation, chain) into
    `buffers` (chain: go on into the next epochs once this one is made).

    One lifetime: the processes start with the first call to records() and end with close();
    a closed pool is not restarted (make a new one, with new batch buffers, so that no buffer
    a dead worker claimed stays busy).
    """

    def __init__(self, source, buffers: BatchBuffers, *, workers: int, pin_memory: bool, worker_init_fn):
        self.control = PassControl(torch.multiprocessing.get_context(), workers)
        self.buffers = buffers
        if workers:
            self._dataloader = DataLoader(
                _SourceDataset(self.control, source), batch_size=None, num_workers=workers,
                collate_fn=_as_is, persistent_workers=True, prefetch_factor=PREFETCH,
                in_order=False,  # records say where they belong, and a waiting worker must not hold up the others
                pin_memory=pin_memory, worker_init_fn=functools.partial(_start_worker, self.control, worker_init_fn))
            self._records = None
            _open_pools.add(self)
        else:
            self._dataloader = None
            self._records = _WorkerSource(self.control, source, 0, wait=False)

    def start(self, epoch: int, start_batch: int, chain: bool) -> int:
        """Start a pass; returns its generation."""
        return self.control.start(epoch, start_batch, chain)

    def records(self):
        """The one iterator of records this pool hands out, for every pass (take its next
        record each time from here: see close())."""
        if self._records is None:
            if self._dataloader is None:
                raise RuntimeError("this worker pool is closed")
            self._records = iter(self._dataloader)  # the only iteration: a second would reset the workers
        return self._records

    def discard(self, record) -> None:
        """Give back the memory of a record that will never become a batch."""
        if record.pinned is None:
            self.buffers.free(record.buffer)

    def close(self) -> None:
        """End the worker processes (a waiting worker is woken first, so none lingers)."""
        self.control.close()
        _open_pools.discard(self)
        # The DataLoader keeps its persistent iterator: both must go for the workers to be shut
        # down. Nothing else may hold the iterator (the frames of an error's traceback would, and
        # garbage collection frees it only after its queues' threads have stopped, when its
        # shutdown can no longer reach the workers), so callers take it from records() each time.
        self._records = self._dataloader = None
