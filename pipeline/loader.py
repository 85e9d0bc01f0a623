"""Shard URLs to batches for one rank: `Pipeline` (a run's passes over one split, from worker
processes that live as long as it does) and `make_loader` (one pass, the simple entry point).

    train = Pipeline("shards/batch-{1..20}.tar", batch_size=64, workers=4, train=True)
    val = Pipeline("shards/val-*.tar", batch_size=64, workers=4, train=False)
    for epoch in range(epochs):
        for batch in train.epoch(epoch):   # no new processes; epoch e+1 is made while e ends
            ...
        for batch in val.epoch(0):         # the validation pool's processes, reused each time
            ...
    train.close(); val.close()             # or `with Pipeline(...) as train:`

The data path, stage by stage: what the stream is after each, and where it runs.

  main process, once   Pipeline(urls)         shard URLs -> ShardInfo per shard (size, index),
                                              shared batch buffers (batchmemory.BatchBuffers)
  main process, a pass Pipeline.start_pass    -> a passes.Pass; a new pass bumps the workers'
                                              generation (workers.PassControl), a resumed or
                                              chained one goes on with what they are making
  worker, per pass     _Source                (epoch, start batch) -> this worker's Share of the
                                              epoch's plan (plan.plan_epoch)
  worker               shardreader.read_samples  Share's shard ranges -> raw samples (ranged
                                              reads with an index, retried; cache.py's copy)
  worker               batches._shuffled      -> samples in shuffle-buffer order (train)
  worker               decode.Decoder         -> images decoded and fitted to image_size,
                                              written into one batch buffer; bad samples
                                              skipped and reported, spares take their place
  worker               augment.draw           -> each sample's augmentation draw (not applied)
  worker               batches.Record         -> a batch record: generation, (epoch, index),
                                              keys, buffer number, seconds per STAGES
  DataLoader's pin-    Record.pin_memory      -> the batch copied to page-locked memory and its
  memory thread (CUDA)                        buffer freed (the buffers of this process are
                                              found by token: batchmemory.in_this_process)
  main process         Pass.records           records in any order -> batch order; older
                                              generations dropped, early ones held
  main process         Pass.batch             -> a pipeline.Batch of uint8 views of the buffer
  training loop        Batch.to(device)       -> floats on the device, the draw applied to all
                                              four images at once (augment.apply)
"""

import ctypes
import logging
import signal
import sys

import torch

from pipeline import cache, cachelimit
from pipeline.batches import STAGES, share_records
from pipeline.batchmemory import BatchBuffers, Layout
from pipeline.decode import Decoder
from pipeline.errors import PipelineError
from pipeline.options import LoaderOptions
from pipeline.passes import Pass, Patience
from pipeline.plan import batches_to_skip, plan_epoch
from pipeline.shardreader import ShardInfo, prepare_shards
from pipeline.sources import expand_urls
from pipeline.workers import WorkerPool

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

def _init_worker(_worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers are many already; intra-op threads only contend
    # A worker ignores SIGTERM until its pool closes (pipeline.workers), so should the main
    # process die first, let the kernel end the worker instead.
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Source:
    """A worker's records for a pass (picklable, so spawned workers get it too): a chained train
    pass goes on into the next epochs, so a worker makes epoch e+1 while the main process ends
    epoch e; any other pass makes its one epoch and stops (nothing read for nothing)."""

    def __init__(self, options: LoaderOptions, shards: tuple[ShardInfo, ...]):
        self.options, self.shards = options, shards
        self.sizes = [shard.samples for shard in shards]
        self._decoder = None  # one per process: made where it runs

    def plan(self, epoch: int):
        return plan_epoch(self.sizes, world_size=self.options.world_size, workers=self.options.processes,
                          batch_size=self.options.batch_size, train=self.options.train,
                          seed=self.options.seed, epoch=epoch)

    def __call__(self, buffers: BatchBuffers, worker: int, epoch: int, start_batch: int, generation: int,
                 chain: bool):
        if self._decoder is None:
            self._decoder = Decoder(self.options.image_size, scaled=self.options.scaled_decode)
        skip = batches_to_skip(start_batch, worker, self.options.processes)
        while True:
            share = self.plan(epoch).shares[self.options.rank][worker]
            yield from share_records(share, worker, epoch, options=self.options, shards=self.shards,
                                     decoder=self._decoder, buffers=buffers, generation=generation, skip=skip)
            if not (self.options.train and chain):
                return
            epoch, skip = epoch + 1, 0


class Pipeline:
    """This rank's batches of one split (`train` or eval), pass after pass, from `workers`
    processes that live until close() (workers=0: made in this process).

    ``epoch(e, start_batch=0)`` returns one pass (a Loader). Train passes asked for in
    sequence (epoch e to its end, then e+1; or a pass left at batch n, then resumed at n)
    continue the workers' records without a pause: they are already making epoch e+1 while the
    last batches of e are consumed. Any other pass restarts the workers' sources. An eval pass is the
    same samples each time (validation). See make_loader for the batches and the guarantees,
    LoaderOptions for the keyword arguments (`options`).
    """

    def __init__(self, urls, **options):
        # First: close() (from __del__) must work when the checks below raise.
        self._pool = None
        self._pass: Pass | None = None  # the last pass started, while its workers run
        self.options = options = LoaderOptions(**options).resolved()
        shards = prepare_shards(expand_urls(urls, options.storage_options), options.storage_options,
                                options.shard_sizes, retries=options.retries, retry_wait=options.retry_wait,
                                cache_dir=options.cache_dir)
        if options.cache_limit is not None:
            local_rank, local_ranks = cachelimit.local_ranks(options.world_size)
            cachelimit.check_limit(options.cache_dir, options.cache_limit, shards,
                                   readers=options.processes * local_ranks, warn=local_rank == 0)
        self.source = _Source(options, tuple(shards))
        plan = self.source.plan(0)  # batch counts are the same every epoch: they depend on the sizes only
        if plan.batches_per_rank == 0:
            raise PipelineError(f"{sum(self.source.sizes)} samples in {urls!r} cannot fill one batch of "
                                f"{options.batch_size} on each of {options.world_size} ranks")
        self.batches_per_epoch = plan.batches_per_rank
        self.samples_per_epoch = plan.samples_per_rank[options.rank]
        self.train, self.workers = options.train, options.workers
        self.pin_memory = torch.cuda.is_available() if options.pin_memory is None else options.pin_memory
        self._layout = Layout(options.batch_size, options.image_size, options.train)

    def epoch(self, epoch: int = 0, start_batch: int = 0, *, chain: bool = True) -> "Loader":
        """One pass: epoch `epoch`'s batches from `start_batch` on. chain (train): the workers go
        on into epoch + 1 while this one ends; pass False for a run's last epoch, so that no
        batch of an epoch nobody asks for is read and made."""
        return Loader(self, epoch, start_batch, chain=chain)

    def close(self) -> None:
        """End the worker processes; a later pass starts new ones."""
        if self._pass is not None:
            self._pass.discard()
        if self._pool is not None:
            self._pool.close()
        self._pool, self._pass = None, None

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def __del__(self):
        self.close()

    def start_pass(self, epoch: int, start_batch: int, chain: bool) -> Pass:
        """Epoch `epoch`'s records from `start_batch` on (what a Loader iterates). A train
        pass that starts where the last one stopped goes on with the workers' records as they
        come; any other starts the workers' sources anew (a new generation)."""
        if self._pool is None:
            self._pool = WorkerPool(self.source, self._layout, workers=self.workers, shards=self.source.shards,
                                    pin_memory=self.pin_memory and self.workers > 0, worker_init_fn=_init_worker)
        last = self._pass
        if self.train and last is not None and last.goes_on_into(epoch, start_batch, chain):
            self._pass = last.followed_by(epoch, start_batch)
        else:
            if last is not None:
                last.discard()
            options = self.options
            patience = Patience(restarts=options.max_restarts, stall_warn=options.stall_warn,
                                data_timeout=options.data_timeout, processes=options.processes)
            self._pass = Pass(self._pool, generation=self._pool.start(epoch, start_batch, chain), epoch=epoch,
                              start_batch=start_batch, batches_per_epoch=self.batches_per_epoch, chain=chain,
                              patience=patience)
        return self._pass


class Loader:
    """One pass of a Pipeline: an iterable of this rank's batches (see make_loader).

    Attributes: ``num_samples`` (samples this rank is planned to see this epoch),
    ``batches_per_epoch``, ``start_batch``, ``skipped`` (one dict per bad sample met in the
    pass: key, shard, reason) and ``stats``: counts (batches, samples, skipped), the workers'
    seconds on each of pipeline.batches.STAGES as ``read_s``, ``decode_s``, ``fit_s`` (summed
    over workers, for the batches delivered so far) and ``wait_s``, the time this process
    waited for the next batch, ``restarts`` (of the workers, after deaths: pipeline.passes); with a cache_dir also ``cache_hits``, ``cache_misses``,
    ``cache_evictions`` (the workers' counts, pipeline.cache.counters) and ``cache_bytes``
    (what the folder holds, as of the last batch that changed a count).
    """

    def __init__(self, pipeline: Pipeline, epoch: int, start_batch: int, *, chain: bool = False,
                 close_after: bool = False):
        if not 0 <= start_batch <= pipeline.batches_per_epoch:
            raise PipelineError(f"start_batch {start_batch} is outside the epoch's {pipeline.batches_per_epoch} batches")
        self.pipeline, self.epoch, self.start_batch = pipeline, epoch, start_batch
        self._chain, self._close_after = chain, close_after
        self.batches_per_epoch, self.num_samples = pipeline.batches_per_epoch, pipeline.samples_per_epoch
        self.skipped: list[dict] = []
        self._cache_dir = pipeline.options.cache_dir
        self.stats = self._zero_stats()

    def _zero_stats(self) -> dict:
        stats = {"batches": 0, "samples": 0, "skipped": 0, **{f"{stage}_s": 0.0 for stage in STAGES}, "wait_s": 0.0,
                 "restarts": 0}
        if self._cache_dir is not None:
            stats.update({f"cache_{name}": 0 for name in cache.COUNTS}, cache_bytes=cachelimit.bytes_under(self._cache_dir))
        return stats

    def __len__(self) -> int:
        """Batches one pass yields: the epoch's batches minus `start_batch`."""
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        self.skipped, self.stats = [], self._zero_stats()
        this_pass = self.pipeline.start_pass(self.epoch, self.start_batch, self._chain)
        try:
            for record in this_pass.records():
                self.stats["wait_s"], self.stats["restarts"] = this_pass.wait_seconds, this_pass.restarts
                for entry in record.skipped:
                    log.warning("skipped sample %r of %s: %s", entry["key"], entry["shard"], entry["reason"])
                self.skipped.extend(record.skipped)
                self.stats["batches"] += 1
                self.stats["samples"] += record.count
                self.stats["skipped"] += len(record.skipped)
                for stage, seconds in record.seconds.items():
                    self.stats[f"{stage}_s"] += seconds
                if self._cache_dir is not None and any(record.cache.values()):
                    for name, count in record.cache.items():
                        self.stats[f"cache_{name}"] += count
                    self.stats["cache_bytes"] = cachelimit.bytes_under(self._cache_dir)
                yield this_pass.batch(record)
        finally:
            if self._close_after:
                self.pipeline.close()


def make_loader(urls, *, epoch: int = 0, start_batch: int = 0, **options) -> Loader:
    """One pass (a Loader) over this rank's share of one epoch of shards; its workers end
    with the pass. For a run of many epochs and validations, use Pipeline: its workers live
    across passes.

    Each batch is a pipeline.Batch (a dict): ``bg``, ``bgfg`` uint8 [B,3,H,W] (channels-last
    in memory); ``mask`` uint8 [B,1,H,W] (0/1); ``depth`` uint8 [B,1,H,W] (0..255, larger =
    farther); ``key`` list of str; H = W = image_size; in train mode also ``aug`` float32
    [B,8], each sample's augmentation draw (pipeline.augment.AUG_FIELDS: flip, crop box,
    jitter factors), NOT yet applied: ``batch.to(device)`` makes the floats on the training
    device and applies the draw there to all four images at once. Train on that, not on the
    raw uint8 fields. A batch's tensors are views of shared memory that is reused once the
    batch is dropped: keep what you need with ``.clone()`` (or ``.to(device)``).

    urls: brace pattern, glob, fsspec URL or a list of them; epoch: which epoch's plan;
    options: the keyword arguments of pipeline.options.LoaderOptions (batch_size and workers
    required; image_size, train, seed, storage_options, rank, world_size, pin_memory,
    shuffle_buffer, shard_sizes, retries, retry_wait, cache_dir, cache_limit, max_restarts, stall_warn,
    data_timeout), as Pipeline takes them.
    Every rank gets len(loader) batches; train drops each rank's last partial batch and
    shuffles, eval yields every sample once. Bad samples are replaced by spares; when those
    run out (or a shard ends early) batches shrink, even to empty, but never repeat a sample or
    become fewer. The same arguments give the same batches; start_batch=n gives them minus the
    first n (skipped without decoding). Each worker fetches only the bytes of its samples where
    a shard has an index (see pipeline.shardreader).
    Raises PipelineError (naming the pattern, URL or option) before the first batch when the
    shards cannot be found, the first one cannot be opened, cache_dir cannot be written or
    cache_limit is below the largest file to cache.
    Damaged tar data never raises: each sample it costs is skipped and reported.
    """
    return Loader(Pipeline(urls, **options), epoch, start_batch, close_after=True)
