"""One pass of a Pipeline: an epoch's records from a start batch on, put back in batch order.

The workers deliver records in any order (DataLoader's in_order=False), records of an earlier
pass's generation may still be in flight, and a chained train pass's workers are already
making the next epoch while this one ends. A Pass sorts that out for the Loader that
iterates it, and a pass that starts where the last one stopped takes the last one's early
records over instead of restarting the workers (Pipeline.start_pass).
"""

import time

from pipeline.augment import Batch
from pipeline.batches import Record
from pipeline.errors import PipelineError
from pipeline.workers import WorkerPool


class Pass:
    """The records of batches `start_batch`.. of epoch `epoch`, in batch order, from the
    workers' generation `generation`.

    `early` holds the records that came before their turn, by (epoch, batch index); `failures`
    a worker's storage error by epoch, raised once the pass reaches that epoch; `next` is the
    (epoch, batch) the workers' records go on with after the last record taken, and
    `wait_seconds` the time spent waiting for the workers.
    """

    def __init__(self, pool: WorkerPool, *, generation: int, epoch: int, start_batch: int,
                 batches_per_epoch: int, chain: bool):
        self.pool, self.generation, self.chain = pool, generation, chain
        self.epoch, self.start_batch, self.batches_per_epoch = epoch, start_batch, batches_per_epoch
        self.early: dict[tuple[int, int], Record] = {}
        self.failures: dict[int, str] = {}
        self.next = (epoch, start_batch)
        self.wait_seconds = 0.0

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
                     batches_per_epoch=self.batches_per_epoch, chain=self.chain)
        after.early, after.failures = self.early, self.failures
        self.early, self.failures = {}, {}
        return after

    def records(self):
        """This pass's records in batch order (a PipelineError when a worker's storage failed)."""
        for index in range(self.start_batch, self.batches_per_epoch):
            record = self.early.pop((self.epoch, index), None)
            while record is None:
                if self.epoch in self.failures:
                    raise PipelineError(self.failures.pop(self.epoch))
                record = self._receive(index)
            last = index + 1 == self.batches_per_epoch
            self.next = (self.epoch + 1, 0) if last else (self.epoch, index + 1)
            yield record

    def _receive(self, index: int) -> Record | None:
        """The workers' next record when it is batch `index`; any other is put aside or given back."""
        waiting = time.perf_counter()
        # Asked of the pool each time, never kept in a variable: a frame holding the
        # DataLoader's iterator (an error's traceback keeps frames alive) would stop
        # WorkerPool.close from shutting the workers down.
        record = next(self.pool.records(), None)
        self.wait_seconds += time.perf_counter() - waiting
        if record is None:
            raise PipelineError(f"the loader's workers stopped before batch {index} of epoch {self.epoch}")
        if record.generation != self.generation or record.epoch < self.epoch:
            self.pool.discard(record)  # an earlier pass's, or an epoch this one has passed
        elif record.error is not None:
            self.failures[record.epoch] = record.error
        elif (record.epoch, record.index) == (self.epoch, index):
            return record
        else:
            self.early[(record.epoch, record.index)] = record
        return None

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
