"""Process-group setup for torchrun (NCCL on CUDA, gloo on the CPU) and small collectives.

The few numbers the ranks agree on as they go (a stop flag every step, log sums, skip counts)
are host numbers and travel over gloo, also on GPUs: an NCCL all-reduce of them would make
the host wait for the GPU to finish the step's queued work before it could read the answer,
once per step. The per-step one (the stop vote) is moreover agreed a step late (all_max_a_step_late),
so that no rank waits for the others at every step.
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import UserError
from .options import uses_cuda

_host_group = None  # the gloo group of all ranks for host numbers (None: the default group is gloo)
_vote = None  # (work, tensor) of the all-reduce all_max_a_step_late started last, not waited for yet


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_choice: str) -> Context:
    """Pick the device (a CPU run hides the GPUs from itself and its workers) and, when started by
    torchrun (WORLD_SIZE > 1), join the process group; then tune the process for the device
    (configure_process)."""
    use_cuda = uses_cuda(device_choice)
    if not use_cuda:
        # Hidden before anything asks the driver: torch itself starts CUDA in a CPU run on a GPU
        # machine (each optimizer step asks for the current CUDA stream, to check for graph capture).
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        ctx = Context(0, 1, torch.device("cuda" if use_cuda else "cpu"))
    else:
        local_rank = int(os.environ["LOCAL_RANK"])
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        join_group(device)
        ctx = Context(dist.get_rank(), dist.get_world_size(), device)
    configure_process(ctx.device)
    return ctx


def join_group(device: torch.device) -> None:
    """Join the process group torchrun's variables describe: NCCL with a gloo group beside it for
    the host numbers on a GPU, gloo alone on the CPU. (setup calls it for WORLD_SIZE > 1 only;
    bench/gpu.py builds a 1-GPU group with it.)"""
    global _host_group
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
        _host_group = dist.new_group(backend="gloo")
    else:
        dist.init_process_group("gloo")


def configure_process(device: torch.device) -> None:
    """On CUDA: cuDNN picks the fastest convolution algorithms for the run's shapes (fixed: one
    image size, full batches but for a rare shrunken one and validation's last, each timed once),
    and, unless OMP_NUM_THREADS says otherwise, this process keeps one OpenMP thread, as under
    torchrun: the GPU does the arithmetic, and the cores are for the loader's decode workers,
    which all cores of spinning OpenMP threads would compete with. On the CPU the model's
    arithmetic is this process's, so it keeps torch's default (one thread per core); the workers
    need little there, the step being far slower than decoding its batch."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def teardown() -> None:
    global _host_group
    if dist.is_initialized():
        finish_vote()
        dist.destroy_process_group()
    _host_group = None


def _all_reduce(values: list[float], op) -> list[float]:
    if not dist.is_initialized():
        return [float(value) for value in values]
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=op, group=_host_group)
    return tensor.tolist()


def all_sum(values: list[float]) -> list[float]:
    """Sum a few host numbers over all ranks (identity without a process group)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_max(values: list[float]) -> list[float]:
    """The largest of each of a few host numbers over all ranks (identity without a process group)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def all_max_a_step_late(values: list[float]) -> list[float]:
    """all_max of the `values` this rank passed at its previous call (zeros at its first), while
    this call's all-reduce goes on in the background until the next call waits for it.

    A blocking all-reduce is a host barrier: every rank waits for the slowest one, and across
    nodes for O(ranks) TCP latency, once per step. This one overlaps a whole step, so a rank
    waits only for a peer that is more than a step behind. Every rank calls it once per step
    (the same number of calls, in the same order among the other collectives), so every rank
    gets the same answer at the same call: they still act on a vote together, a step after it
    was cast. Without a process group there is nothing to agree on: `values` come back at once.
    """
    global _vote
    if not dist.is_initialized():
        return [float(value) for value in values]
    agreed = [0.0] * len(values)
    if _vote is not None:
        work, tensor = _vote
        work.wait()
        agreed = tensor.tolist()
    tensor = torch.tensor(values, dtype=torch.float64)
    _vote = (dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_host_group, async_op=True), tensor)
    return agreed


def finish_vote() -> None:
    """Wait for the all-reduce all_max_a_step_late left in flight (every rank started it at the
    same call, so it completes); the next call starts afresh, as the first one did."""
    global _vote
    if _vote is not None:
        _vote[0].wait()
    _vote = None


@contextlib.contextmanager
def fail_together(ctx: Context):
    """Run a block of start-up checks on every rank; if it raises on any rank, raise on all.

    Otherwise a rank that fails a check exits while the others wait for it in their next
    collective until torchrun kills them. The ranks that did not fail themselves raise a
    UserError naming one that did (its own message says why).
    """
    error = None
    try:
        yield
    except Exception as raised:
        error = raised
    failed = int(all_max([ctx.rank + 1 if error is not None else 0])[0]) - 1
    if error is not None:
        raise error
    if failed >= 0:
        raise UserError(f"rank {failed} failed a start-up check (its own error line says which)")
