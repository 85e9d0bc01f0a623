"""The same shards through real servers on 127.0.0.1: HTTP with and without Range, S3 (objects
uploaded by boto3), GCS; bytes fetched per epoch counted by the server that sends them.

Each scheme must deliver exactly the keys the local path delivers; failures must name the
URL quickly; a dropped connection or a 15 s S3 outage mid-epoch is retried without losing a
sample; an epoch over ranks x workers fetches each shard byte about once, and a cache_dir
makes later epochs and runs fetch none.
"""

import ipaddress
import json
import logging
import os
import shutil
import socket
import tarfile
import threading
import time
from urllib.parse import urlsplit

# gcsfs reads this at import: the fake server has no hierarchical-namespace API.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import boto3
import pytest
import counting  # tests/counting.py, tests/servers.py: pytest puts this folder on the path
import servers

import convert_zips
from pipeline import PipelineError, clients, make_loader, schema
from seedzips import synthetic

BUCKET = "bucket"
ACCESS_KEY, SECRET_KEY = "pipeline-test-access", "pipeline-test-secret"
FAST_FAIL = dict(retries=1, retry_wait=0.01)
# A failure with FAST_FAIL takes well under a second; the default schedule (5 retries waiting
# 1, 2, 4, 8, 16 s) at least 31 s. The bound between them is headroom for a loaded 2-core machine.
QUICKLY = 15.0
SIZE = 16


def assert_loopback(url: str) -> str:
    """Fail, never skip, unless `url`'s host resolves to 127.0.0.0/8 alone: these tests must
    not reach beyond this machine, also where no network namespace guards them (make test's
    `unshare -n` is left out where the machine forbids it). Returns `url`."""
    host = urlsplit(url).hostname
    addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    outside = sorted(a for a in addresses if ipaddress.ip_address(a) not in ipaddress.ip_network("127.0.0.0/8"))
    if not addresses or outside:
        pytest.fail(f"refusing to run: endpoint {url} resolves outside 127.0.0.0/8 ({', '.join(outside)})")
    return url


def _shard_names(shard_dir):
    return sorted(p.name for p in shard_dir.glob("*.tar"))


@pytest.fixture(scope="module")
def served_root(shard_dir, tmp_path_factory):
    """A folder whose one sub-folder (the bucket) holds the shards, indexes and manifest."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(shard_dir, root / BUCKET)
    return root


@pytest.fixture(scope="module")
def three_shards(tmp_path_factory):
    """48 flawless samples in 3 training shards of 16 (with indexes and manifest), 128 px: large
    enough (~0.4 MB a shard) that headers and manifests count little beside the shard bytes."""
    base = tmp_path_factory.mktemp("three")
    synthetic.generate(base / "seed", zips=3, bgs_per_zip=2, fg=4, placements=2, seed=1, image_size=128)
    convert_zips.convert(base / "seed", base / "shards", shards=3, val_fraction=0, workers=1, progress=False)
    return base / "shards"


def _shard_bytes(folder) -> int:
    return sum(os.path.getsize(folder / name) for name in _shard_names(folder))


def _keys_in(folder) -> list[str]:
    """The keys of the training shards in `folder`, read from the tar files themselves."""
    return [key for name in _shard_names(folder) for key in dict.fromkeys(
        schema.split_member(member)[0] for member in tarfile.open(folder / name).getnames())]


def _shard_samples(folder) -> int:
    return sum(e["samples"] for e in json.loads((folder / schema.MANIFEST).read_text())["shards"])


def _sample_bytes(folder) -> int:
    """The bytes of the shards' samples (end-of-archive blocks left out): what a reader must fetch."""
    total = 0
    for name in _shard_names(folder):
        index = schema.decode_index((folder / schema.index_name(name)).read_bytes())
        total += index.offsets[-1] - index.offsets[0]
    return total


def _eval_keys(urls, **kwargs):
    loader = make_loader(urls, batch_size=4, workers=2, image_size=SIZE, train=False, **kwargs)
    keys = [key for batch in loader for key in batch["key"]]
    assert len(keys) == len(set(keys))
    return sorted(keys), [r["key"] for r in loader.skipped]


@pytest.fixture(scope="module")
def local_keys(shard_dir):
    return _eval_keys([str(shard_dir / name) for name in _shard_names(shard_dir)])


def _upload_with_boto3(endpoint: str, folder, prefix: str = "") -> None:
    """Upload as users do: boto3 with its default checksums (a whole-object CRC32 on each)."""
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    assert_loopback(s3.meta.endpoint_url)
    s3.create_bucket(Bucket=BUCKET)
    for name in sorted(os.listdir(folder)):
        s3.upload_file(str(folder / name), BUCKET, prefix + name)
    first = prefix + _shard_names(folder)[0]
    assert "ChecksumCRC32" in s3.head_object(Bucket=BUCKET, Key=first, ChecksumMode="ENABLED")


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_RESPONSE_CHECKSUM_VALIDATION", "AWS_REQUEST_CHECKSUM_CALCULATION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-the-server-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-server-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    return monkeypatch


@pytest.fixture(scope="module")
def s3_endpoint(shard_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        with servers.rclone_s3(tmp_path_factory.mktemp("s3"), ACCESS_KEY, SECRET_KEY) as server:
            _upload_with_boto3(server.url, shard_dir)
            yield server.url


@pytest.fixture(scope="module")
def gcs_endpoint(served_root):
    with servers.fake_gcs_server(served_root) as url:
        yield assert_loopback(url)


@pytest.fixture(scope="module")
def nginx_url(served_root, tmp_path_factory):
    with servers.nginx(served_root, tmp_path_factory.mktemp("nginx")) as url:
        yield assert_loopback(url)


@pytest.fixture(scope="module")
def python_http_url(served_root):
    with servers.python_http(served_root) as url:
        yield assert_loopback(url)


def _pattern(base, shard_dir):
    names = ",".join(name.removesuffix(".tar") for name in _shard_names(shard_dir))
    return f"{base}/{BUCKET}/{{{names}}}.tar"


def _s3_options(endpoint, **extra):
    return {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": assert_loopback(endpoint)},
            **extra}


@pytest.mark.parametrize("server", ["nginx_url", "python_http_url"])
def test_http_with_and_without_range_gives_the_local_keys(server, request, shard_dir, local_keys):
    base = request.getfixturevalue(server)
    assert _eval_keys(_pattern(base, shard_dir)) == local_keys


def test_s3_objects_uploaded_by_boto3_are_read_by_range(s3_endpoint, aws_env, shard_dir, local_keys):
    assert _eval_keys(_pattern("s3:/", shard_dir), storage_options=_s3_options(s3_endpoint)) == local_keys
    # What the defaults avoid: a user who asks for botocore's own validation gets its failure
    # on the first ranged GET (the object's CRC32 is of the whole object), named in one line.
    strict = _s3_options(s3_endpoint, config_kwargs={"response_checksum_validation": "when_supported"})
    with pytest.raises(PipelineError, match=r"cannot read s3://bucket/batch-1.tar: FlexibleChecksumError"):
        make_loader(f"s3://{BUCKET}/batch-1.tar", batch_size=2, workers=0, storage_options=strict, **FAST_FAIL)


def test_s3_from_environment_credentials_and_endpoint(s3_endpoint, aws_env, shard_dir, local_keys):
    aws_env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    aws_env.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    # The endpoint the client really uses comes from the environment alone: checked before any request.
    fs, _ = clients.client(f"s3://{BUCKET}/batch-1.tar")
    fs.connect()
    assert assert_loopback(fs.s3.meta.endpoint_url).rstrip("/") == s3_endpoint
    assert _eval_keys(f"s3://{BUCKET}/*.tar") == local_keys  # a glob, listed on the server


def test_gcs_gives_the_local_keys(gcs_endpoint, shard_dir, local_keys):
    options = {"endpoint_url": gcs_endpoint, "token": "anon"}
    assert _eval_keys(_pattern("gs:/", shard_dir), storage_options=options) == local_keys


def test_missing_shard_names_the_url(nginx_url):
    url = f"{nginx_url}/{BUCKET}/batch-99.tar"
    started = time.monotonic()
    with pytest.raises(PipelineError, match=f"cannot read {url}: FileNotFoundError"):
        make_loader(url, batch_size=2, workers=0, shard_sizes=[4], **FAST_FAIL)
    assert time.monotonic() - started < QUICKLY


def test_unreachable_server_names_the_url_quickly():
    base = f"http://127.0.0.1:{servers.free_port()}/{BUCKET}"  # nothing listens there
    started = time.monotonic()
    # The manifest beside the shard is the first thing read, even with shard_sizes given.
    with pytest.raises(PipelineError, match=f"cannot read {base}/{schema.MANIFEST} after 2 attempts"):
        make_loader(f"{base}/batch-1.tar", batch_size=2, workers=0, shard_sizes=[4], **FAST_FAIL)
    assert time.monotonic() - started < QUICKLY
    with pytest.raises(PipelineError, match=f"cannot list {base}/val-\\*.tar"):
        make_loader(f"{base}/val-*.tar", batch_size=2, workers=0, **FAST_FAIL)


def test_connection_dropped_mid_shard_is_retried_and_nothing_is_lost(served_root, shard_dir, local_keys):
    with counting.http_server(served_root, drop_after=20_000) as server:
        keys = _eval_keys(_pattern(server.url, shard_dir), retries=2, retry_wait=0.01)
    assert keys == local_keys
    dropped = [path for path in server.dropped if path.endswith(".tar")]
    assert dropped, server.requests  # at least one shard range was cut off and fetched again
    assert server.requests[f"/{BUCKET}/{schema.MANIFEST}"] == 1
    # A retry asked for the rest of each dropped range (its data then parsed into the right keys).
    for path in dropped:
        start, end = server.dropped[path]
        assert any(start <= first and last == end for first, last in server.asked[path][1:]), server.asked[path]


def test_an_epoch_over_4_ranks_x_2_workers_fetches_each_shard_byte_once(three_shards):
    """Shard bytes (.tar) sent by the server are compared with the shards' size; index and
    manifest bytes are counted apart and must stay small beside them."""
    with counting.http_server(three_shards) as server:
        loaders = [make_loader(f"{server.url}/batch-{{1..3}}.tar", batch_size=2, workers=2, image_size=SIZE,
                               train=True, rank=rank, world_size=4) for rank in range(4)]
        ranks = [[batch["key"] for batch in loader] for loader in loaders]
        tar, other = server.bytes_sent(".tar"), server.bytes_sent() - server.bytes_sent(".tar")
    shard_bytes = _shard_bytes(three_shards)
    assert tar <= 1.1 * shard_bytes, (tar, shard_bytes)
    assert other <= 0.1 * shard_bytes, other
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
        first_run = server.bytes_sent(".tar")
        server.reset()
        _epochs(url, cache_dir)
        second_run = server.bytes_sent(), server.bytes_sent(schema.MANIFEST)
    assert first_run <= 1.1 * _shard_bytes(three_shards), (first_run, _shard_bytes(three_shards))
    assert second_run[0] == second_run[1] < 20_000  # manifests only: no shard or index byte
    cached = sorted(os.listdir(cache_dir))
    names = _shard_names(three_shards)
    assert [n for n in cached if n.endswith(".tar")] == sorted(
        f"{convert_zips._sha256(three_shards / n)}-{n}" for n in names)
    assert len([n for n in cached if n.endswith(schema.INDEX_SUFFIX)]) == len(names)
    assert not [n for n in cached if n.endswith(".part")]


def test_simplecache_urls_keep_their_cache_across_shards_and_epochs(three_shards):
    url = f"simplecache::{{}}/batch-{{{{1..3}}}}.tar"
    with counting.http_server(three_shards) as server:
        # Both ranks of epoch 0 in this one process, whose one simplecache client fetches each shard
        # once: two GETs of it at most, since fsspec's HTTP asks whether a file exists with a GET
        # first (closed early, but its bytes may already be on their way, hence up to 2x)...
        _epochs(url.format(server.url), None, epochs=(0,), workers=0)
        first, requests = server.bytes_sent(".tar"), dict(server.requests)
        _epochs(url.format(server.url), None, epochs=(1,), workers=0)
        # ... and the next epoch reads them all from its cache.
        assert server.bytes_sent(".tar") == first <= 2 * _shard_bytes(three_shards)
        shard_requests = {path: count for path, count in server.requests.items() if path.endswith(".tar")}
    assert shard_requests == {f"/{name}": requests[f"/{name}"] for name in _shard_names(three_shards)}
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
        _upload_with_boto3(server.url, three_shards)
        with counting.proxy(server.url) as (proxy, sent):
            delivered = [key for rank in range(ranks)
                         for batch in make_loader(f"s3://{BUCKET}/batch-{{1..3}}.tar", batch_size=2, workers=workers,
                                                  image_size=SIZE, train=True, rank=rank, world_size=ranks,
                                                  storage_options=_s3_options(proxy))
                         for key in batch["key"]]
            total = sent()
    assert sorted(delivered) == sorted(_keys_in(three_shards))  # every sample, once: none skipped, none left
    assert total >= _sample_bytes(three_shards), (total, _sample_bytes(three_shards))
    small_files = ranks * os.path.getsize(three_shards / schema.MANIFEST) + ranks * workers * sum(
        os.path.getsize(three_shards / schema.index_name(name)) for name in _shard_names(three_shards))
    assert total <= 1.1 * _shard_bytes(three_shards) + small_files, (total, _shard_bytes(three_shards), small_files)


def test_a_15_second_s3_outage_mid_epoch_is_survived(three_shards, aws_env, tmp_path):
    server = servers.RcloneS3(tmp_path / "root", ACCESS_KEY, SECRET_KEY)
    (tmp_path / "root").mkdir()
    server.start()
    restart = threading.Timer(15, server.start)
    try:
        _upload_with_boto3(server.url, three_shards)
        loader = make_loader(f"s3://{BUCKET}/batch-{{1..3}}.tar", batch_size=4, workers=0, image_size=SIZE,
                             train=False, storage_options=_s3_options(server.url), retries=6, retry_wait=1.0)
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
