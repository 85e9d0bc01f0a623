"""One pass of a Pipeline: an epoch's records from a start batch on, put back in batch order.

The workers deliver records in any order (DataLoader's in_order=False), records of an earlier
pass's generation may still be in flight, and a chained train pass's workers are already
making the next epoch while this one ends. A Pass sorts that out for the Loader that
iterates it, and a pass that starts where the last one stopped takes the last one's early
records over instead of restarting the workers (Pipeline.start_pass).

While it waits for a batch, a pass also watches the workers (Patience): a dead worker gets the
pool restarted at the batch the pass is waiting for (the plan and the draws are pure
functions, so the batches are those of an uninterrupted pass), one line each time, until
too many deaths end the pass with a PipelineError; a wait longer than `stall_warn` is reported,
naming the worker, its shard range and its stage; one longer than `data_timeout` is an error;
and the process's stop request (stop_waiting_when) ends the wait with WaitStopped.
"""

import logging
import time
from dataclasses import dataclass

from pipeline import heartbeat
from pipeline.augment import Batch
from pipeline.batches import Record
from pipeline.errors import PipelineError, WaitStopped
from pipeline.heartbeat import WorkersDied
from pipeline.workers import WorkerPool

log = logging.getLogger(__name__)
_stop_check = None  # the process's stop request, as stop_waiting_when set it


def stop_waiting_when(check):
    """From now on every pass of this process gives up waiting for a batch, raising
    WaitStopped, once check() is true (None: never); returns the check set before. For a
    command that saves its state on SIGTERM (train.py): the wait ends within a poll interval
    even when no worker ever delivers again."""
    global _stop_check
    previous, _stop_check = _stop_check, check
    return previous


@dataclass(frozen=True, kw_only=True)
class Patience:
    """How a pass waits for its workers: `restarts` after worker deaths (then a PipelineError),
    a line after `stall_warn` seconds without the batch it waits for (again at each doubling of
    the wait), a PipelineError after `data_timeout` seconds (None: never, for either), and
    `processes` making the batches (batch i comes from worker i % processes)."""

    restarts: int
    stall_warn: float | None
    data_timeout: float | None
    processes: int


class Pass:
    """The records of batches `start_batch`.. of epoch `epoch`, in batch order, from the
    workers' generation `generation`.

    `early` holds the records that came before their turn, by (epoch, batch index); `failures`
    a worker's storage error by epoch, raised once the pass reaches that epoch; `next` is the
    (epoch, batch) the workers' records go on with after the last record taken,
    `wait_seconds` the time spent waiting for the workers and `restarts` the times they were
    replaced after a death.
    """

    def __init__(self, pool: WorkerPool, *, generation: int, epoch: int, start_batch: int,
                 batches_per_epoch: int, chain: bool, patience: Patience):
        self.pool, self.generation, self.chain, self.patience = pool, generation, chain, patience
        self.epoch, self.start_batch, self.batches_per_epoch = epoch, start_batch, batches_per_epoch
        self.early: dict[tuple[int, int], Record] = {}
        self.failures: dict[int, str] = {}
        self.next = (epoch, start_batch)
        self.wait_seconds = 0.0
        self.restarts = 0
        self._since, self._warn_after = 0.0, None  # the wait for the current batch: its start, next line

    def goes_on_into(self, epoch: int, start_batch: int, chain: bool) -> bool:
        """Whether the workers, as this pass leaves them, are making the pass asked for: it
        starts where this one stopped, chained alike, and that is either inside this pass's
        epoch or (a chained pass) at the start of the next one."""
        if (epoch, start_batch) != self.next or chain != self.chain:
            return False
        return start_batch > 0 or self.chain

    def followed_by(self, epoch: int, start_batch: int) -> "Pass":
        """The next pass on the same workers' records: it takes over the early records and failures."""
        after = Pass(self.pool, generation=self.generation, epoch=epoch, start_batch=start_batch,
                     batches_per_epoch=self.batches_per_epoch, chain=self.chain, patience=self.patience)
        after.early, after.failures = self.early, self.failures
        self.early, self.failures = {}, {}
        return after

    def records(self):
        """This pass's records in batch order (a PipelineError when a worker's storage failed,
        the workers kept dying or stalled past data_timeout; WaitStopped on a stop request)."""
        for index in range(self.start_batch, self.batches_per_epoch):
            record = self.early.pop((self.epoch, index), None)
            self._since, self._warn_after = time.monotonic(), self.patience.stall_warn
            while record is None:
                if self.epoch in self.failures:
                    raise PipelineError(self.failures.pop(self.epoch))
                record = self._receive(index)
                if record is None:
                    self._waited(index)
            last = index + 1 == self.batches_per_epoch
            self.next = (self.epoch + 1, 0) if last else (self.epoch, index + 1)
            yield record

    def _receive(self, index: int) -> Record | None:
        """The workers' next record when it is batch `index`; any other is put aside or given
        back, and None returned (also when none came within the pool's poll interval)."""
        waiting = time.perf_counter()
        try:
            record = self.pool.next_record()
        except WorkersDied as died:
            self._restart(died.deaths, index)
            return None
        finally:
            self.wait_seconds += time.perf_counter() - waiting
        if record is None:
            return None
        if record.generation != self.generation or record.epoch < self.epoch:
            self.pool.discard(record)  # an earlier pass's, or an epoch this one has passed
        elif record.error is not None:
            self.failures[record.epoch] = record.error
        elif (record.epoch, record.index) == (self.epoch, index):
            return record
        else:
            self.early[(record.epoch, record.index)] = record
        return None

    def _waiting_for(self, index: int) -> str:
        worker = index % self.patience.processes
        return f"batch {index} of epoch {self.epoch} from {self.pool.describe(worker)}"

    def _waited(self, index: int) -> None:
        """Batch `index` has not come yet: stop, report or give up, as the wait's length says."""
        if _stop_check is not None and _stop_check():
            raise WaitStopped(f"stopped waiting for batch {index} of epoch {self.epoch}")
        waited = time.monotonic() - self._since
        timeout = self.patience.data_timeout
        if timeout is not None and waited >= timeout:
            raise PipelineError(f"no batch for {waited:.0f} s (the data timeout is {timeout:g} s): waiting for "
                                f"{self._waiting_for(index)}")
        if self._warn_after is not None and waited >= self._warn_after:
            log.warning("loader: no batch for %.0f s, waiting for %s", waited, self._waiting_for(index))
            self._warn_after *= 2

    def _restart(self, deaths, index: int) -> None:
        """Workers died: restart the pool at batch `index` (one line), or raise a PipelineError
        when that would be more than the pass's restarts."""
        self.restarts += 1
        said = "; ".join(f"worker {death.worker} (pid {death.pid}) {heartbeat.how_it_ended(death.exitcode)[0]}, "
                         f"{death.doing}" for death in deaths)
        cause = heartbeat.how_it_ended(deaths[0].exitcode)[1]
        if self.restarts > self.patience.restarts:
            raise PipelineError(f"loader {said}: worker deaths in this pass: {self.restarts}, more than the "
                                f"{self.patience.restarts} restarts allowed; likely cause: {cause}")
        log.warning("loader: %s; restarting the workers at batch %d of epoch %d (restart %d of %d allowed in this "
                    "pass; likely cause: %s)", said, index, self.epoch, self.restarts, self.patience.restarts, cause)
        for record in self.early.values():
            self.pool.discard(record)
        self.early = {}
        self.pool.restart()
        self.generation = self.pool.start(self.epoch, index, self.chain)

    def batch(self, record: Record) -> Batch:
        """A record made a Batch: its tensors are views of the record's buffer (or its pinned
        copy), and own that memory from now on."""
        fields = record.pinned
        if fields is None:
            fields = self.pool.buffers.tensors(record.buffer, record.fresh, record.count)
        record.buffer = record.fresh = record.pinned = None
        return Batch(fields, key=record.keys)

    def discard(self) -> None:
        """Give back the memory of the records that came early (the workers start anew)."""
        for record in self.early.values():
            self.pool.discard(record)
        self.early, self.failures = {}, {}
