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
                                              generation (passcontrol.PassControl), a resumed or
                                              chained one goes on with what they are making
  worker, per pass     EpochSource            (epoch, start batch) -> this worker's Share of the
                                              epoch's plan (plan.plan_epoch; a continued epoch's:
                                              pipeline.elastic)
  worker               shardreader.read_samples  Share's shard ranges -> raw samples (ranged
                                              reads with an index, retried; cache.py's copy)
  worker               plan.shuffled          -> samples in shuffle-buffer order (train)
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

import dataclasses
import logging

import torch

from pipeline import cache, cachelimit, elastic, mixture
from pipeline.batches import STAGES
from pipeline.batchmemory import Layout
from pipeline.errors import PipelineError
from pipeline.options import LoaderOptions
from pipeline.passes import Pass, Patience
from pipeline.plan import samples_in
from pipeline.shardreader import prepare_shards
from pipeline.sources import shard_basename
from pipeline.epochsource import EpochSource, init_worker
from pipeline.workers import WorkerPool

log = logging.getLogger(__name__)
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
        found, mix = mixture.resolve(urls, options.storage_options, options.samples_per_epoch)
        shards = prepare_shards(found, options.storage_options,
                                options.shard_sizes, retries=options.retries, retry_wait=options.retry_wait,
                                cache_dir=options.cache_dir, cache_limit=options.cache_limit)
        if options.cache_limit is not None:
            local_rank, local_ranks = cachelimit.local_ranks(options.world_size)
            cachelimit.check_limit(options.cache_dir, options.cache_limit, shards,
                                   readers=options.processes * local_ranks, warn=local_rank == 0)
        self.source = EpochSource(options, tuple(shards), mix)
        self.identity = elastic.identity([shard_basename(shard.url) for shard in shards], self.source.sizes,
                                         options, mixture=mix and mix.identity(self.source.sizes))
        plan = self.source.plan(0)  # batch counts are the same every epoch: they depend on the sizes only
        if plan.batches_per_rank == 0:
            raise PipelineError(f"{sum(self.source.sizes)} samples in {urls!r} cannot fill one batch of "
                                f"{options.batch_size} on each of {options.world_size} ranks")
        self.batches_per_epoch = plan.batches_per_rank
        self.samples_per_epoch = plan.samples_per_rank[options.rank]
        self.train, self.workers = options.train, options.workers
        self.pin_memory = torch.cuda.is_available() if options.pin_memory is None else options.pin_memory
        self._layout = Layout(options.batch_size, options.image_size, options.train)

    def epoch(self, epoch: int | None = None, start_batch: int = 0, *, chain: bool = True,
              state: dict | None = None) -> "Loader":
        """One pass: epoch `epoch`'s batches from `start_batch` on (epoch None: 0, or the
        state's). chain (train): the workers go on into epoch + 1 while this one ends; pass
        False for a run's last epoch, so that no batch of an epoch nobody asks for is read and
        made. state (a Loader.state_dict(), taken on any topology): the rest of its epoch on
        this one; a pass continuing another topology's epoch is never chained."""
        return Loader(self, epoch, start_batch, chain=chain, state=state)

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

    def start_pass(self, epoch: int, start_batch: int, chain: bool, prior: tuple, batches: int) -> Pass:
        """Epoch `epoch`'s records from `start_batch` on (what a Loader iterates), the epoch
        continued after the `prior` segments (pipeline.elastic), `batches` long. A train
        pass that starts where the last one stopped goes on with the workers' records as they
        come; any other starts the workers' sources anew (a new generation). The workers'
        source knows which epoch it continues from its start: another means new workers."""
        continued, current = ((epoch, prior) if prior else None), self.source.continued
        if continued != current and (continued is not None or current[0] == epoch):
            self.close()
            self.source = EpochSource(self.options, self.source.shards, self.source.mix, continued)
        if self._pool is None:
            self._pool = WorkerPool(self.source, self._layout, workers=self.workers, shards=self.source.shards,
                                    pin_memory=self.pin_memory and self.workers > 0, worker_init_fn=init_worker)
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
                              start_batch=start_batch, batches_per_epoch=batches, chain=chain,
                              patience=patience)
        return self._pass


class Loader:
    """One pass of a Pipeline: an iterable of this rank's batches (see make_loader).

    Attributes: ``num_samples`` (samples this rank is planned to see in this pass's epoch, or
    in the rest of it that a state continues), ``batches_per_epoch`` (likewise), ``epoch``,
    ``start_batch``, ``skipped`` (one dict per bad sample met in the
    pass: key, shard, reason) and ``stats``: counts (batches, samples, skipped), the workers'
    seconds on each of pipeline.batches.STAGES as ``read_s``, ``decode_s``, ``fit_s`` (summed
    over workers, for the batches delivered so far) and ``wait_s``, the time this process
    waited for the next batch, ``restarts`` (of the workers, after deaths: pipeline.passes); with a cache_dir also ``cache_hits``, ``cache_misses``,
    ``cache_evictions`` (the workers' counts, pipeline.cache.counters) and ``cache_bytes``
    (what the folder holds, as of the last batch that changed a count).
    """

    def __init__(self, pipeline: Pipeline, epoch: int | None, start_batch: int, *, chain: bool = False,
                 close_after: bool = False, state: dict | None = None):
        # _prior: the segments of the epoch before this pass's topology (pipeline.elastic)
        start = elastic.resume(state, pipeline.identity, pipeline.source.segment, epoch=epoch, start_batch=start_batch)
        self.pipeline, self.epoch, self.start_batch, self._prior = pipeline, start.epoch, start.start_batch, start.prior
        self._plan = pipeline.source.plan(self.epoch, self._prior)
        # The epoch's samples, and those the segments before this pass consumed (for state_dict).
        self._epoch_samples = samples_in(pipeline.source.runs(self.epoch))
        self._before = self._epoch_samples - samples_in(pipeline.source.runs(self.epoch, self._prior))
        self.batches_per_epoch = self._plan.batches_per_rank
        self.num_samples = self._plan.samples_per_rank[pipeline.options.rank]
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise PipelineError(f"start_batch {start_batch} is outside the epoch's {self.batches_per_epoch} batches")
        self._chain, self._close_after = chain and not self._prior, close_after
        self.taken = 0  # batches handed out by the last iteration
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

    def state_dict(self) -> dict:
        """Where the epoch stands after the batches this pass has handed out (every rank's
        state is the same): JSON-serialisable, for Pipeline.epoch(state=) or make_loader(state=)
        on any ranks, workers and batch size (pipeline.elastic)."""
        segment = dataclasses.replace(self.pipeline.source.segment, batches=self.start_batch + self.taken)
        return elastic.state_dict(self.pipeline.identity, epoch=self.epoch, segments=[*self._prior, segment],
                                  samples_done=self._before + elastic.consumed(self._plan, segment),
                                  epoch_samples=self._epoch_samples)

    def __iter__(self):
        self.skipped, self.stats, self.taken = [], self._zero_stats(), 0
        this_pass = self.pipeline.start_pass(self.epoch, self.start_batch, self._chain, self._prior,
                                             self.batches_per_epoch)
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
                self.taken += 1
                yield this_pass.batch(record)
        finally:
            if self._close_after:
                self.pipeline.close()


def make_loader(urls, *, epoch: int | None = None, start_batch: int = 0, state: dict | None = None,
                **options) -> Loader:
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

    urls: brace pattern, glob, fsspec URL or a list of them; epoch: which epoch's plan (None:
    0, or the state's); state: a Loader.state_dict() taken on any ranks, workers and batch
    size, whose epoch this pass finishes (pipeline.elastic: eval gives each sample left
    once, train none twice and drops at most world_size x batch_size more);
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
    return Loader(Pipeline(urls, **options), epoch, start_batch, close_after=True, state=state)
