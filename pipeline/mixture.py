"""Weighted mixtures: several sources of shards in one epoch, each taking its weight's share.

`urls` may be a list of (urls, weight) sources. An epoch takes n_i samples from source i: the
epoch's size (the sources' total, or samples_per_epoch) split by weight, largest remainder
first. A source smaller than its share is read whole as many times as it fits, then a window of
it; a larger one gives a window of n_i samples. Train draws the window's start and the source's
shard order from (seed, epoch, source), so every epoch takes another subset; eval reads the
shards as given, from their first sample. The sources are interleaved in blocks of about BLOCK
samples, each holding every source's share of it, so every rank and worker sees the mixture
rather than one source after another. The result is the epoch's (shard, start, stop) runs in
reading order, which the plan splits like a plain epoch's (plan.plan_runs): equal batches per
rank, bytes read ~ bytes used and elastic resume hold for a mixture as they do without one.
A window or a block boundary inside a shard is a range of it: with an index only its bytes
are read, without one the shard streams from its first byte each time.
"""

import itertools
import math
import numbers
import random
from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.plan import ranges_between, samples_in, split_evenly, split_proportionally
from pipeline.sources import expand_urls

BLOCK = 256  # samples per interleaving block: short next to a worker's share, long next to one read


def _is_source(item) -> bool:
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], numbers.Real) \
        and not isinstance(item[1], bool)


@dataclass(frozen=True)
class Mixture:
    """Sources as [first, end) spans of a loader's shard list, their weights, the epoch size
    (None: the sources' total) and their patterns (for messages)."""

    spans: tuple[tuple[int, int], ...]
    weights: tuple[float, ...]
    samples_per_epoch: int | None
    patterns: tuple[str, ...]

    def counts(self, sizes) -> list[int]:
        """Samples each source gives an epoch."""
        totals = [sum(sizes[first:end]) for first, end in self.spans]
        epoch = sum(totals) if self.samples_per_epoch is None else self.samples_per_epoch
        counts = split_proportionally(epoch, list(self.weights))
        for pattern, total, count in zip(self.patterns, totals, counts):
            if count and not total:
                raise PipelineError(f"mixture source {pattern!r} has no samples for its share of {count}")
        return counts

    def identity(self, sizes) -> dict:
        return {"weights": list(self.weights), "sources": [end - first for first, end in self.spans],
                "samples_per_epoch": sum(self.counts(sizes))}

    def runs(self, sizes, *, train: bool, seed: int, epoch: int) -> tuple:
        """The epoch's runs: each source's share, interleaved block by block (module docstring)."""
        chosen = [self._source_runs(i, sizes, count, train=train, seed=seed, epoch=epoch)
                  for i, count in enumerate(self.counts(sizes))]
        counts = [samples_in(runs) for runs in chosen]
        blocks = max(1, math.ceil(sum(counts) / BLOCK))
        starts = [[0, *itertools.accumulate(stop - start for _, start, stop in runs)][:-1] for runs in chosen]
        pieces = [split_evenly(count, blocks) for count in counts]
        at, out = [0] * len(chosen), []
        for block in range(blocks):
            for i, runs in enumerate(chosen):
                out.extend(ranges_between(runs, starts[i], at[i], at[i] + pieces[i][block]))
                at[i] += pieces[i][block]
        return tuple(out)

    def _source_runs(self, i: int, sizes, count: int, *, train: bool, seed: int, epoch: int) -> list:
        first, end = self.spans[i]
        if not count:
            return []
        order = list(range(first, end))
        rng = random.Random(f"mix/{seed}/{epoch}/{i}")
        if train:
            rng.shuffle(order)
        whole = [(shard, 0, sizes[shard]) for shard in order if sizes[shard]]
        total = sum(sizes[first:end])
        repeats, part = divmod(count, total)
        offset = rng.randrange(total) if train else 0
        starts = [0, *itertools.accumulate(stop for _, _, stop in whole)][:-1]
        window = [*ranges_between(whole, starts, offset, min(total, offset + part)),
                  *ranges_between(whole, starts, 0, max(0, offset + part - total))]
        return whole * repeats + window


def resolve(urls, storage_options, samples_per_epoch: int | None) -> tuple[list[str], Mixture | None]:
    """The shard URLs of `urls` and, for a list of (urls, weight) sources (or any urls with
    samples_per_epoch), their Mixture; None for plain urls."""
    items = list(urls) if isinstance(urls, (list, tuple)) and not isinstance(urls, str) else None
    sources = items if items and all(_is_source(item) for item in items) else None
    if sources is None and items and any(_is_source(item) for item in items):
        raise PipelineError(f"a mixture is a list of (urls, weight) pairs, and only that: {urls!r}")
    if sources is None:
        if samples_per_epoch is None:
            return expand_urls(urls, storage_options), None
        sources = [(urls, 1.0)]
    expanded, spans = [], []
    for pattern, weight in sources:
        if not (math.isfinite(weight) and weight >= 0):
            raise PipelineError(f"mixture source {pattern!r}: weight must be a finite number >= 0, got {weight}")
        found = expand_urls(pattern, storage_options)
        spans.append((len(expanded), len(expanded) + len(found)))
        expanded.extend(found)
    weights = tuple(float(weight) for _, weight in sources)
    if not sum(weights):
        raise PipelineError(f"mixture weights {list(weights)} add up to 0")
    return expanded, Mixture(tuple(spans), weights, samples_per_epoch, tuple(str(p) for p, _ in sources))
