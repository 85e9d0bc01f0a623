"""make_loader: shard URLs to an iterable of decoded batches (with their augmentation draws) for one rank."""

import ctypes
import logging
import os
import signal
import sys

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.augment import Batch
from pipeline.batches import ERROR, INDEX, SKIPPED, StreamConfig, slot_batches
from pipeline.errors import PipelineError
from pipeline.plan import batches_to_skip, plan_epoch
from pipeline.shardreader import prepare_shards
from pipeline.sources import expand_urls

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class _RankStream(IterableDataset):
    """This rank's slots; each DataLoader worker streams its own."""

    def __init__(self, slots, config: StreamConfig, start_batch: int):
        super().__init__()
        self.slots, self.config, self.start_batch = slots, config, start_batch

    def __iter__(self):
        info = get_worker_info()
        return self._batches(0 if info is None else info.id)  # workers=0 plans a single slot

    def _batches(self, worker: int):
        skip = batches_to_skip(self.start_batch, worker, self.config.workers)
        return slot_batches(self.slots[worker], worker, self.config, skip)


def _init_worker(_worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers are many already; intra-op threads only contend
    # Ctrl-C and a scheduler's SIGTERM reach every process of the job: the main process decides
    # when to stop (train.py saves first) and ends its workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # That also ignores the SIGTERM with which the DataLoader ends a worker that outstays its
    # shutdown, so let the kernel end it instead should the main process go first.
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Loader:
    """Iterable of this rank's batches for one epoch (see make_loader).

    Attributes: ``num_samples`` (samples this rank is planned to see this epoch),
    ``batches_per_epoch``, ``skipped`` (one dict per bad sample met so far: key, shard,
    reason) and ``stats`` (batches, samples, skipped: counts so far).
    """

    def __init__(self, dataloader: DataLoader, *, batches: int, samples: int, start_batch: int):
        self._dataloader = dataloader
        self.batches_per_epoch, self.num_samples, self.start_batch = batches, samples, start_batch
        self.skipped: list[dict] = []
        self.stats = {"batches": 0, "samples": 0, "skipped": 0}

    def __len__(self) -> int:
        """Batches one pass yields: the epoch's batches minus `start_batch`."""
        return self.batches_per_epoch - self.start_batch

    def __iter__(self):
        # Workers deliver round robin; reorder by planned index so the sequence never
        # depends on which worker runs ahead (and start_batch can begin at any worker).
        pending, expected = {}, self.start_batch
        for batch in self._dataloader:
            if ERROR in batch:
                raise PipelineError(batch[ERROR])
            self._report(batch.pop(SKIPPED))
            pending[batch.pop(INDEX)] = batch
            while expected in pending:
                ready = pending.pop(expected)
                expected += 1
                self.stats["batches"] += 1
                self.stats["samples"] += len(ready["key"])
                yield Batch(ready)
        assert not pending and expected == self.batches_per_epoch, (sorted(pending), expected)

    def _report(self, records: list[dict]) -> None:
        for record in records:
            log.warning("skipped sample %r of %s: %s", record["key"], record["shard"], record["reason"])
        self.skipped.extend(records)
        self.stats["skipped"] += len(records)


def _rank_and_world(rank, world_size) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank() if rank is None else rank
        world_size = torch.distributed.get_world_size() if world_size is None else world_size
    return (0 if rank is None else rank), (1 if world_size is None else world_size)


def make_loader(urls, *, batch_size: int, workers: int, image_size: int = 224, train: bool = True,
                seed: int = 0, epoch: int = 0, storage_options: dict | None = None,
                rank: int | None = None, world_size: int | None = None, start_batch: int = 0,
                pin_memory: bool | None = None, shuffle_buffer: int = 512, shard_sizes=None,
                retries: int = 5, retry_wait: float = 1.0, cache_dir: str | os.PathLike | None = None) -> Loader:
    """A Loader over this rank's share of one epoch of shards.

    Each batch is a pipeline.Batch (a dict): ``bg``, ``bgfg`` uint8 [B,3,H,W] (channels-last
    in memory); ``mask`` uint8 [B,1,H,W] (0/1); ``depth`` uint8 [B,1,H,W] (0..255, larger =
    farther); ``key`` list of str; H = W = image_size; in train mode also ``aug`` float32
    [B,8], each sample's augmentation draw (pipeline.augment.AUG_FIELDS: flip, crop box,
    jitter factors), NOT yet applied: ``batch.to(device)`` makes the floats on the training
    device and applies the draw there to all four images at once. Train on that, not on the
    raw uint8 fields.

    urls: brace pattern, glob, fsspec URL or a list of them. rank/world_size: explicit
    values win, else torch.distributed's when initialised, else 0 and 1. Every rank gets
    len(loader) batches; train drops each rank's last partial batch and shuffles (shards by
    seed and epoch, samples in a buffer of `shuffle_buffer`), eval yields every sample once.
    The same arguments give the same batches; start_batch=n gives them minus the first n
    (skipped without decoding). Sample counts come from `shard_sizes` (list, or name ->
    count), else the manifest beside the shards, else their index, else (local files) a tar
    header scan. Each worker fetches only the bytes of its samples where a shard has an index
    (see pipeline.shardreader). Transient read errors are retried `retries` times, waiting
    retry_wait * 2**attempt. cache_dir: keep remote shards there, checked against the
    manifest's size and sha256, for later epochs and runs (pipeline.cache); the processes of
    one machine may share it.
    Raises PipelineError (naming the pattern, URL or option) before the first batch when the
    shards cannot be found, the first one cannot be opened or cache_dir cannot be written.
    Damaged tar data never raises: each sample it costs is skipped and reported.
    """
    for name, value, least in (("batch_size", batch_size, 1), ("workers", workers, 0),
                               ("image_size", image_size, 1), ("shuffle_buffer", shuffle_buffer, 1),
                               ("start_batch", start_batch, 0), ("retries", retries, 0)):
        if value < least:
            raise PipelineError(f"{name} must be >= {least}, got {value}")
    rank, world_size = _rank_and_world(rank, world_size)
    if not 0 <= rank < world_size:
        raise PipelineError(f"rank {rank} is outside world size {world_size}")
    storage_options = dict(storage_options or {})
    url_list = expand_urls(urls, storage_options)
    cache_dir = None if cache_dir is None else os.fspath(cache_dir)
    shards = prepare_shards(url_list, storage_options, shard_sizes, retries=retries, retry_wait=retry_wait,
                            cache_dir=cache_dir)
    sizes = [shard.samples for shard in shards]
    slot_count = max(workers, 1)
    plan = plan_epoch(sizes, world_size=world_size, workers=slot_count, batch_size=batch_size,
                      train=train, seed=seed, epoch=epoch)
    if plan.batches_per_rank == 0:
        raise PipelineError(f"{sum(sizes)} samples in {urls!r} cannot fill one batch of "
                            f"{batch_size} on each of {world_size} ranks")
    if start_batch > plan.batches_per_rank:
        raise PipelineError(f"start_batch {start_batch} is past the epoch's {plan.batches_per_rank} batches")
    config = StreamConfig(tuple(url_list), batch_size, image_size, train, seed, epoch, rank,
                          slot_count, shuffle_buffer, storage_options, retries, retry_wait,
                          tuple(shards), cache_dir)
    dataset = _RankStream(plan.slots[rank], config, start_batch)
    dataloader = DataLoader(dataset, batch_size=None, num_workers=workers,
                            pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                            worker_init_fn=_init_worker if workers else None)
    return Loader(dataloader, batches=plan.batches_per_rank,
                  samples=plan.samples_per_rank[rank], start_batch=start_batch)
