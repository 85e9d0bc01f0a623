"""Batch buffers: shared memory for whole batches, a few per worker, made once and reused for
the whole run by the main process and the loader's workers.

A fresh shared-memory batch per step cost the workers about as much as decoding its JPEGs
(page faults on new memory, an mmap and a file descriptor passed per tensor; 0.3 ms per
sample at 224 px, measured with bench/loader.py's setup). So the memory is made once, before
the workers start, and a batch travels to the main process as the number of its buffer.

A buffer is busy from the moment its worker claims it until the main process lets go of the
batch: when the batch's last tensor is garbage collected (every tensor of the batch is a view
that keeps the buffer), when it has been copied to pinned memory, or when the batch is
discarded unused. Only the owning worker claims, only the main process frees. A worker whose
buffers are all busy (a consumer that keeps many batches, such as ``list(loader)``) gets fresh
shared memory for that batch instead: slower, never a wait.
"""

import functools
import itertools
import os
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import schema
from pipeline.augment import AUG_FIELDS
from pipeline.decode import CHANNELS
from pipeline.errors import PipelineError

# Batch fields (the API) of the four shard images, their channels, and the draws' field.
FIELDS = {schema.BG: "bg", schema.BGFG: "bgfg", schema.MASK: "mask", schema.DEPTH: "depth"}
AUG = "aug"
_ALIGN = 64  # every field starts on a cache line (and the float32 draws on a 4-byte boundary)
_tokens = itertools.count()
_IN_THIS_PROCESS: "weakref.WeakValueDictionary[int, BatchBuffers]" = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class Layout:
    """Where each field of one batch lives in its buffer: images NHWC (as decoded), draws last."""

    batch_size: int
    image_size: int
    train: bool

    @functools.cached_property
    def fields(self) -> dict[str, tuple[int, int, tuple[int, ...], np.dtype]]:
        """name -> (byte offset, byte size, shape, dtype) for the images (by member name) and
        the draws."""
        shapes = {name: ((self.batch_size, self.image_size, self.image_size, channels), np.dtype(np.uint8))
                  for name, channels in CHANNELS.items()}
        if self.train:
            shapes[AUG] = ((self.batch_size, len(AUG_FIELDS)), np.dtype(np.float32))
        fields, offset = {}, 0
        for name, (shape, dtype) in shapes.items():
            size = int(np.prod(shape)) * dtype.itemsize
            fields[name] = (offset, size, shape, dtype)
            offset += -(-size // _ALIGN) * _ALIGN
        return fields

    @functools.cached_property
    def nbytes(self) -> int:
        offset, size, _, _ = list(self.fields.values())[-1]
        return offset + size

    def arrays(self, memory: np.ndarray) -> dict[str, np.ndarray]:
        """Writable numpy views of one batch's fields in `memory` (its buffer's bytes)."""
        return {name: memory[offset:offset + size].view(dtype).reshape(shape)
                for name, (offset, size, shape, dtype) in self.fields.items()}

    def tensors(self, memory: torch.Tensor, count: int) -> dict[str, torch.Tensor]:
        """The batch fields of the first `count` samples, as views of `memory` (a 1-d uint8
        tensor over the buffer): images [count,C,H,W] (channels-last in memory), draws [count,8]."""
        batch = {}
        for name, (offset, size, shape, dtype) in self.fields.items():
            field = memory[offset:offset + size]
            if name == AUG:
                batch[AUG] = field.view(torch.float32).view(shape)[:count]
            else:
                batch[FIELDS[name]] = field.view(shape)[:count].permute(0, 3, 1, 2)
        return batch


@dataclass
class Claim:
    """Where a worker writes one batch: batch buffer number `buffer`, or `fresh` memory (buffer
    None) when all of the worker's buffers were busy."""

    arrays: dict[str, np.ndarray]
    buffer: int | None
    fresh: torch.Tensor | None


SHARED_MEMORY = "/dev/shm"  # where shm_open, and so torch's shared memory, puts its files on Linux


def _check_room(size: int) -> None:
    """Raise PipelineError when /dev/shm cannot hold `size` more bytes: shared memory is given
    its pages on first touch, and a page a full tmpfs cannot give is a SIGBUS in whichever
    process touches it (a worker then, a restart after it: pipeline.passes), not an error."""
    try:
        stats = os.statvfs(SHARED_MEMORY)
    except OSError:  # not Linux, or no /dev/shm: nothing to check
        return
    free = stats.f_bavail * stats.f_frsize
    if free < size:
        raise PipelineError(f"{SHARED_MEMORY} is full: {free / 2**20:,.1f} MiB free, the loader's batch buffers "
                            f"need {size / 2**20:,.1f} MiB more (in Docker, give --shm-size more room)")


def _new_bytes(size: int, shared: bool) -> torch.Tensor:
    """`size` uninitialised bytes, in shared memory when `shared`.

    Made there directly with UntypedStorage._new_shared, as DataLoader's own collate does: the
    project's one private torch call, kept on purpose. The public share_memory_() copies the
    tensor into new shared memory with an OpenMP-parallel copy, and in a process forked from
    one whose OpenMP pool is running (a rank started with fork, as
    tests/test_loader.py::test_rank_and_world_size_come_from_torch_distributed does) that copy
    hangs for good inside libgomp; it would also touch every page of the buffers up front."""
    if not shared:
        return torch.empty(size, dtype=torch.uint8)
    _check_room(size)
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(size), 0, (size,))


class BatchBuffers:
    """`per_worker` reusable batch buffers for each of `workers` producers."""

    def __init__(self, layout: Layout, workers: int, per_worker: int, shared: bool):
        self.layout, self.per_worker, self.shared = layout, per_worker, shared
        # Made before the workers start, so they inherit (or are sent) the same pages.
        self.memory = _new_bytes(workers * per_worker * layout.nbytes, shared)
        self.busy = _new_bytes(workers * per_worker, shared).zero_()
        self.token = next(_tokens)
        _IN_THIS_PROCESS[self.token] = self

    def __getstate__(self):  # spawned workers get the tensors, not this process's numpy views
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        _IN_THIS_PROCESS[self.token] = self

    def _numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """(memory, busy flags) as numpy arrays of this process, made on first use."""
        if "_arrays" not in self.__dict__:
            self._arrays = (self.memory.numpy(), self.busy.numpy())
        return self._arrays

    def _buffer_bytes(self, buffer: int) -> np.ndarray:
        start = buffer * self.layout.nbytes
        return self._numpy()[0][start:start + self.layout.nbytes]

    # --- worker side ----------------------------------------------------------------
    def claim(self, worker: int) -> Claim:
        """A free buffer of `worker`'s, marked busy; fresh memory when all of them are busy."""
        busy = self._numpy()[1]
        for buffer in range(worker * self.per_worker, (worker + 1) * self.per_worker):
            if not busy[buffer]:
                busy[buffer] = 1
                return Claim(self.layout.arrays(self._buffer_bytes(buffer)), buffer, None)
        fresh = _new_bytes(self.layout.nbytes, self.shared)
        return Claim(self.layout.arrays(fresh.numpy()), None, fresh)

    # --- main-process side -----------------------------------------------------------
    def tensors(self, buffer: int | None, fresh: torch.Tensor | None, count: int) -> dict[str, torch.Tensor]:
        """A delivered batch's fields as views; its buffer is freed once the last view is gone."""
        if buffer is None:
            return self.layout.tensors(fresh, count)
        window = self._buffer_bytes(buffer)  # a new array object, owned by the tensors below only
        weakref.finalize(window, self.free, buffer)
        return self.layout.tensors(torch.from_numpy(window), count)

    def free(self, buffer: int | None) -> None:
        """Mark a buffer free: the main process's job, or the owning worker's for a buffer it
        claimed and never sent."""
        if buffer is not None:
            self._numpy()[1][buffer] = 0


def in_this_process(token: int) -> BatchBuffers:
    """The BatchBuffers with this token (the main process's, for a record met in its pin thread)."""
    return _IN_THIS_PROCESS[token]
