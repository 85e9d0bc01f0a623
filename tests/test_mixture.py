"""Weighted mixtures of shard sources: composition per epoch, determinism, bytes fetched over
HTTP, and elastic resume of a mixture (ranks simulated through make_loader's rank/world_size)."""

import collections
import json
import re

import pytest
import torch

import convert_zips
import counting
import train
from helpers import TINY, format_options
from pipeline import PipelineError, make_loader, schema
from seedzips import synthetic

SIZE = 32


@pytest.fixture(scope="module")
def six_shards(tmp_path_factory, shard_format):
    """360 flawless samples in batch-1..6.tar (60 each, with indexes and manifest), in each format."""
    root = tmp_path_factory.mktemp("mixture")
    synthetic.generate(root / "seed", zips=3, bgs_per_zip=2, fg=6, placements=10, seed=0, image_size=SIZE)
    convert_zips.convert(root / "seed", root / "shards", shards=6, val_fraction=0, seed=0, workers=1, progress=False,
                         **format_options(shard_format))
    return root / "shards"


def _indexes(folder) -> dict[str, schema.ShardIndex]:
    return {f"batch-{n}.tar": schema.decode_index((folder / f"batch-{n}.tar.idx").read_bytes()) for n in range(1, 7)}


def _sources(base) -> list:
    """0.25 of a 240-sample source (batch-1..4) and 0.75 of a 120-sample one (batch-5..6)."""
    return [(f"{base}/batch-{{1..4}}.tar", 0.25), (f"{base}/batch-{{5..6}}.tar", 0.75)]


def _epoch(urls, world, workers, batch_size, **options) -> tuple[list[list[str]], list[int]]:
    """Every simulated rank's batches' keys, and each rank's len(loader)."""
    batches, lengths = [], []
    for rank in range(world):
        loader = make_loader(urls, batch_size=batch_size, workers=workers, image_size=SIZE, rank=rank,
                             world_size=world, **options)
        lengths.append(len(loader))
        batches.extend(list(batch["key"]) for batch in loader)
    return batches, lengths


def _flat(batches) -> list[str]:
    return [key for keys in batches for key in keys]


def test_each_epoch_takes_each_sources_share_interleaved_and_deterministic(six_shards):
    indexes = _indexes(six_shards)
    first = {key for n in (1, 2, 3, 4) for key in indexes[f"batch-{n}.tar"].keys}
    epochs = []
    for epoch in (0, 1, 0):
        batches, lengths = _epoch(_sources(six_shards), 2, 2, 4, epoch=epoch)
        assert lengths == [45, 45] and {len(keys) for keys in batches} == {4}  # 360 samples, none dropped
        keys = _flat(batches)
        counts = collections.Counter(keys)
        assert sum(key in first for key in keys) == 90 and len(keys) - 90 == 270  # 0.25 and 0.75 of 360
        assert {counts[key] for key in counts if key in first} == {1}  # a subset of the larger source
        assert {counts[key] for key in counts if key not in first} == {2, 3}  # 2.25 rounds of the smaller
        assert len({key for key in counts if key not in first}) == 120
        halves = [_flat(batches[:45]), _flat(batches[45:])]  # each rank sees both sources in proportion
        assert [sum(key in first for key in half) for half in halves] == [45, 45]
        epochs.append(batches)
    assert epochs[0] == epochs[2]  # same arguments, same batches
    assert {k for k in _flat(epochs[0]) if k in first} != {k for k in _flat(epochs[1]) if k in first}


def test_composition_is_exact_to_the_largest_remainder_rounding(six_shards):
    batches, lengths = _epoch(_sources(six_shards), 2, 2, 4, train=False, samples_per_epoch=301)
    first = {key for n in (1, 2, 3, 4) for key in _indexes(six_shards)[f"batch-{n}.tar"].keys}
    keys = _flat(batches)
    assert len(keys) == 301 and sum(key in first for key in keys) == 75  # 75.25 -> 75, 225.75 -> 226
    assert len(set(lengths)) == 1


def test_a_mixture_over_http_at_4_ranks_x_2_workers_fetches_about_the_bytes_of_its_samples(six_shards):
    indexes = _indexes(six_shards)
    sample_bytes = {}
    for name, index in indexes.items():
        for n, key in enumerate(index.keys):
            sample_bytes[key] = index.offsets[n + 1] - index.offsets[n]
    with counting.http_server(six_shards) as server:
        batches, lengths = _epoch(_sources(server.url), 4, 2, 3)
        fetched = server.bytes_sent(".tar")
    used = sum(sample_bytes[key] for key in _flat(batches))
    assert lengths == [30] * 4 and len(_flat(batches)) == 360  # 90 a rank in batches of 3: nothing dropped
    assert used <= fetched <= 1.1 * used, (fetched, used)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_a_mixture_stopped_on_4_ranks_continues_on_one_with_exactly_its_rest(six_shards, train):
    urls = _sources(six_shards)
    whole = collections.Counter(_flat(_epoch(urls, 1, 1, 5, train=train)[0]))
    before, states = [], []
    for rank in range(4):
        loader = make_loader(urls, batch_size=4, workers=2, image_size=SIZE, train=train, rank=rank, world_size=4)
        batches = iter(loader)
        before.extend(key for _, batch in zip(range(5), batches) for key in batch["key"])
        states.append(loader.state_dict())
        batches.close()
    assert states[0]["mixture"] == {"weights": [0.25, 0.75], "sources": [4, 2], "samples_per_epoch": 360}
    after, _ = _epoch(urls, 1, 1, 5, train=train, state=states[0])
    both = collections.Counter(before + _flat(after))
    if train:  # no sample more often than the epoch holds it; at most one batch short beyond
        assert not both - whole
        assert sum(whole.values()) - sum(both.values()) <= 5
    else:
        assert both == whole


def test_a_state_of_a_plain_loader_or_bad_weights_are_one_line(six_shards):
    plain = make_loader(f"{six_shards}/batch-{{1..6}}.tar", batch_size=4, workers=0, image_size=SIZE)
    with pytest.raises(PipelineError, match="^the loader state is of another epoch plan: mixture None, "):
        make_loader(_sources(six_shards), batch_size=4, workers=0, state=plain.state_dict())
    with pytest.raises(PipelineError, match="weight must be a finite number >= 0, got -1"):
        make_loader([(f"{six_shards}/batch-1.tar", -1), (f"{six_shards}/batch-2.tar", 1)], batch_size=4, workers=0)
    with pytest.raises(PipelineError, match="only that"):
        make_loader([(f"{six_shards}/batch-1.tar", 1), f"{six_shards}/batch-2.tar"], batch_size=4, workers=0)


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """Folders a/ and b/, each a converted dataset with its own val-1.tar."""
    root = tmp_path_factory.mktemp("two")
    for name, seed in (("a", 0), ("b", 1)):
        synthetic.generate(root / f"seed-{name}", zips=2, bgs_per_zip=2, fg=3, placements=2, seed=seed, image_size=SIZE)
        convert_zips.convert(root / f"seed-{name}", root / name, shards=2, val_fraction=0.25, seed=seed, workers=1,
                             progress=False)
    return root


def test_train_py_mixes_sources_by_weight_and_scores_each_validation_source(two_datasets, tmp_path, capsys):
    out = tmp_path / "run"
    sources = ["--shards", f"{two_datasets}/a/batch-{{1..2}}.tar", "--shards", f"{two_datasets}/b/batch-{{1..2}}.tar"]
    assert train.main([*sources, "--weights", "0.7,0.3", "--out", str(out), *TINY, "--steps", "2",
                       "--val-every", "2"]) == 0
    printed = capsys.readouterr().out
    (val,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in line]
    assert val["samples"] == val["a/samples"] + val["b/samples"] == 12  # each val-1.tar: 6 samples
    assert {"iou", "a/iou", "b/iou", "a/rmse", "b/rmse"} <= val.keys()
    assert re.search(r"val @ step 2: loss \S+, .*; a: loss \S+, .*; b: loss ", printed), printed
    assert train.main([*sources, "--weights", "1", "--out", str(tmp_path / "bad"), *TINY]) == 2
    assert "train.py: error: --weights: 1 weights for 2 --shards sources" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_formats(tmp_path_factory):
    """Folders compact/ and self-contained/: one 24-sample dataset converted in each format."""
    root = tmp_path_factory.mktemp("formats")
    synthetic.generate(root / "seed", zips=2, bgs_per_zip=2, fg=3, placements=2, seed=5, image_size=SIZE)
    for name in schema.FORMATS:
        convert_zips.convert(root / "seed", root / name, shards=2, val_fraction=0, seed=0, workers=1, progress=False,
                             **format_options(name))
    return root


def test_a_mixture_of_a_compact_and_a_self_contained_set_reads_both_alike(two_formats):
    sources = [(f"{two_formats}/{name}/batch-{{1..2}}.tar", 1.0) for name in schema.FORMATS]
    loader = make_loader(sources, batch_size=4, workers=2, image_size=SIZE, train=False, samples_per_epoch=48)
    images = {}
    for batch in loader:
        for n, key in enumerate(batch["key"]):
            images.setdefault(key, []).append({name: batch[name][n].clone() for name in ("bg", "bgfg", "mask")})
    assert loader.stats["skipped"] == 0 and len(images) == 24
    # Every sample once from each set, the compact one's background taken from its backgrounds.tar.
    for key, (first, second) in images.items():
        assert all(torch.equal(first[name], second[name]) for name in first), key
