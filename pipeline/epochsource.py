"""What each worker process runs: its share of the epoch's plan, as records written into the
shared batch buffers (pipeline.batches), epoch after epoch for a chained train pass; and the
setup of a worker process. pipeline.loader's Pipeline makes one EpochSource and hands it to its
WorkerPool."""

import ctypes
import signal
import sys

import torch

from pipeline import elastic
from pipeline.batches import share_records
from pipeline.batchmemory import BatchBuffers
from pipeline.decode import Decoder
from pipeline.options import LoaderOptions
from pipeline.plan import batches_to_skip, epoch_runs
from pipeline.shardreader import ShardInfo

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def init_worker(_worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers are many already; intra-op threads only contend
    # A worker ignores SIGTERM until its pool closes (pipeline.workers), so should the main
    # process die first, let the kernel end the worker instead.
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class EpochSource:
    """A worker's records for a pass (picklable, so spawned workers get it too): a chained train
    pass goes on into the next epochs, so a worker makes epoch e+1 while the main process ends
    epoch e; any other pass makes its one epoch and stops (nothing read for nothing).
    `continued` = (epoch, prior segments): that epoch is the rest of one begun on other
    topologies (pipeline.elastic); `mix`: the shards' pipeline.mixture.Mixture, or None."""

    def __init__(self, options: LoaderOptions, shards: tuple[ShardInfo, ...], mix, continued=None):
        self.options, self.shards, self.mix, self.continued = options, shards, mix, continued
        self.sizes = [shard.samples for shard in shards]
        self.segment = elastic.Segment(world_size=options.world_size, workers=options.processes,
                                       batch_size=options.batch_size, shuffle_buffer=options.shuffle_buffer)
        self._decoder = None  # one per process: made where it runs

    def runs(self, epoch: int, prior: tuple = ()) -> tuple:
        """The samples of `epoch` left after the `prior` segments, as (shard, start, stop) runs."""
        train, seed = self.options.train, self.options.seed
        epoch_of = epoch_runs if self.mix is None else self.mix.runs
        runs = epoch_of(self.sizes, train=train, seed=seed, epoch=epoch)
        return elastic.remaining(runs, prior, train=train, seed=seed, epoch=epoch) if prior else runs

    def plan(self, epoch: int, prior: tuple = ()):
        return elastic.plan_segment(self.runs(epoch, prior), self.segment, train=self.options.train)

    def __call__(self, buffers: BatchBuffers, worker: int, epoch: int, start_batch: int, generation: int,
                 chain: bool):
        if self._decoder is None:
            self._decoder = Decoder(self.options.image_size, scaled=self.options.scaled_decode)
        skip = batches_to_skip(start_batch, worker, self.options.processes)
        while True:
            prior = self.continued[1] if self.continued and self.continued[0] == epoch else ()
            share = self.plan(epoch, prior).shares[self.options.rank][worker]
            yield from share_records(share, worker, epoch, options=self.options, shards=self.shards,
                                     decoder=self._decoder, buffers=buffers, generation=generation, skip=skip)
            if not (self.options.train and chain):
                return
            epoch, skip = epoch + 1, 0
