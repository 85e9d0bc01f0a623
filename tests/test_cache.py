"""The local shard cache shared by processes: one download per file, never a half-written or
unverified copy, a stale temporary file replaced, an unusable folder named in one line."""

import hashlib
import logging
import multiprocessing
import os
import shutil

import pytest
import counting  # tests/counting.py: pytest puts this folder on the path

from pipeline import PipelineError, cache, make_loader, schema
from pipeline.shardreader import ShardInfo, read_samples

SHARD = schema.shard_name(schema.TRAIN_PREFIX, 1)


@pytest.fixture
def served(shard_dir, tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    shutil.copy(shard_dir / SHARD, folder)
    data = (folder / SHARD).read_bytes()
    with counting.http_server(folder) as server:
        yield server, {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, data


def _fetch_after(barrier, out, cache_dir, url, expected):
    barrier.wait(timeout=30)
    with cache.fetch(cache_dir, url, SHARD, expected, None, retries=0) as path:
        out.put(path)


def test_processes_sharing_a_cache_download_each_file_once(served, tmp_path):
    server, expected, data = served
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    final = cache_dir / cache.cached_name(SHARD, expected)
    (cache_dir / (final.name + ".part")).write_bytes(b"left by a killed download")
    context = multiprocessing.get_context("fork")
    barrier, out = context.Barrier(4), context.Queue()
    processes = [context.Process(target=_fetch_after, args=(barrier, out, str(cache_dir), f"{server.url}/{SHARD}",
                                                            expected)) for _ in range(4)]
    for process in processes:
        process.start()
    paths = {out.get(timeout=60) for _ in processes}
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert paths == {str(final)}
    assert final.read_bytes() == data
    assert server.bytes_sent() == len(data)  # one download; the others waited, then read the copy
    assert sorted(os.listdir(cache_dir)) == [final.name, final.name + ".lock"]  # the stale .part is gone


def test_a_download_that_does_not_match_the_manifest_is_not_kept(served, tmp_path, caplog):
    server, expected, data = served
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    wrong = {"bytes": expected["bytes"], "sha256": "0" * 64}
    url = f"{server.url}/{SHARD}"
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        for _ in range(2):  # not tried twice
            with cache.fetch(str(cache_dir), url, SHARD, wrong, None) as path:
                assert path is None
    assert [r.getMessage() for r in caplog.records if "not cached" in r.getMessage()] == [
        f"{url}: not cached: {len(data)} bytes with sha256 {expected['sha256'][:12]}..., the manifest "
        f"says {len(data)} bytes, 000000000000..."]
    assert server.bytes_sent() == len(data)
    assert os.listdir(cache_dir) == [cache.cached_name(SHARD, wrong) + ".lock"]


def test_local_shards_are_read_in_place_and_an_unusable_cache_dir_fails_in_one_line(shard_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    keys = [key for batch in make_loader(str(shard_dir / SHARD), batch_size=2, workers=0, image_size=16,
                                         train=False, cache_dir=cache_dir) for key in batch["key"]]
    assert keys and os.listdir(cache_dir) == []  # created, and nothing copied into it
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(PipelineError, match=f"cache_dir {tmp_path}/file/cache: cannot write there"):
        make_loader(str(shard_dir / SHARD), batch_size=2, workers=0, cache_dir=tmp_path / "file" / "cache")


def test_a_cached_shard_reads_as_the_remote_one(served, tmp_path):
    server, expected, data = served
    url = f"{server.url}/{SHARD}"
    remote = [(s.key, s.members) for s in read_samples(url, 0)]
    # What prepare_shards learns from a manifest: the shard's size and sha256 (no index: streamed).
    info = ShardInfo(url, len(remote), expected, None)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()  # as prepare_shards makes it
    server.reset()
    first = [(s.key, s.members) for s in read_samples(url, 0, info=info, cache_dir=str(cache_dir))]
    cached = cache_dir / cache.cached_name(SHARD, expected)
    assert first == remote and cached.read_bytes() == data
    assert server.bytes_sent() == len(data)  # downloaded whole, once
    server.reset()
    again = [(s.key, s.members) for s in read_samples(url, 0, info=info, cache_dir=str(cache_dir))]
    assert again == remote and server.bytes_sent() == 0  # read from the copy
