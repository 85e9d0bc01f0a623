"""Damaged tar data through make_loader (train and eval, 0 and 2 workers): never an exception, every
lost sample skipped, counted and named, every other sample delivered once.

Three shards of 8 samples; the one read second is damaged at its sample 3 (or cut in its
sample 5). With the byte index only the damaged sample is lost (reading resumes at the next
sample's offset); without one the rest of the shard is (numbered, since no key is known).
The intact shards either side keep every worker's share in business.
"""

import gzip
import json
import logging
import os
import random
import shutil
import tarfile

import pytest

import convert_zips
from helpers import format_options
from pipeline import PipelineError, make_loader, schema
from pipeline.plan import shard_order
from seedzips import synthetic

SAMPLES, DAMAGED = 8, 3  # per shard; the damaged sample's number
SEED = 3


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory, shard_format):
    base = tmp_path_factory.mktemp("damage")
    synthetic.generate(base / "seed", zips=1, bgs_per_zip=3, fg=4, placements=2, seed=2, image_size=32)
    convert_zips.convert(base / "seed", base / "shards", shards=3, val_fraction=0, workers=1, progress=False,
                         **format_options(shard_format))
    manifest = json.loads((base / "shards" / schema.MANIFEST).read_text())
    assert [e["samples"] for e in manifest["shards"]] == [SAMPLES] * 3
    return base / "shards"


def _set_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


def _members(path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _per_sample(path) -> int:
    """Members per sample in a shard: 5 self-contained, 3 compact."""
    members = _members(path)
    return sum(schema.key_of(m.name) == schema.key_of(members[0].name) for m in members)


def _rewrite_header(path, member: int, change) -> None:
    """Change the header of the damaged sample's member number `member` (0: its first)."""
    _rewrite_header_at(path, _members(path)[_per_sample(path) * DAMAGED + member].offset, change)


def _rewrite_header_at(path, offset: int, change) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        block = bytearray(f.read(512))
        change(block)
        f.seek(offset)
        f.write(block)


def _garbage(block):
    block[:] = random.Random(0).randbytes(512)


def _non_octal_size(block):
    block[124:136] = b"0000009999\0\0"
    _set_checksum(block)


def _undecodable_name(block):
    block[0:4] = b"\xff\xfe\xfd\xfc"
    _set_checksum(block)


def _cut_in_sample(path, sample: int) -> None:
    member = _members(path)[sample * _per_sample(path) + 1]
    with open(path, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)


def _replace(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


# kind -> (damage(path), samples lost with the index, samples lost without it)
DAMAGE = {
    "garbage header": (lambda p: _rewrite_header(p, 1, _garbage), [DAMAGED], range(DAMAGED, SAMPLES)),
    "non-octal size": (lambda p: _rewrite_header(p, 0, _non_octal_size), [DAMAGED], range(DAMAGED, SAMPLES)),
    "undecodable name": (lambda p: _rewrite_header(p, 0, _undecodable_name), [DAMAGED],
                         range(DAMAGED, SAMPLES)),
    "gzip'd shard": (lambda p: _replace(p, gzip.compress(open(p, "rb").read(), mtime=0)),
                     range(SAMPLES), range(SAMPLES)),
    "not a tar": (lambda p: _replace(p, random.Random(1).randbytes(os.path.getsize(p))),
                  range(SAMPLES), range(SAMPLES)),
    "cut off": (lambda p: _cut_in_sample(p, 5), range(5, SAMPLES), range(5, SAMPLES)),
}


def _keys(path):
    with tarfile.open(path) as tar:
        return list(dict.fromkeys(schema.split_member(name)[0] for name in tar.getnames()))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "no-index"])
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_tar_data_is_a_counted_skip_of_exactly_the_samples_it_cost(kind, indexed, workers, clean_shards,
                                                                            tmp_path, caplog):
    names = [schema.shard_name(schema.TRAIN_PREFIX, i) for i in (1, 2, 3)]
    damage, lost_indexed, lost_streamed = DAMAGE[kind]
    lost = list(lost_indexed if indexed else lost_streamed)
    caplog.set_level(logging.WARNING, logger="pipeline.shardreader")
    unindexed = []
    for train in (False, True):
        folder = tmp_path / ("train" if train else "eval")
        shutil.copytree(clean_shards, folder)
        # The shard read second, so intact shards feed both workers' shares around it.
        victim = folder / names[shard_order(3, train=train, seed=SEED, epoch=0)[1]]
        keys = _keys(victim)
        every = {key for name in names for key in _keys(folder / name)}
        if not indexed:
            manifest = json.loads((folder / schema.MANIFEST).read_text())
            for entry in manifest["shards"]:
                os.remove(folder / entry.pop("index")["name"])
            (folder / schema.MANIFEST).write_text(json.dumps(manifest))
            unindexed += [str(folder / name) for name in names]
        damage(victim)
        loader = make_loader([str(folder / name) for name in names], batch_size=3, workers=workers, image_size=16,
                             train=train, seed=SEED)
        batches = list(loader)
        delivered = [key for batch in batches for key in batch["key"]]
        assert len(batches) == len(loader) == 8
        assert len(delivered) == len(set(delivered))  # no sample twice, train included
        assert set(delivered) == every - {keys[n] for n in lost}, (train, delivered)
        assert loader.stats["skipped"] == len(loader.skipped) == len(lost)
        assert {record["shard"] for record in loader.skipped} == {str(victim)}
        # Without an index only the sample the damage is in has a known key; the rest are numbered.
        named = {keys[n] for n in lost} if indexed else {keys[lost[0]]} | {f"#{n}" for n in lost}
        assert {record["key"] for record in loader.skipped} <= named
        assert all(("damaged tar data" in r["reason"] or "cut off" in r["reason"]) for r in loader.skipped)
    # One warning for each shard without an index, though 2 workers read each.
    warned = [r.getMessage().split(" has no index")[0] for r in caplog.records if r.name == "pipeline.shardreader"]
    assert sorted(warned) == sorted(unindexed)


@pytest.fixture(scope="module")
def compact_shards(tmp_path_factory):
    """clean_shards' dataset as a compact set (3 backgrounds in backgrounds.tar, 8 samples on each)."""
    base = tmp_path_factory.mktemp("damage-compact")
    synthetic.generate(base / "seed", zips=1, bgs_per_zip=3, fg=4, placements=2, seed=2, image_size=32)
    convert_zips.convert(base / "seed", base / "shards", shards=3, val_fraction=0, workers=1, progress=False,
                         **format_options(schema.COMPACT))
    return base / "shards"


def _garble_jpeg(path, member: tarfile.TarInfo) -> None:
    with open(path, "r+b") as f:
        f.seek(member.offset_data + member.size // 2)
        f.write(random.Random(2).randbytes(member.size // 2 - 2))  # the EOI marker left: it looks whole


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("part", ["member header", "jpeg body"])
def test_damage_in_backgrounds_tar_costs_exactly_the_samples_on_that_background(part, workers, compact_shards,
                                                                                 tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(compact_shards, folder)
    backgrounds = folder / schema.BACKGROUNDS
    member = next(m for m in _members(backgrounds) if m.name == f"{schema.background_key(2)}.{schema.BG}")
    if part == "member header":
        _rewrite_header_at(backgrounds, member.offset, _garbage)
    else:
        _garble_jpeg(backgrounds, member)
    names = [str(folder / schema.shard_name(schema.TRAIN_PREFIX, i)) for i in (1, 2, 3)]
    every = {key for name in names for key in _keys(name)}
    lost = {key for key in every if schema.background_key_of(key) == "2_bg"}
    assert len(lost) == 8
    loader = make_loader(names, batch_size=3, workers=workers, image_size=16, train=False, seed=SEED)
    delivered = [key for batch in loader for key in batch["key"]]
    assert sorted(delivered) == sorted(every - lost)
    assert loader.stats["skipped"] == len(loader.skipped) == len(lost)
    assert {record["key"] for record in loader.skipped} == lost
    reason = "damaged tar data" if part == "member header" else "does not decode"
    assert all(record["reason"].startswith(f"background 2_bg: {reason}") and str(backgrounds) in record["reason"]
               for record in loader.skipped), loader.skipped


def test_a_compact_set_without_its_backgrounds_tar_is_one_line_before_the_first_batch(compact_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(compact_shards, folder)
    os.remove(folder / schema.BACKGROUNDS)
    with pytest.raises(PipelineError) as raised:
        make_loader(f"{folder}/batch-{{1..3}}.tar", batch_size=3, workers=2, image_size=16)
    message = str(raised.value)
    assert message.splitlines() == [message] and message.startswith(f"{folder / schema.BACKGROUNDS}: missing")
