"""Who reads what in one epoch: a pure function of shard sizes, ranks, workers and seeds.

The epoch's samples are the shards concatenated (train: in an order shuffled by seed and
epoch; eval: as given), cut into `world_size` contiguous near-equal rank chunks and each of
those into `workers` contiguous pieces. A piece may start or end inside a shard, so a single
shard can feed any number of ranks and workers, and each shard is read by few shares.
An epoch continued on another topology (pipeline.elastic) is planned the same way over the
runs of samples it has left (plan_runs), in their epoch order.

Batch counts are fixed here, before any data is read, so every rank runs the same number of
steps whatever the data turns out to hold (DDP hangs otherwise). A worker's i-th batch is
the rank's batch number ``i * workers + w``: the order torch's DataLoader delivers them in.
"""

import bisect
import itertools
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Share:
    """One (rank, worker)'s part of the epoch: sample ranges ``(shard index, start, stop)`` and batches.

    In train mode ``batch_sizes`` are the targets (all equal to the batch size) and the
    ranges hold spare samples beyond them; in eval mode they are exact and add up to the
    ranges' sample count.
    """

    ranges: tuple[tuple[int, int, int], ...]
    batch_sizes: tuple[int, ...]
    num_samples: int


@dataclass(frozen=True)
class EpochPlan:
    shares: tuple[tuple[Share, ...], ...]  # [rank][worker]
    batches_per_rank: int
    samples_per_rank: tuple[int, ...]  # samples delivered per rank if none is corrupt


def shard_order(count: int, *, train: bool, seed: int, epoch: int) -> list[int]:
    """Shard indices in reading order: shuffled by (seed, epoch) in train, as given in eval."""
    order = list(range(count))
    if train:
        random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


def buffer_rng(seed: int, epoch: int, rank: int, worker: int) -> random.Random:
    """The generator of a (rank, worker)'s shuffle buffer in a train epoch."""
    return random.Random(f"buffer/{seed}/{epoch}/{rank}/{worker}")


def shuffled(samples, size: int, rng: random.Random):
    """A shuffle buffer: holds up to `size` samples and emits a random one per arrival."""
    held = []
    for sample in samples:
        if len(held) < size:
            held.append(sample)
            continue
        i = rng.randrange(size)
        yield held[i]
        held[i] = sample
    rng.shuffle(held)
    yield from held


def split_evenly(total: int, parts: int) -> list[int]:
    """`parts` sizes that add up to `total` and differ by at most one, larger first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def split_proportionally(total: int, weights: list[int]) -> list[int]:
    """Sizes adding up to `total`, proportional to `weights` (largest remainder method)."""
    weight_sum = sum(weights)
    if weight_sum == 0:
        return split_evenly(total, len(weights))
    exact = [total * w / weight_sum for w in weights]
    sizes = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (sizes[i] - exact[i], i))
    for i in by_remainder[: total - sum(sizes)]:
        sizes[i] += 1
    return sizes


def ranges_between(runs: list, starts: list[int], begin: int, end: int) -> tuple:
    """The (shard, start, stop) ranges covering positions [begin, end) of `runs` ((shard,
    start, stop) in reading order, the first beginning at position starts[i])."""
    ranges = []
    for i in range(max(0, bisect.bisect_right(starts, begin) - 1), len(runs)):
        shard, first, last = runs[i]
        if starts[i] >= end:
            break
        lo, hi = max(begin, starts[i]), min(end, starts[i] + last - first)
        if lo < hi:
            ranges.append((shard, first + lo - starts[i], first + hi - starts[i]))
    return tuple(ranges)


def plan_epoch(sizes: list[int], *, world_size: int, workers: int, batch_size: int,
               train: bool, seed: int = 0, epoch: int = 0) -> EpochPlan:
    """Split one epoch over `world_size` ranks x `workers` workers (see the module docstring).

    Train drops the last incomplete batch of every rank: K = floor(min rank samples /
    batch_size) batches per rank, no sample twice. Eval delivers every sample once: K =
    ceil(max rank samples / batch_size) batches per rank, each of near-equal size.
    """
    return plan_runs(list(epoch_runs(sizes, train=train, seed=seed, epoch=epoch)), world_size=world_size,
                     workers=workers, batch_size=batch_size, train=train)


def samples_in(runs) -> int:
    """The samples in (shard, start, stop) runs."""
    return sum(stop - start for _, start, stop in runs)


def epoch_runs(sizes: list[int], *, train: bool, seed: int, epoch: int) -> tuple:
    """An epoch's samples as (shard, start, stop) runs in reading order: whole shards."""
    return tuple((shard, 0, sizes[shard]) for shard in shard_order(len(sizes), train=train, seed=seed, epoch=epoch))


def plan_runs(runs: list, *, world_size: int, workers: int, batch_size: int, train: bool) -> EpochPlan:
    """plan_epoch's split of the samples of `runs`, (shard, start, stop) in reading order."""
    assert world_size >= 1 and workers >= 1 and batch_size >= 1, (world_size, workers, batch_size)
    starts = [0, *itertools.accumulate(stop - start for _, start, stop in runs)]
    rank_samples = split_evenly(starts.pop(), world_size)
    if train:
        batches = min(rank_samples) // batch_size
    else:
        batches = -(-max(rank_samples) // batch_size)
    worker_batches = split_evenly(batches, workers)
    shares, rank_begin = [], 0
    for samples in rank_samples:
        if train:
            spare = samples - batches * batch_size
            pieces = [k * batch_size + extra for k, extra in
                      zip(worker_batches, split_proportionally(spare, worker_batches))]
            batch_lists = [(batch_size,) * k for k in worker_batches]
        else:
            sizes_of_batches = split_evenly(samples, batches) if batches else []
            batch_lists, first = [], 0
            for k in worker_batches:
                batch_lists.append(tuple(sizes_of_batches[first:first + k]))
                first += k
            pieces = [sum(b) for b in batch_lists]
        rank_shares, begin = [], rank_begin
        for piece, batch_list in zip(pieces, batch_lists):
            rank_shares.append(Share(ranges=ranges_between(runs, starts, begin, begin + piece), batch_sizes=batch_list,
                                     num_samples=piece))
            begin += piece
        assert begin == rank_begin + samples, (begin, rank_begin, samples)
        shares.append(tuple(rank_shares))
        rank_begin += samples
    delivered = tuple(batches * batch_size if train else s for s in rank_samples)
    return EpochPlan(tuple(shares), batches, delivered)


def batch_index(worker_batch: int, worker: int, workers: int) -> int:
    """A worker's i-th batch's position in its rank's epoch (DataLoader's round robin)."""
    return worker_batch * workers + worker


def batches_to_skip(start_batch: int, worker: int, workers: int) -> int:
    """How many of its own batches a worker skips so the rank's stream starts at start_batch."""
    return max(0, -(-(start_batch - worker) // workers))
