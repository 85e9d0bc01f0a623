"""One (rank, worker) slot of the epoch plan to batches: read, shuffle, check, decode, fit to
size, and draw each sample's augmentation (applied later, on the device: pipeline.augment).

A slot always yields exactly its planned number of batches, whatever the data holds, so
every rank takes the same number of steps. A bad sample is skipped and reported; in train
mode its place is taken by one of the slot's spare samples, only when the spares run out do
batches get smaller, and when the stream runs dry (a cut-off shard) the last batch repeats
rather than a step going missing. In eval mode a batch holds exactly its planned samples
minus the bad ones. Batches skipped for a resume are composed with the cheap JPEG checks
only, so a resumed stream matches the original unless a sample passed those checks and
still failed to decode in a skipped batch.
"""

import random
from dataclasses import dataclass

import torch
from torch.utils.data import get_worker_info

from pipeline import schema
from pipeline.augment import AUG_FIELDS, draw, sample_rng
from pipeline.decode import BadSample, check, decode, fit
from pipeline.errors import PipelineError
from pipeline.plan import Slot, batch_index
from pipeline.shardreader import read_samples

# Batch dict fields (the API) for each shard member.
FIELDS = {schema.BG: "bg", schema.BGFG: "bgfg", schema.MASK: "mask", schema.DEPTH: "depth"}
CHANNELS = {schema.BG: 3, schema.BGFG: 3, schema.MASK: 1, schema.DEPTH: 1}
AUG = "aug"  # train batches: each sample's draw (augment.AUG_FIELDS), applied by Batch.to
INDEX, SKIPPED = "_index", "_skipped"  # private fields the Loader pops
ERROR = "_error"  # the only field of a worker's last record when its slot failed


@dataclass(frozen=True)
class StreamConfig:
    """What every slot of one loader shares."""

    urls: tuple[str, ...]
    batch_size: int
    image_size: int
    train: bool
    seed: int
    epoch: int
    rank: int
    workers: int
    shuffle_buffer: int
    storage_options: dict
    retries: int
    retry_wait: float
    shards: tuple = ()  # shardreader.ShardInfo per URL
    cache_dir: str | None = None


def _samples(slot: Slot, config: StreamConfig):
    for shard, start, stop in slot.ranges:
        yield from read_samples(config.urls[shard], start, stop, config.storage_options,
                                retries=config.retries, retry_wait=config.retry_wait,
                                info=config.shards[shard] if config.shards else None, cache_dir=config.cache_dir)


def _shuffled(samples, size: int, rng: random.Random):
    """A shuffle buffer: holds up to `size` samples and emits a random one per arrival."""
    buffer = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


class _SlotStream:
    def __init__(self, slot: Slot, worker: int, config: StreamConfig):
        self.slot, self.worker, self.config = slot, worker, config
        samples = _samples(slot, config)
        if config.train:
            rng = random.Random(f"buffer/{config.seed}/{config.epoch}/{config.rank}/{worker}")
            samples = _shuffled(samples, config.shuffle_buffer, rng)
        self.samples = samples
        self.pulled = 0

    def _next(self):
        sample = next(self.samples, None)
        self.pulled += sample is not None
        return sample

    def _fill(self, planned: int, batches_left: int, decode_it: bool, skipped: list):
        """Take samples for one batch; returns (keys, batch images or None when not decoding)."""
        if self.config.train:
            # Spares cover bad samples; once they run out, share what is left over the batches.
            capacity = min(planned, max(1, (self.slot.num_samples - self.pulled) // batches_left))
        else:
            capacity = planned
        images = _new_batch(capacity, self.config.image_size, self.config.train) if decode_it else None
        keys = []
        if self.config.train:
            while len(keys) < capacity and (sample := self._next()) is not None:
                self._take(sample, images, keys, skipped)
        else:
            for _ in range(planned):
                if (sample := self._next()) is None:
                    break
                self._take(sample, images, keys, skipped)
        return keys, images

    def _take(self, sample, images, keys, skipped):
        try:
            if sample.error is not None:
                raise BadSample(sample.error)
            if images is None:
                check(sample.members)
            else:
                decoded = decode(sample.members)
                fit(decoded, self.config.image_size, out={member: images[member][len(keys)] for member in CHANNELS})
                if self.config.train:
                    images[AUG][len(keys)] = torch.tensor(draw(sample_rng(self.config.seed, self.config.epoch, sample.key)))
            keys.append(sample.key)
        except BadSample as reason:
            skipped.append({"key": sample.key, "shard": sample.shard, "reason": str(reason)})

    def batches(self, skip: int):
        sizes, last = self.slot.batch_sizes, None
        for i, planned in enumerate(sizes):
            skipped = []
            keys, images = self._fill(planned, len(sizes) - i, i >= skip, skipped)
            if i < skip:
                continue
            if keys or not self.config.train:
                last = {FIELDS.get(member, member): tensor[:len(keys)] for member, tensor in images.items()}
                last["key"] = keys
            elif last is None:  # a slot whose stream gave nothing usable at all
                shards = ", ".join(self.config.urls[shard] for shard, _, _ in self.slot.ranges)
                raise PipelineError(f"no readable sample in {shards} ({len(skipped)} skipped)")
            # else: the stream ended early (a cut-off shard, a manifest counting too many). Every
            # rank must still take its planned steps, so the last batch goes round again.
            yield last | {INDEX: batch_index(i, self.worker, self.config.workers), SKIPPED: skipped}


def _new_batch(count: int, size: int, train: bool) -> dict[str, torch.Tensor]:
    """Uninitialised images (RGB channels-last, as decoded) for `count` samples, plus their
    augmentation draws in train mode; in a worker process they live in shared memory already, so
    handing the batch to the main process copies nothing."""
    shapes = {member: (count, size, size, channels) for member, channels in CHANNELS.items()}
    if train:
        shapes[AUG] = (count, len(AUG_FIELDS))
    batch = {}
    for member, shape in shapes.items():
        dtype = torch.float32 if member == AUG else torch.uint8
        tensor = torch.empty(shape, dtype=dtype)
        if get_worker_info() is not None:
            tensor.share_memory_()  # before anything is written: it moves the storage, a copy of nothing
        batch[member] = tensor if member == AUG else tensor.permute(0, 3, 1, 2)
    return batch


def slot_batches(slot: Slot, worker: int, config: StreamConfig, skip: int = 0):
    """Yield a slot's batches (with private INDEX and SKIPPED fields), the first `skip`
    of them only counted through (checked, not decoded), not yielded.

    A PipelineError (storage that cannot be read) ends the slot with a record holding only
    ERROR, its message: data the main process raises again, rather than an exception that
    DataLoader would wrap in the worker's traceback.
    """
    try:
        yield from _SlotStream(slot, worker, config).batches(skip)
    except PipelineError as error:
        yield {ERROR: str(error)}
