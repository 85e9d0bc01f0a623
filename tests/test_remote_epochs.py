"""Whole epochs over 3 remote shards on 127.0.0.1, bytes counted by the server (or a proxy)
that sends them: an epoch over ranks x workers fetches each shard byte about once, over HTTP
and S3; a cache_dir makes later epochs and runs fetch none; a server that ignores Range still
gives every key; a 15 s S3 outage mid-epoch is waited out without losing a sample.
"""

import json
import logging
import os
import tarfile
import threading
import time

import pytest
import counting  # tests/counting.py, tests/servers.py, tests/remote.py: pytest puts this folder on the path
import servers
from remote import ACCESS_KEY, BUCKET, SECRET_KEY, s3_options, shard_names, upload_with_boto3
from helpers import format_options

import convert_zips
from pipeline import make_loader, schema
from seedzips import synthetic
from seedzips.storage import sha256_of

SIZE = 16


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory, shard_format):
    """48 flawless samples in 3 training shards of 16 (with indexes and manifest), 128 px: large
    enough (~0.4 MB a shard) that headers and manifests count little beside the shard bytes."""
    base = tmp_path_factory.mktemp("three")
    synthetic.generate(base / "seed", zips=3, bgs_per_zip=2, fg=4, placements=2, seed=1, image_size=128)
    convert_zips.convert(base / "seed", base / "shards", shards=3, val_fraction=0, workers=1, progress=False,
                         **format_options(shard_format))
    return base / "shards"


def _shard_bytes(folder) -> int:
    return sum(os.path.getsize(folder / name) for name in shard_names(folder))


def _shard_bytes_sent(server) -> int:
    """The bytes a counting server sent of the shards (a compact set's backgrounds.tar left out)."""
    return server.bytes_sent(".tar") - server.bytes_sent(schema.BACKGROUNDS)


def _size(folder, name) -> int:
    """The bytes of file `name` in `folder`, 0 where there is none (a self-contained set's backgrounds)."""
    return os.path.getsize(folder / name) if (folder / name).exists() else 0


def _backgrounds_bytes(folder) -> int:
    """The bytes of a compact set's backgrounds.tar and its index (0 for a self-contained one)."""
    return _size(folder, schema.BACKGROUNDS) + _size(folder, schema.index_name(schema.BACKGROUNDS))


def _keys_in(folder) -> list[str]:
    """The keys of the training shards in `folder`, read from the tar files themselves."""
    return [key for name in shard_names(folder) for key in dict.fromkeys(
        schema.split_member(member)[0] for member in tarfile.open(folder / name).getnames())]


def _shard_samples(folder) -> int:
    return sum(e["samples"] for e in json.loads((folder / schema.MANIFEST).read_text())["shards"])


def _sample_bytes(folder) -> int:
    """The bytes of the shards' samples (end-of-archive blocks left out): what a reader must fetch."""
    total = 0
    for name in shard_names(folder):
        index = schema.decode_index((folder / schema.index_name(name)).read_bytes())
        total += index.offsets[-1] - index.offsets[0]
    return total


def test_an_epoch_over_4_ranks_x_2_workers_fetches_each_shard_byte_once(three_shards):
    """Shard bytes (.tar) sent by the server are compared with the shards' size; index and
    manifest bytes are counted apart and must stay small beside them; a compact set's
    backgrounds.tar is sent once per rank (its index at most that), whatever its workers read."""
    with counting.http_server(three_shards) as server:
        loaders = [make_loader(f"{server.url}/batch-{{1..3}}.tar", batch_size=2, workers=2, image_size=SIZE,
                               train=True, rank=rank, world_size=4) for rank in range(4)]
        ranks = [[batch["key"] for batch in loader] for loader in loaders]
        backgrounds = server.bytes_sent(schema.BACKGROUNDS), server.bytes_sent(schema.index_name(schema.BACKGROUNDS))
        tar = server.bytes_sent(".tar") - backgrounds[0]
        other = server.bytes_sent() - tar - sum(backgrounds)
    shard_bytes = _shard_bytes(three_shards)
    assert tar <= 1.1 * shard_bytes, (tar, shard_bytes)
    assert other <= 0.1 * shard_bytes, other
    assert backgrounds[0] == 4 * _size(three_shards, schema.BACKGROUNDS), backgrounds
    assert backgrounds[1] <= 4 * _size(three_shards, schema.index_name(schema.BACKGROUNDS)), backgrounds
    # 48 samples, 12 a rank, batches of 2: each rank steps 6 times and every sample comes once.
    batches_per_rank = _shard_samples(three_shards) // 4 // 2
    assert [len(batches) for batches in ranks] == [len(loader) for loader in loaders] == [batches_per_rank] * 4
    assert all(len(keys) == 2 for batches in ranks for keys in batches)
    delivered = [key for batches in ranks for keys in batches for key in keys]
    assert sorted(delivered) == sorted(_keys_in(three_shards))


def _epochs(url, cache_dir, epochs=(0, 1), world_size=2, workers=2):
    for epoch in epochs:
        keys = [key for rank in range(world_size)
                for batch in make_loader(url, batch_size=2, workers=workers, image_size=SIZE, train=True, epoch=epoch,
                                         rank=rank, world_size=world_size, cache_dir=cache_dir)
                for key in batch["key"]]
        assert len(keys) == len(set(keys)) == 48


def test_a_cache_dir_fetches_each_shard_once_over_epochs_and_none_in_a_later_run(three_shards, tmp_path):
    cache_dir = tmp_path / "cache"
    with counting.http_server(three_shards) as server:
        url = f"{server.url}/batch-{{1..3}}.tar"
        _epochs(url, cache_dir)
        first_run = _shard_bytes_sent(server)
        server.reset()
        _epochs(url, cache_dir)
        second_run = server.bytes_sent(), server.bytes_sent(schema.MANIFEST)
    assert first_run <= 1.1 * _shard_bytes(three_shards), (first_run, _shard_bytes(three_shards))
    assert second_run[0] == second_run[1] < 20_000  # manifests only: no shard or index byte
    cached = sorted(os.listdir(cache_dir))
    names = shard_names(three_shards)
    backgrounds = [schema.BACKGROUNDS] if (three_shards / schema.BACKGROUNDS).exists() else []
    assert [n for n in cached if n.endswith(".tar")] == sorted(
        f"{sha256_of(three_shards / n)}-{n}" for n in names + backgrounds)
    # (backgrounds.tar.idx too unless this process parsed it already, in another test: pipeline.index)
    assert len([n for n in cached if n.endswith(schema.INDEX_SUFFIX) and schema.BACKGROUNDS not in n]) == len(names)
    assert not [n for n in cached if n.endswith(".part")]


def test_simplecache_urls_keep_their_cache_across_shards_and_epochs(three_shards):
    url = f"simplecache::{{}}/batch-{{{{1..3}}}}.tar"
    with counting.http_server(three_shards) as server:
        # Both ranks of epoch 0 in this one process, whose one simplecache client fetches each shard
        # once: two GETs of it at most, since fsspec's HTTP asks whether a file exists with a GET
        # first (closed early, but its bytes may already be on their way, hence up to 2x)...
        _epochs(url.format(server.url), None, epochs=(0,), workers=0)
        first, requests = _shard_bytes_sent(server), dict(server.requests)
        _epochs(url.format(server.url), None, epochs=(1,), workers=0)
        # ... and the next epoch reads them all from its cache.
        assert _shard_bytes_sent(server) == first <= 2 * _shard_bytes(three_shards)
        shard_requests = {path: count for path, count in server.requests.items()
                          if path.endswith(".tar") and path != f"/{schema.BACKGROUNDS}"}
    assert shard_requests == {f"/{name}": requests[f"/{name}"] for name in shard_names(three_shards)}
    assert all(count <= 2 for count in shard_requests.values()), shard_requests  # a second download is a 3rd GET


def test_a_server_without_range_gives_the_local_keys_and_warns_once_per_shard(three_shards, caplog):
    local = sorted(key for rank in range(4) for batch in make_loader(
        str(three_shards / "batch-{1..3}.tar"), batch_size=4, workers=0, image_size=SIZE, train=False,
        rank=rank, world_size=4) for key in batch["key"])
    caplog.set_level(logging.WARNING, logger="pipeline.streams")
    with counting.http_server(three_shards, ranges=False) as server:
        for _ in range(2):  # a second epoch says nothing new
            keys = sorted(key for rank in range(4) for batch in make_loader(
                f"{server.url}/batch-{{1..3}}.tar", batch_size=4, workers=0, image_size=SIZE, train=False,
                rank=rank, world_size=4) for key in batch["key"])
            assert keys == local
    warned = [record.getMessage() for record in caplog.records if "ignores Range" in record.getMessage()]
    # Ranks 1..3 each start inside one of the 3 shards: one warning for each shard, in all.
    assert sorted(message.split(": the server")[0] for message in warned) == [
        f"{server.url}/batch-{i}.tar" for i in (1, 2, 3)]


def test_s3_ranged_reads_fetch_each_shard_byte_once(three_shards, aws_env, tmp_path):
    """Everything the S3 server sends through a counting proxy (HTTP headers included) over an
    epoch of 4 ranks x 2 workers: object-store reads end at the range end, so it stays within
    1.1x the shard bytes plus the manifest and index files as often as they may be read (once
    per rank, once per share and shard)."""
    ranks, workers, shards = 4, 2, 3
    with servers.rclone_s3(tmp_path, ACCESS_KEY, SECRET_KEY) as server:
        upload_with_boto3(server.url, three_shards)
        with counting.proxy(server.url) as (proxy, sent):
            delivered = [key for rank in range(ranks)
                         for batch in make_loader(f"s3://{BUCKET}/batch-{{1..3}}.tar", batch_size=2, workers=workers,
                                                  image_size=SIZE, train=True, rank=rank, world_size=ranks,
                                                  storage_options=s3_options(proxy))
                         for key in batch["key"]]
            total = sent()
    assert sorted(delivered) == sorted(_keys_in(three_shards))  # every sample, once: none skipped, none left
    assert total >= _sample_bytes(three_shards), (total, _sample_bytes(three_shards))
    small_files = ranks * (os.path.getsize(three_shards / schema.MANIFEST) + _backgrounds_bytes(three_shards)) + (
        ranks * workers * sum(os.path.getsize(three_shards / schema.index_name(name)) for name in shard_names(three_shards)))
    assert total <= 1.1 * _shard_bytes(three_shards) + small_files, (total, _shard_bytes(three_shards), small_files)


def test_a_15_second_s3_outage_mid_epoch_is_survived(three_shards, aws_env, tmp_path):
    server = servers.RcloneS3(tmp_path / "root", ACCESS_KEY, SECRET_KEY)
    (tmp_path / "root").mkdir()
    server.start()
    restart = threading.Timer(15, server.start)
    try:
        upload_with_boto3(server.url, three_shards)
        loader = make_loader(f"s3://{BUCKET}/batch-{{1..3}}.tar", batch_size=4, workers=0, image_size=SIZE,
                             train=False, storage_options=s3_options(server.url), retries=6, retry_wait=1.0)
        keys, arrivals = [], []
        for batch in loader:
            keys += batch["key"]
            arrivals.append(time.monotonic())
            if len(arrivals) == 1:  # shard 1's range is in memory; shards 2 and 3 are still to come
                server.stop()
                stopped = time.monotonic()
                restart.start()
    finally:
        restart.cancel()
        if restart.ident is not None:
            restart.join()
        server.stop()
    assert len(keys) == len(set(keys)) == 48
    assert max(b - a for a, b in zip(arrivals, arrivals[1:])) >= 14  # a read waited out the outage
    assert arrivals[-1] - stopped >= 14
