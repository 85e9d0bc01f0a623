"""Loader workers that live for the whole run, told through shared memory which pass to make.

torch's DataLoader(persistent_workers=True) keeps its worker processes between iterations,
but every new iteration starts with a reset that drains and drops what the workers had
prefetched, and an iteration cannot be paused while another runs on the same workers. So a
pool runs ONE DataLoader iteration for its whole life, over an endless stream of batch
records, and the main process announces a new pass (the next epoch out of sequence, a resume
point, another validation) by bumping a generation number in shared memory. Each worker
checks it before every batch and switches streams; every record carries the generation it was
made for, and the main process discards (and frees the memory of) records of an older one.
A worker with nothing left to do waits on a condition for the next pass: no polling, and it
wakes for a new pass, for close(), or (checking every second) when the main process is gone.
"""

import os

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.batchmemory import SharedBatches

# PassControl's shared integers.
_GENERATION, _CLOSING, _EPOCH, _START_BATCH, _CHAIN = range(5)
_PREFETCH = 2  # batches each worker may have made ahead of the main process
_PARENT_CHECK_SECONDS = 1.0


class PassControl:
    """The current pass (generation, epoch, start batch, chain), shared with the workers."""

    def __init__(self, context):
        self._values = context.RawArray("q", 5)
        self._condition = context.Condition()
        self._parent = os.getpid()

    @property
    def generation(self) -> int:
        return self._values[_GENERATION]  # an aligned machine word: read without the lock

    def start(self, epoch: int, start_batch: int, chain: bool) -> int:
        """Announce a new pass; returns its generation."""
        with self._condition:
            self._values[_EPOCH], self._values[_START_BATCH], self._values[_CHAIN] = epoch, start_batch, chain
            self._values[_GENERATION] += 1
            self._condition.notify_all()
            return self._values[_GENERATION]

    def close(self) -> None:
        with self._condition:
            self._values[_CLOSING] = 1
            self._condition.notify_all()

    def current(self) -> tuple[int, int, int, bool]:
        """(generation, epoch, start batch, chain), read together."""
        with self._condition:
            return (self._values[_GENERATION], self._values[_EPOCH], self._values[_START_BATCH],
                    bool(self._values[_CHAIN]))

    def wait_for_new_pass(self, generation: int) -> bool:
        """Block until a pass after `generation` starts (True) or the pool closes (False)."""
        with self._condition:
            while not self._values[_CLOSING] and self._values[_GENERATION] == generation:
                self._condition.wait(_PARENT_CHECK_SECONDS)
                if os.getppid() != self._parent and get_worker_info() is not None:
                    return False  # the main process died: end this worker, as DataLoader's watchdog would
            return not self._values[_CLOSING]


class _WorkerLoop:
    """A worker's endless iterator of records: the current pass's, then it waits for the next."""

    def __init__(self, control: PassControl, make_stream, worker: int, wait: bool):
        self.control, self.make_stream, self.worker, self.wait = control, make_stream, worker, wait
        self.generation, self.stream = 0, None

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self.control.generation != self.generation:
                self.stream = None  # let the old pass's files close before the new pass opens its own
                self.generation, epoch, start_batch, chain = self.control.current()
                self.stream = self.make_stream(self.worker, epoch, start_batch, self.generation, chain)
            if self.stream is not None:
                record = next(self.stream, None)
                if record is not None:
                    return record
                self.stream = None
            if not self.wait or not self.control.wait_for_new_pass(self.generation):
                raise StopIteration


class _Streams(IterableDataset):
    def __init__(self, control: PassControl, make_stream):
        super().__init__()
        self.control, self.make_stream = control, make_stream

    def __iter__(self):
        info = get_worker_info()
        return _WorkerLoop(self.control, self.make_stream, 0 if info is None else info.id, wait=True)


def _as_is(record):
    return record  # records are made whole in the worker: nothing to collate


class WorkerPool:
    """`workers` persistent processes (none: the main process makes the records itself)
    producing the records of make_stream(worker, epoch, start_batch, generation, chain) into
    `memory` (chain: go on into the next epochs once this one is made).

    One lifetime: the processes start with the first call to records() and end with close();
    a closed pool is not restarted (make a new one, with new batch memory, so that no slot
    a dead worker claimed stays busy).
    """

    def __init__(self, make_stream, memory: SharedBatches, *, workers: int, pin_memory: bool, worker_init_fn):
        self.control = PassControl(torch.multiprocessing.get_context())
        self.memory = memory
        if workers:
            self._dataloader = DataLoader(
                _Streams(self.control, make_stream), batch_size=None, num_workers=workers,
                collate_fn=_as_is, persistent_workers=True, prefetch_factor=_PREFETCH,
                in_order=False,  # records say where they belong, and a waiting worker must not hold up the others
                pin_memory=pin_memory, worker_init_fn=worker_init_fn)
            self._records = None
        else:
            self._dataloader = None
            self._records = _WorkerLoop(self.control, make_stream, 0, wait=False)

    def start(self, epoch: int, start_batch: int, chain: bool) -> int:
        """Start a pass; returns its generation."""
        return self.control.start(epoch, start_batch, chain)

    def records(self):
        """The one iterator of records this pool hands out, for every pass."""
        if self._records is None:
            if self._dataloader is None:
                raise RuntimeError("this worker pool is closed")
            self._records = iter(self._dataloader)  # the only iteration: a second would reset the workers
        return self._records

    def discard(self, record) -> None:
        """Give back the memory of a record that will never become a batch."""
        if record.pinned is None:
            self.memory.free(record.slot)

    def close(self) -> None:
        """End the worker processes (a waiting worker is woken first, so none lingers)."""
        self.control.close()
        # The DataLoader keeps its persistent iterator: both must go for the workers to be shut down.
        self._records = self._dataloader = None
