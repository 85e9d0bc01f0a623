"""The loader state: where an epoch stands, and the rest of it on any topology.

A state names what the epoch's plan is made of (pipeline.plan: the shards' names and sample
counts, seed, epoch, train) and its segments: each topology the epoch has run on so far (ranks,
workers, batch size, shuffle buffer) with the batches every rank took on it (all ranks take the
same number, so one rank's state is everyone's). Plans are pure functions of these, so replaying
them tells which samples were consumed without reading a byte: an eval batch takes its share's
next samples in order, a train batch the next outputs of the share's shuffle buffer, which is
seeded. What is left, as (shard, start, stop) runs in epoch order, is planned for the new
topology as a whole epoch is (plan.plan_runs): eval gives each of those samples once, train
drops at most the new topology's last partial batches.

On the topology the state was taken on, the state is a start batch: the same batches as
`start_batch=n`. A train sample that stood in for a damaged one before the state was taken is
not known to the replay, so it may come once more in the continued part.
"""

import functools
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass

from pipeline.errors import PipelineError
from pipeline.plan import EpochPlan, batches_to_skip, buffer_rng, plan_runs, ranges_between, shuffled

FORMAT = "pipeline-loader-state/1"


@dataclass(frozen=True, kw_only=True)
class Segment:
    """One topology an epoch ran on, and the batches each rank took there."""

    world_size: int
    workers: int  # processes making batches (LoaderOptions.processes)
    batch_size: int
    shuffle_buffer: int
    batches: int = 0

    def same_topology(self, other: "Segment") -> bool:
        return asdict(self) | {"batches": 0} == asdict(other) | {"batches": 0}


@dataclass(frozen=True, kw_only=True)
class Resume:
    """Where a pass given a state starts: its epoch, the segments before its own (empty: the
    epoch's own plan, resumed at start_batch), and its first batch."""

    epoch: int
    prior: tuple[Segment, ...]
    start_batch: int


def identity(names: list[str], sizes: list[int], options, *, mixture: dict | None) -> dict:
    """What a state must match besides the epoch: the shards (by name and sample count: the
    storage they are read from may change), train or eval and the seed (LoaderOptions), and the
    mixture (its weights, sources and epoch size; None: not a mixture)."""
    listing = json.dumps([[name, size] for name, size in zip(names, sizes)]).encode()
    return {"train": options.train, "seed": options.seed, "mixture": mixture,
            "shards": {"count": len(names), "samples": sum(sizes),
                       "fingerprint": hashlib.sha256(listing).hexdigest()[:16]}}


def _compact(value) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, dict) else repr(value)


def resume(state: dict | None, ident: dict, mine: Segment, *, epoch: int | None, start_batch: int) -> Resume:
    """Where a pass asked for `epoch` (None: 0, or the state's) from `start_batch`, or for the
    rest of `state`'s epoch, starts; `state` is checked against this loader's identity (a
    one-line PipelineError naming what differs)."""
    if state is None:
        return Resume(epoch=epoch or 0, prior=(), start_batch=start_batch)
    if start_batch:
        raise PipelineError(f"start_batch {start_batch} given with a loader state: the state says where to start")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise PipelineError(f"not a loader state (format {FORMAT!r} expected): {str(state)[:80]}")
    theirs = {key: state.get(key) for key in ident}
    if theirs != ident:
        differs = "; ".join(f"{key} {_compact(theirs[key])}, this loader's {_compact(ident[key])}"
                            for key in ident if theirs[key] != ident[key])
        raise PipelineError(f"the loader state is of another epoch plan: {differs}")
    try:
        segments = tuple(Segment(**segment) for segment in state["segments"])
        state_epoch = int(state["epoch"])
    except (KeyError, TypeError) as error:
        raise PipelineError(f"a damaged loader state ({type(error).__name__}: {error})") from None
    if not segments:
        raise PipelineError("a damaged loader state: no segments")
    if epoch not in (None, state_epoch):
        raise PipelineError(f"epoch {epoch} asked for with a loader state of epoch {state_epoch}")
    *prior, last = segments
    if last.same_topology(mine):
        return Resume(epoch=state_epoch, prior=tuple(prior), start_batch=last.batches)
    return Resume(epoch=state_epoch, prior=segments, start_batch=0)


def plan_segment(runs: tuple, segment: Segment, *, train: bool) -> EpochPlan:
    return plan_runs(list(runs), world_size=segment.world_size, workers=segment.workers,
                     batch_size=segment.batch_size, train=train)


def _taken(plan: EpochPlan, segment: Segment, rank: int, worker: int) -> int:
    """How many samples of its share a (rank, worker) had consumed after `segment.batches`."""
    share = plan.shares[rank][worker]
    return sum(share.batch_sizes[:batches_to_skip(segment.batches, worker, segment.workers)])


def consumed(plan: EpochPlan, segment: Segment) -> int:
    """Samples the ranks consumed in `segment.batches` batches of `plan` (none of them bad)."""
    return sum(_taken(plan, segment, rank, worker) for rank in range(segment.world_size)
               for worker in range(segment.workers))


def _left_of_share(share, taken: int, rng, shuffle_buffer: int, train: bool) -> list:
    """The runs of a share's samples not among its first `taken` (train: in shuffle-buffer order)."""
    starts = [0, *itertools.accumulate(stop - start for _, start, stop in share.ranges)][:-1]
    if not train:
        return list(ranges_between(share.ranges, starts, taken, share.num_samples))
    # The buffer's first `taken` outputs come from its first taken + shuffle_buffer inputs.
    bound = min(share.num_samples, taken + shuffle_buffer)
    gone = set(itertools.islice(shuffled(range(bound), shuffle_buffer, rng), taken)) if taken else set()
    runs, begin = [], None
    for position in range(bound + 1):
        if position < bound and position not in gone:
            begin = position if begin is None else begin
        elif begin is not None:
            runs.extend(ranges_between(share.ranges, starts, begin, position))
            begin = None
    return runs + list(ranges_between(share.ranges, starts, bound, share.num_samples))


def _merged(runs) -> tuple:
    """Adjacent runs of one shard joined (fewer, longer reads; the same positions)."""
    out = []
    for shard, start, stop in runs:
        if out and out[-1][0] == shard and out[-1][2] == start:
            out[-1] = (shard, out[-1][1], stop)
        elif start < stop:
            out.append((shard, start, stop))
    return tuple(out)


@functools.lru_cache(maxsize=8)
def remaining(runs: tuple, prior: tuple[Segment, ...], *, train: bool, seed: int, epoch: int) -> tuple:
    """The runs left of an epoch of `runs` after the `prior` segments, in epoch order."""
    for segment in prior:
        plan = plan_segment(runs, segment, train=train)
        if not 0 <= segment.batches <= plan.batches_per_rank:
            raise PipelineError(f"a damaged loader state: {segment.batches} batches taken of a plan of "
                                f"{plan.batches_per_rank} on {segment.world_size} ranks")
        if segment.batches == plan.batches_per_rank:
            return ()  # that part ran to its end: the epoch is over
        left = []
        for rank, shares in enumerate(plan.shares):
            for worker, share in enumerate(shares):
                rng = buffer_rng(seed, epoch, rank, worker)
                left.extend(_left_of_share(share, _taken(plan, segment, rank, worker), rng,
                                           segment.shuffle_buffer, train))
        runs = _merged(left)
    return runs


def state_dict(ident: dict, *, epoch: int, segments: list[Segment], samples_done: int, epoch_samples: int) -> dict:
    """A JSON-serialisable state (samples_done and epoch_samples inform; resume recomputes them)."""
    return {"format": FORMAT, **ident, "epoch": epoch, "segments": [asdict(s) for s in segments],
            "samples_done": samples_done, "epoch_samples": epoch_samples}
