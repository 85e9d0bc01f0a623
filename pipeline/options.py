"""The arguments of a Pipeline (and of make_loader, which adds epoch and start_batch), declared once."""

import dataclasses
import os
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError


@dataclass(frozen=True, kw_only=True)
class LoaderOptions:
    """How a Pipeline reads its shards; Pipeline(urls, **options) and make_loader take these names.

    batch_size, workers: samples per batch and loader processes (0: batches made in the main
    process). image_size: the side every image is fitted to. scaled_decode: a JPEG at least
    twice image_size is decoded smaller by libjpeg (1/2, 1/4 or 1/8, never below image_size)
    before it is fitted, for a fraction of the CPU; False decodes every member whole (for
    comparisons; pipeline.decode). train: shuffle (shards by seed and epoch, samples in a
    buffer of `shuffle_buffer`), draw augmentations, drop each rank's last partial batch;
    else (eval) every sample once, in order. seed: the shard order, the shuffle buffer and
    the draws. rank/world_size: explicit values win, else
    torch.distributed's when initialised, else 0 and 1. pin_memory (None: when CUDA is
    available): batches copied to page-locked memory by DataLoader's pin-memory thread.
    shard_sizes: sample counts (list, or name -> count), else the manifest beside the shards,
    else their index, else (local files) a tar header scan. storage_options go to fsspec.
    Transient read errors are retried `retries` times, waiting retry_wait * 2**attempt.
    cache_dir: keep remote shards there, checked against the manifest's size and sha256, for
    later epochs and runs (pipeline.cache); the processes of one machine may share it.
    cache_limit: the bytes cache_dir may hold, its other files and downloads counted; the
    least recently used copy no process reads is evicted to make room (pipeline.cachelimit).
    samples_per_epoch: an epoch's size for a mixture of (urls, weight) sources (None: their
    total; pipeline.mixture).
    max_restarts: worker deaths a pass survives (each restarts the workers where the pass
    stands); the next one is a PipelineError. stall_warn: seconds without the batch a pass waits
    for before a line names the worker, what it reads and does (again at each doubling);
    data_timeout: seconds before that is a PipelineError (None: never, for either).
    """

    batch_size: int
    workers: int
    image_size: int = 224
    scaled_decode: bool = True
    train: bool = True
    seed: int = 0
    storage_options: dict | None = None
    rank: int | None = None
    world_size: int | None = None
    pin_memory: bool | None = None
    shuffle_buffer: int = 512
    shard_sizes: list | dict | None = None
    retries: int = 5
    retry_wait: float = 1.0
    cache_dir: str | os.PathLike | None = None
    cache_limit: int | None = None
    samples_per_epoch: int | None = None
    max_restarts: int = 3
    stall_warn: float | None = 60.0
    data_timeout: float | None = None

    @property
    def processes(self) -> int:
        """Processes making batches: the workers, or the main process alone (workers=0)."""
        return max(self.workers, 1)

    def resolved(self) -> "LoaderOptions":
        """These options checked (PipelineError naming a bad one), with rank and world_size
        found, storage_options a dict and cache_dir a str."""
        for name, least in (("batch_size", 1), ("workers", 0), ("image_size", 1), ("shuffle_buffer", 1),
                            ("retries", 0), ("max_restarts", 0)):
            if getattr(self, name) < least:
                raise PipelineError(f"{name} must be >= {least}, got {getattr(self, name)}")
        for name in ("stall_warn", "data_timeout"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise PipelineError(f"{name} must be a number of seconds > 0 (or None), got {getattr(self, name)}")
        if self.cache_limit is not None:
            if self.cache_dir is None:
                raise PipelineError("cache_limit needs a cache_dir to bound")
            if not isinstance(self.cache_limit, int) or self.cache_limit < 1:
                raise PipelineError(f"cache_limit must be a number of bytes >= 1, got {self.cache_limit!r}")
        if self.samples_per_epoch is not None and not (isinstance(self.samples_per_epoch, int)
                                                       and self.samples_per_epoch >= 1):
            raise PipelineError(f"samples_per_epoch must be an integer >= 1, got {self.samples_per_epoch!r}")
        rank, world_size = _rank_and_world(self.rank, self.world_size)
        if not 0 <= rank < world_size:
            raise PipelineError(f"rank {rank} is outside world size {world_size}")
        return dataclasses.replace(self, rank=rank, world_size=world_size,
                                   storage_options=dict(self.storage_options or {}),
                                   cache_dir=None if self.cache_dir is None else os.fspath(self.cache_dir))


def _rank_and_world(rank, world_size) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank = torch.distributed.get_rank() if rank is None else rank
        world_size = torch.distributed.get_world_size() if world_size is None else world_size
    return (0 if rank is None else rank), (1 if world_size is None else world_size)
