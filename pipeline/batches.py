"""One (rank, worker) share of an epoch plan to batch records: read, shuffle, check, decode into
a batch buffer, fit to size, and draw each sample's augmentation (applied later, on the device:
pipeline.augment).

A share always yields exactly its planned number of batches, whatever the data holds, so
every rank takes the same number of steps. A bad sample is skipped and reported. In train
mode its place is taken by one of the share's spare samples; only when the spares run out do
batches get smaller, and a share whose shards run dry (a cut-off shard, a manifest counting too
many) yields smaller or empty batches: never a sample twice. In eval mode a batch holds
exactly its planned samples minus the bad ones. Batches skipped for a resume are composed
with the cheap JPEG checks only, so a resumed pass matches the original unless a sample
passed those checks and still failed to decode in a skipped batch.
"""

import time
from dataclasses import dataclass, field

import torch

from pipeline import batchmemory, cache, heartbeat
from pipeline.augment import draw, sample_rng
from pipeline.batchmemory import AUG, BatchBuffers
from pipeline.decode import CHANNELS, BadSample, Decoder, check
from pipeline.errors import PipelineError
from pipeline.options import LoaderOptions
from pipeline.plan import Share, batch_index, buffer_rng, shuffled
from pipeline.shardreader import ShardInfo, read_samples

# Where a worker's time on a batch goes (Record.seconds; Loader.stats as `<stage>_s`): read =
# the tar stream and the shuffle buffer, decode = the JPEGs, fit = resizing, thresholding,
# copying into the buffer and drawing the augmentation.
STAGES = ("read", "decode", "fit")


@dataclass
class Record:
    """One batch as a worker hands it to the main process: where its images are (a batch
    buffer, or fresh memory), what it holds, and what it cost.

    `seconds` is the worker's time spent on this batch, by stage (STAGES); `cache`, what
    the worker's cache counted meanwhile (pipeline.cache.counters).
    """

    generation: int
    epoch: int
    index: int  # the batch's position in its rank's epoch
    keys: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    buffers_token: int = -1  # which BatchBuffers `buffer` is one of
    buffer: int | None = None
    fresh: torch.Tensor | None = None
    pinned: dict | None = None  # the fields, copied to pinned memory by pin_memory()
    error: str | None = None  # set on a worker's last record when its storage failed

    @property
    def count(self) -> int:
        return len(self.keys)

    def pin_memory(self, *_):
        """Called by DataLoader's pin-memory thread (main process): copy the batch to
        page-locked memory and free its buffer at once, off the training loop's thread."""
        if self.error is None and self.pinned is None:
            buffers = batchmemory.in_this_process(self.buffers_token)
            self.pinned = {name: tensor.pin_memory()
                           for name, tensor in buffers.tensors(self.buffer, self.fresh, self.count).items()}
            self.buffer = self.fresh = None
        return self


def _samples(share: Share, options: LoaderOptions, shards: tuple[ShardInfo, ...]):
    for shard, start, stop in share.ranges:
        info = shards[shard]
        heartbeat.reading_range(shard, start, stop)
        yield from read_samples(info.url, start, stop, options.storage_options, retries=options.retries,
                                retry_wait=options.retry_wait, info=info, cache_dir=options.cache_dir,
                                cache_limit=options.cache_limit)


class _ShareBatcher:
    """One share's samples, pulled one by one, made into its planned batches."""

    def __init__(self, share: Share, worker: int, epoch: int, options: LoaderOptions,
                 shards: tuple[ShardInfo, ...], decoder: Decoder):
        self.share, self.worker, self.epoch, self.options, self.decoder = share, worker, epoch, options, decoder
        samples = _samples(share, options, shards)
        if options.train:
            samples = shuffled(samples, options.shuffle_buffer, buffer_rng(options.seed, epoch, options.rank, worker))
        self.samples = samples
        self.pulled, self.read_seconds = 0, 0.0
        self.cached = cache.counters()  # as of the last record: each says what was counted since

    def _next(self):
        heartbeat.stage(heartbeat.READING)
        started = time.perf_counter()
        sample = next(self.samples, None)
        self.read_seconds += time.perf_counter() - started
        self.pulled += sample is not None
        return sample

    def _spent(self) -> tuple[float, ...]:
        """Seconds spent so far on each of STAGES."""
        return self.read_seconds, self.decoder.seconds["decode"], self.decoder.seconds["fit"]

    def _fill(self, planned: int, batches_left: int, arrays, skipped: list) -> list[str]:
        """Take one batch's samples (decoded into `arrays`, or only checked when it is None)."""
        keys = []
        if self.options.train:
            # Spares cover bad samples; once they run out, what is left is shared over the
            # batches left, the earlier ones rounding up.
            capacity = min(planned, -(-(self.share.num_samples - self.pulled) // batches_left))
            while len(keys) < capacity and (sample := self._next()) is not None:
                self._take(sample, arrays, keys, skipped)
        else:
            for _ in range(planned):
                if (sample := self._next()) is None:
                    break
                self._take(sample, arrays, keys, skipped)
        return keys

    def _take(self, sample, arrays, keys: list, skipped: list) -> None:
        try:
            if sample.error is not None:
                raise BadSample(sample.error)
            if arrays is None:
                check(sample.members)
            else:
                heartbeat.stage(heartbeat.DECODING)
                n = len(keys)
                self.decoder.decode_into(sample.members, {name: arrays[name][n] for name in CHANNELS})
                if self.options.train:
                    started = time.perf_counter()
                    arrays[AUG][n] = draw(sample_rng(self.options.seed, self.epoch, sample.key))
                    self.decoder.seconds["fit"] += time.perf_counter() - started
            keys.append(sample.key)
        except BadSample as reason:
            skipped.append({"key": sample.key, "shard": sample.shard, "reason": str(reason)})

    def records(self, skip: int, buffers: BatchBuffers, generation: int):
        sizes = self.share.batch_sizes
        for i, planned in enumerate(sizes):
            skipped = []
            if i < skip:
                self._fill(planned, len(sizes) - i, None, skipped)
                continue
            before = self._spent()
            claim = buffers.claim(self.worker)
            try:
                keys = self._fill(planned, len(sizes) - i, claim.arrays, skipped)
            except BaseException:
                buffers.free(claim.buffer)  # never sent, so still this worker's to give back
                raise
            seconds = {stage: b - a for stage, a, b in zip(STAGES, before, self._spent())}
            counted, self.cached = self.cached, cache.counters()
            counted = {name: count - counted[name] for name, count in self.cached.items()}
            yield Record(generation=generation, epoch=self.epoch, index=batch_index(i, self.worker, self.options.processes),
                         keys=keys, skipped=skipped, seconds=seconds, cache=counted, buffers_token=buffers.token,
                         buffer=claim.buffer, fresh=claim.fresh)


def share_records(share: Share, worker: int, epoch: int, *, options: LoaderOptions, shards: tuple[ShardInfo, ...],
                  decoder: Decoder, buffers: BatchBuffers, generation: int, skip: int = 0):
    """Yield a share's batch records, the first `skip` of them only counted through (checked,
    not decoded), not yielded.

    A PipelineError (storage that cannot be read) ends the share with a record holding only
    its `error`: data the main process raises again, rather than an exception that
    DataLoader would wrap in the worker's traceback.
    """
    try:
        yield from _ShareBatcher(share, worker, epoch, options, shards, decoder).records(skip, buffers, generation)
    except PipelineError as error:
        yield Record(generation=generation, epoch=epoch, index=-1, error=str(error))
