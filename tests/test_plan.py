"""The epoch plan: pure arithmetic, so every split is checked exhaustively on small cases."""

import pytest

from pipeline.plan import batches_to_skip, plan_epoch, split_evenly

CASES = [
    ([10], 2, 2, 3),                # one shard for 2 ranks x 2 workers
    ([7, 13, 1, 20], 2, 2, 4),      # unequal shards
    ([5, 5, 5], 3, 1, 2),
    ([100], 4, 3, 7),
    ([3, 3], 1, 4, 2),              # more workers than batches in some modes
]


def _samples(slot):
    return [(shard, i) for shard, start, stop in slot.ranges for i in range(start, stop)]


@pytest.mark.parametrize("sizes,world,workers,batch", CASES)
@pytest.mark.parametrize("train", [True, False])
def test_every_sample_at_most_once_and_ranks_balanced(sizes, world, workers, batch, train):
    plan = plan_epoch(sizes, world_size=world, workers=workers, batch_size=batch, train=train, seed=3)
    seen = [s for rank in plan.slots for slot in rank for s in _samples(slot)]
    assert len(seen) == len(set(seen)) == sum(sizes)  # pieces tile the epoch exactly
    for rank_slots in plan.slots:
        assert sum(len(slot.batch_sizes) for slot in rank_slots) == plan.batches_per_rank
        for slot in rank_slots:
            assert slot.num_samples == len(_samples(slot))
            if train:
                assert all(size == batch for size in slot.batch_sizes)
                assert slot.num_samples >= batch * len(slot.batch_sizes)
            else:
                assert sum(slot.batch_sizes) == slot.num_samples
                assert all(size <= batch for size in slot.batch_sizes)
    rank_samples = [sum(s.num_samples for s in rank) for rank in plan.slots]
    assert max(rank_samples) - min(rank_samples) <= 1
    if train:
        assert plan.batches_per_rank == min(rank_samples) // batch
    else:
        assert plan.batches_per_rank == -(-max(rank_samples) // batch)


def test_worker_batch_counts_follow_round_robin():
    plan = plan_epoch([58], world_size=1, workers=3, batch_size=4, train=True)
    counts = [len(slot.batch_sizes) for slot in plan.slots[0]]
    assert counts == split_evenly(14, 3) == [5, 5, 4]  # worker w makes batches w, w+3, ...
    assert [slot.num_samples for slot in plan.slots[0]] == [21, 21, 16]  # 2 spares, shared


def test_train_shard_order_depends_on_seed_and_epoch_only():
    def order(**kw):
        plan = plan_epoch([5] * 8, world_size=1, workers=1, batch_size=5, train=True, **kw)
        return [shard for shard, _, _ in plan.slots[0][0].ranges]

    assert order(seed=1, epoch=0) == order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)
    assert sorted(order(seed=1, epoch=1)) == list(range(8))
    eval_plan = plan_epoch([5] * 8, world_size=1, workers=1, batch_size=5, train=False, seed=1)
    assert [s for s, _, _ in eval_plan.slots[0][0].ranges] == list(range(8))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_batches_to_skip_matches_round_robin_positions(workers):
    for start in range(10):
        for worker in range(workers):
            before_start = [i for i in range(start) if i * workers + worker < start]
            assert batches_to_skip(start, worker, workers) == len(before_start)
