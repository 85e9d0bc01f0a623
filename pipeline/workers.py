"""Loader workers that live for the whole run, told through shared memory which pass to make.

torch's DataLoader(persistent_workers=True) keeps its workers between iterations, but each new
iteration drains and drops what they had prefetched, and one cannot be paused while another
runs. So a pool runs ONE DataLoader iteration for its whole life, over an endless sequence of
batch records; the main process announces a new pass (an epoch out of sequence, a resume point,
a validation) by bumping a generation number in shared memory, which each worker checks before
every batch. Every record carries the generation it was made for, and the main process discards
(and frees) records of an older one. An idle worker waits on its doorbell: no polling; it wakes
for a new pass, for close(), or (every second) to see whether the main process is gone.

A worker that dies (the OOM killer, SIGBUS on a full /dev/shm, a crash) is noticed within a poll
interval of the main process's wait (next_record), and the pool restarts with new processes and
new batch buffers (the dead one may have left a buffer claimed or a lock held). torch's SIGCHLD
handler is taken out: it would raise in the main thread wherever it is (mid-step).
"""

import atexit
import errno
import functools
import os
import signal
import threading
import weakref

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import heartbeat
from pipeline.batchmemory import BatchBuffers, Layout
from pipeline.errors import PipelineError
from pipeline.heartbeat import Death, WorkersDied
from pipeline.passcontrol import PassControl

PREFETCH = 2  # batches each worker may have made ahead of the main process
# Batch buffers each worker needs to write every batch into one (pipeline.batchmemory): those
# it made ahead, the one it is making, and three the main process still holds (one put aside
# by the reordering, the training step's batch and the one before it, which lives until the
# loop's variable moves on). Fewer, and a worker falls back to fresh memory, slower.
BUFFERS_PER_WORKER = PREFETCH + 1 + 3
POLL_SECONDS = 1.0  # how long the main process waits for a record before it looks at the workers
_TIMED_OUT = "DataLoader timed out"  # how torch's RuntimeError for a wait past its timeout begins


class _WorkerSource:
    """A worker's endless iterator of records: the current pass's, then it waits for the next."""

    def __init__(self, control: PassControl, source, worker: int, wait: bool):
        self.control, self.source, self.worker, self.wait = control, source, worker, wait
        self.generation, self.records = 0, None

    def __iter__(self):
        return self

    def __next__(self):
        heartbeat.stage(heartbeat.READING)
        while True:
            if self.control.generation != self.generation:
                self.records = None  # let the old pass's files close before the new pass opens its own
                self.generation, epoch, start_batch, chain = self.control.current()
                self.records = self.source(self.worker, epoch, start_batch, self.generation, chain)
            if self.records is not None:
                record = next(self.records, None)
                if record is not None:
                    heartbeat.stage(heartbeat.HANDING_OVER)
                    return record
                self.records = None
            heartbeat.stage(heartbeat.IDLE)
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


def _start_worker(control: PassControl, beats: heartbeat.Heartbeats, worker_init_fn, worker_id: int) -> None:
    beats.bind(worker_id)
    # The main process's wakeup fd (training.signals) is inherited through fork: a signal this
    # worker gets must not be read there as one sent to the main process.
    signal.set_wakeup_fd(-1)
    # Ctrl-C and a scheduler's SIGTERM reach every process of the job, workers included: the
    # main process decides when to stop (train.py saves first) and ends its workers itself, so
    # they ignore both. Once their pool is closing, though, SIGTERM is how the DataLoader and
    # multiprocessing end a worker that outstays the shutdown, and it must work.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, functools.partial(_on_stop_signal, control))
    # A batch in fresh memory (every buffer of this worker held) goes by name, through torch's
    # torch_shm_manager: a file descriptor would be fetched from this process while the main
    # process unpickles it, and a stopped or stuck worker would hang it there, out of reach of
    # the stall report and the data timeout.
    torch.multiprocessing.set_sharing_strategy("file_system")
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


def _without_torch_sigchld(make):
    """make() with SIGCHLD's handler as it was before: torch installs its own at its first
    worker start, which raises in the main thread, mid-step, when a worker dies (see the
    module docstring); a dead worker is found by next_record instead."""
    if threading.current_thread() is not threading.main_thread():
        return make()  # torch installs nothing outside the main thread either
    previous = signal.getsignal(signal.SIGCHLD)
    try:
        return make()
    finally:
        signal.signal(signal.SIGCHLD, previous)


class WorkerPool:
    """`workers` persistent processes (none: the main process makes the records itself)
    producing the records of source(buffers, worker, epoch, start_batch, generation, chain) into
    batch buffers of `layout` that the pool makes (chain: go on into the next epochs once this
    one is made).

    The processes start with the first record asked for and end with close(); restart()
    replaces them (and the buffers) after a death, close() ends the pool for good. `shards`
    (the ShardInfo the source reads) name what a worker reads in describe().
    """

    def __init__(self, source, layout: Layout, *, workers: int, pin_memory: bool, worker_init_fn, shards=()):
        self._source, self._layout, self._workers = source, layout, workers
        self._pin_memory, self._worker_init_fn, self._shards = pin_memory, worker_init_fn, shards
        self._dataloader = self._records = None
        self._build()

    def _build(self) -> None:
        context = torch.multiprocessing.get_context()
        try:
            self.buffers = BatchBuffers(self._layout, max(self._workers, 1), BUFFERS_PER_WORKER, shared=self._workers > 0)
            self.control = PassControl(context, self._workers)
            self.heartbeats = heartbeat.Heartbeats(context, max(self._workers, 1))
        except OSError as error:  # the semaphores of PassControl live in /dev/shm too
            if error.errno == errno.ENOSPC:
                raise PipelineError(f"/dev/shm is full: the loader's workers cannot be given their "
                                    f"semaphores ({error})") from None
            raise
        source = functools.partial(self._source, self.buffers)
        if self._workers:
            self._dataloader = DataLoader(
                _SourceDataset(self.control, source), batch_size=None, num_workers=self._workers,
                collate_fn=_as_is, persistent_workers=True, prefetch_factor=PREFETCH,
                in_order=False,  # records say where they belong, and a waiting worker must not hold up the others
                timeout=POLL_SECONDS, pin_memory=self._pin_memory,
                worker_init_fn=functools.partial(_start_worker, self.control, self.heartbeats, self._worker_init_fn))
            _open_pools.add(self)
        else:
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
            # the only iteration: a second would reset the workers
            self._records = _without_torch_sigchld(lambda: iter(self._dataloader))
        return self._records

    def next_record(self):
        """The workers' next record; None when none came within POLL_SECONDS (ask again).
        Raises WorkersDied when a worker is dead (also while the others' records flow, so
        that none runs on alone), PipelineError when the records ended."""
        try:
            record = next(self.records(), False)
        except RuntimeError as error:
            if not str(error).startswith(_TIMED_OUT) and not self.deaths():
                raise
            record = None  # a restart happens outside the handler: its traceback holds the iterator
        if record is False:
            raise PipelineError("the loader's workers stopped making batches")
        died = self.deaths()
        if died:
            if record is not None:
                self.discard(record)
            raise WorkersDied(died)
        return record

    def _processes(self) -> list:
        # The DataLoader iterator's worker Process objects: torch's, private, and the only record
        # of a worker that died before it could write its pid into its heartbeat.
        return [] if self._records is None or self._dataloader is None else list(self._records._workers)

    def deaths(self) -> list[Death]:
        """The workers that have died, each with what it was doing last."""
        return [Death(worker=n, pid=process.pid, exitcode=process.exitcode,
                      doing=self.heartbeats.doing(n, self._shards))
                for n, process in enumerate(self._processes()) if not process.is_alive()]

    def describe(self, worker: int) -> str:
        """Worker `worker`, its pid and what it is doing, for a line (pipeline.heartbeat)."""
        pid = self.heartbeats.pid(worker)
        return f"worker {worker} (pid {pid if pid else 'not known yet'}), {self.heartbeats.doing(worker, self._shards)}"

    def restart(self) -> None:
        """Replace every worker process and the batch buffers: the live workers are killed
        (SIGKILL: a stopped one ends too; they hold nothing that is kept), all are reaped, and
        the next start() makes its pass from new processes."""
        processes = self._processes()
        for process in processes:
            if process.is_alive():
                process.kill()
        for process in processes:
            process.join()
        self.close()
        self._build()

    def discard(self, record) -> None:
        """Give back the memory of a record that will never become a batch."""
        if record.pinned is None and record.buffers_token == self.buffers.token:
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
