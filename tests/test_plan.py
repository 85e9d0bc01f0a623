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


def _samples(share):
    return [(shard, i) for shard, start, stop in share.ranges for i in range(start, stop)]


@pytest.mark.parametrize("sizes,world,workers,batch", CASES)
@pytest.mark.parametrize("train", [True, False])
def test_every_sample_at_most_once_and_ranks_balanced(sizes, world, workers, batch, train):
    plan = plan_epoch(sizes, world_size=world, workers=workers, batch_size=batch, train=train, seed=3)
    seen = [s for rank in plan.shares for share in rank for s in _samples(share)]
    assert len(seen) == len(set(seen)) == sum(sizes)  # pieces tile the epoch exactly
    for rank_shares in plan.shares:
        assert sum(len(share.batch_sizes) for share in rank_shares) == plan.batches_per_rank
        for share in rank_shares:
            assert share.num_samples == len(_samples(share))
            if train:
                assert all(size == batch for size in share.batch_sizes)
                assert share.num_samples >= batch * len(share.batch_sizes)
            else:
                assert sum(share.batch_sizes) == share.num_samples
                assert all(size <= batch for size in share.batch_sizes)
    rank_samples = [sum(s.num_samples for s in rank) for rank in plan.shares]
    assert max(rank_samples) - min(rank_samples) <= 1
    if train:
        assert plan.batches_per_rank == min(rank_samples) // batch
    else:
        assert plan.batches_per_rank == -(-max(rank_samples) // batch)


def test_worker_batch_counts_follow_round_robin():
    plan = plan_epoch([58], world_size=1, workers=3, batch_size=4, train=True)
    counts = [len(share.batch_sizes) for share in plan.shares[0]]
    assert counts == split_evenly(14, 3) == [5, 5, 4]  # worker w makes batches w, w+3, ...
    assert [share.num_samples for share in plan.shares[0]] == [21, 21, 16]  # 2 spares, shared


def test_train_shard_order_depends_on_seed_and_epoch_only():
    def order(**kw):
        plan = plan_epoch([5] * 8, world_size=1, workers=1, batch_size=5, train=True, **kw)
        return [shard for shard, _, _ in plan.shares[0][0].ranges]

    assert order(seed=1, epoch=0) == order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)
    assert sorted(order(seed=1, epoch=1)) == list(range(8))
    eval_plan = plan_epoch([5] * 8, world_size=1, workers=1, batch_size=5, train=False, seed=1)
    assert [s for s, _, _ in eval_plan.shares[0][0].ranges] == list(range(8))


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_batches_to_skip_matches_round_robin_positions(workers):
    for start in range(10):
        for worker in range(workers):
            before_start = [i for i in range(start) if i * workers + worker < start]
            assert batches_to_skip(start, worker, workers) == len(before_start)
