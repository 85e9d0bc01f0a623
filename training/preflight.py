"""Checks that need the data or the device, made before the first step (train.py) or the first
prediction (predict.py): a run that cannot go through fails now, in one line, instead of at
its first validation or in an allocation failure deep inside a step.
"""

import math
import os
import tarfile
from pathlib import Path

import torch

from model import LossWeights, UNet, UNetConfig, count_parameters, total_loss
from pipeline import Pipeline, PipelineError, expand_urls, schema
from pipeline.batchmemory import Layout
from pipeline.streams import open_range
from pipeline.workers import BUFFERS_PER_WORKER

from . import UserError
from .distributed import Context, fail_together
from .runfolder import find_val_shards

# Against the peak memory of real steps (CPU; widths 4-24, 224-1024 px, batches 1-8) the
# estimate below came to 0.84-1.09 of it: a step also holds its input, gradients of activations
# in flight and allocator slack.
_MARGIN = 1.4
# POSIX shared memory (shm_open), where the loader's batch buffers live (pipeline.batchmemory).
SHARED_MEMORY = Path("/dev/shm")
_SHARED_SLACK = 8 * 2**20  # multiprocessing's locks and arenas and the buffers' busy flags live there too


def probe_shard(url: str, storage_options: dict | None = None, *, retries: int = 5) -> None:
    """Raise UserError unless `url` opens and starts with a tar header (a peek, not a read)."""
    with open_range(url, storage_options, end=tarfile.BLOCKSIZE, retries=retries) as stream:
        block = stream.read(tarfile.BLOCKSIZE)
    if not block:
        raise UserError(f"{url} is empty, not a tar shard")
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.EmptyHeaderError:
        raise UserError(f"{url} holds no samples (an empty tar)") from None
    except tarfile.HeaderError as error:
        hint = f"; {schema.MANIFEST} describes the shards, pass one of them" if url.endswith(schema.MANIFEST) else ""
        raise UserError(f"{url} is not a tar shard: {error}{hint}") from None


def open_validation_shards(urls: list[str], loader_args: dict) -> Pipeline | None:
    """Open every validation shard and make the validation Pipeline (sample counts read,
    batches per rank planned) the run will use, so a bad one fails now; None without shards."""
    for url in urls:
        try:
            probe_shard(url, loader_args["storage_options"], retries=loader_args["retries"])
        except (UserError, PipelineError) as error:
            raise UserError(f"validation shard: {error}") from None
    return Pipeline(urls, train=False, **loader_args) if urls else None


def _state_bytes(config: UNetConfig, training: bool) -> int:
    """The weights, and for training their gradients and AdamW's two moments (float32)."""
    with torch.device("meta"):  # counts the parameters without allocating them
        parameters = count_parameters(UNet(config))
    return parameters * 4 * (4 if training else 1)


def _activation_bytes(config: UNetConfig, image_size: int, batch_size: int, amp_dtype) -> int:
    """What a training step keeps for its backward pass (also an upper bound for a forward pass
    alone), measured on the CPU at two small sizes: the part that grows with the pixels is
    scaled to the real size and batch, the rest (weights cast by autocast) is not."""
    model = UNet(config).to(memory_format=torch.channels_last)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(size: int) -> int:
        saved = {}

        def pack(tensor):
            storage = tensor.untyped_storage()  # views of one tensor share it: count it once
            if storage.data_ptr() not in weights:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        # Two samples: batch norm needs two values per channel where the deepest level is 1x1.
        x = torch.zeros(2, config.in_channels, size, size).contiguous(memory_format=torch.channels_last)
        target = torch.zeros(2, 1, size, size)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
            total_loss(*model(x), target, target, LossWeights())
        return sum(saved.values())

    small = config.stride
    at_small, at_double = saved_bytes(small), saved_bytes(2 * small)
    per_pixel = (at_double - at_small) / (3 * small**2)  # of both samples
    fixed = max(at_small - per_pixel * small**2, 0)
    return int(fixed + per_pixel / 2 * image_size**2 * batch_size)


def available_memory(device: torch.device) -> int | None:
    """Free bytes on a GPU; on the CPU the kernel's MemAvailable, capped by a cgroup (container)
    limit. None where neither can be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit to honour
    return free


def _gib(size: float) -> str:
    return f"{size / 2**30:,.1f} GiB"


def step_memory(config: UNetConfig, image_size: int, batch_size: int, *, training: bool,
                amp_dtype: torch.dtype | None = None) -> int:
    """The bytes check_memory estimates one step needs, margin included (bench/gpu.py sets a
    GPU's measured peak beside it)."""
    return int(_MARGIN * (_state_bytes(config, training) + _activation_bytes(config, image_size, batch_size, amp_dtype)))


def check_memory(config: UNetConfig, image_size: int, batch_size: int, device: torch.device, *,
                 training: bool, amp_dtype: torch.dtype | None = None, options: str) -> None:
    """Raise UserError when one step would need more memory than `device` has free, naming
    --width or `options` (e.g. "--image-size 512 with --batch-size 32")."""
    free = available_memory(device)
    if free is None:
        return
    state = _MARGIN * _state_bytes(config, training)
    if state > free:  # checked first: the measurement below builds the model
        raise UserError(f"--width {config.width}: the model alone needs about {_gib(state)}; "
                        f"{device} has {_gib(free)} free")
    needed = step_memory(config, image_size, batch_size, training=training, amp_dtype=amp_dtype)
    if needed > free:
        step = "training step" if training else "prediction"
        raise UserError(f"{options} needs about {_gib(needed)} for one {step} (width {config.width}); "
                        f"{device} has {_gib(free)} free")


def shared_memory_free() -> int | None:
    """Free bytes in SHARED_MEMORY; None where there is none to measure."""
    try:
        stats = os.statvfs(SHARED_MEMORY)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def shared_buffer_bytes(data: Pipeline) -> int:
    """The shared memory a Pipeline's batch buffers take once its workers start (none without
    workers: the batches are then made in this process's own memory)."""
    options = data.options
    if not options.workers:
        return 0
    return options.workers * BUFFERS_PER_WORKER * Layout(options.batch_size, options.image_size, options.train).nbytes


def check_shared_memory(train_data: Pipeline, val_data: Pipeline | None, local_ranks: int) -> None:
    """Raise UserError when the batch buffers of the run's loaders, on every rank of this machine,
    would not fit in /dev/shm (Docker gives a container 64 MB unless told --shm-size).

    They are made once the workers start, after this check: the training loader's, and at the
    first validation the baselines' fit and the validation loader's, the same size each (eval
    layout); the fit's are freed before the validation loader's are made, so two pipelines'
    worth counts, not three.
    """
    free = shared_memory_free()
    if free is None:
        return
    per_rank = shared_buffer_bytes(train_data) + (shared_buffer_bytes(val_data) if val_data else 0)
    needed = per_rank * local_ranks + _SHARED_SLACK if per_rank else 0
    if needed > free:
        ranks = f" x {local_ranks} ranks on this machine" if local_ranks > 1 else ""
        raise UserError(
            f"{SHARED_MEMORY} has {free / 2**20:,.0f} MiB free, the loader's shared batch buffers need "
            f"{needed / 2**20:,.0f} MiB (--workers {train_data.options.workers} x {BUFFERS_PER_WORKER} batches of "
            f"{train_data.options.batch_size} at {train_data.options.image_size} px, for training"
            f"{' and validation' if val_data else ''}{ranks}): in Docker pass "
            f"--shm-size={math.ceil(needed * 1.25 / 2**30)}g, or use fewer --workers or a smaller --batch-size")


def check_training(args, ctx: Context, loader_args: dict, amp_dtype):
    """train.py's data and checks before its first step, on every rank (a failure on one stops
    all: a shard listing, a manifest, a cache folder or a probe can fail on one node only).

    Returns (training URLs, their Pipeline, validation URLs, their Pipeline or None). Made once:
    the workers live for the whole run, and making a Pipeline reads the manifests and opens a
    first shard, so bad shards fail here; so does a rank that gets no batch.
    """
    with fail_together(ctx):
        train_urls = expand_urls(args.shards, args.storage_options)
        train_data = Pipeline(train_urls, train=True, **loader_args)
        val_urls = [] if args.no_val else find_val_shards(train_urls, args.val_shards, args.storage_options)
        val_data = open_validation_shards(val_urls, loader_args)
        check_shared_memory(train_data, val_data, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        check_memory(UNetConfig(width=args.width), args.image_size, args.batch_size, ctx.device, training=True,
                     amp_dtype=amp_dtype, options=f"--image-size {args.image_size} with --batch-size {args.batch_size}")
    return train_urls, train_data, val_urls, val_data
