"""The same shards through real servers on 127.0.0.1: HTTP with and without Range, S3 (objects
uploaded by boto3), GCS.

Each scheme must deliver exactly the keys the local path delivers; failures must name the
URL quickly; a dropped connection mid-shard is retried without losing a sample. Whole epochs
over several remote shards (bytes fetched, caches, outages) are in test_remote_epochs.py.
"""

import os
import shutil
import time

# gcsfs reads this at import: the fake server has no hierarchical-namespace API.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import pytest
import counting  # tests/counting.py, tests/servers.py, tests/remote.py: pytest puts this folder on the path
import servers
from remote import ACCESS_KEY, BUCKET, SECRET_KEY, assert_loopback, s3_options, shard_names, upload_with_boto3

from pipeline import PipelineError, clients, make_loader, schema

FAST_FAIL = dict(retries=1, retry_wait=0.01)
# A failure with FAST_FAIL takes well under a second; the default schedule (5 retries waiting
# 1, 2, 4, 8, 16 s) at least 31 s. The bound between them is headroom for a loaded 2-core machine.
QUICKLY = 15.0
SIZE = 16


@pytest.fixture(scope="module")
def served_root(shard_dir, tmp_path_factory):
    """A folder whose one sub-folder (the bucket) holds the shards, indexes and manifest."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(shard_dir, root / BUCKET)
    return root


def _eval_keys(urls, **kwargs):
    loader = make_loader(urls, batch_size=4, workers=2, image_size=SIZE, train=False, **kwargs)
    keys = [key for batch in loader for key in batch["key"]]
    assert len(keys) == len(set(keys))
    return sorted(keys), [r["key"] for r in loader.skipped]


@pytest.fixture(scope="module")
def local_keys(shard_dir):
    return _eval_keys([str(shard_dir / name) for name in shard_names(shard_dir)])


@pytest.fixture(scope="module")
def local_keys(shard_dir):
    return _eval_keys([str(shard_dir / name) for name in shard_names(shard_dir)])


@pytest.fixture(scope="module")
def s3_endpoint(shard_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        with servers.rclone_s3(tmp_path_factory.mktemp("s3"), ACCESS_KEY, SECRET_KEY) as server:
            upload_with_boto3(server.url, shard_dir)
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
    names = ",".join(name.removesuffix(".tar") for name in shard_names(shard_dir))
    return f"{base}/{BUCKET}/{{{names}}}.tar"


@pytest.mark.parametrize("server", ["nginx_url", "python_http_url"])
def test_http_with_and_without_range_gives_the_local_keys(server, request, shard_dir, local_keys):
    base = request.getfixturevalue(server)
    assert _eval_keys(_pattern(base, shard_dir)) == local_keys


def test_s3_objects_uploaded_by_boto3_are_read_by_range(s3_endpoint, aws_env, shard_dir, local_keys):
    assert _eval_keys(_pattern("s3:/", shard_dir), storage_options=s3_options(s3_endpoint)) == local_keys
    # What the defaults avoid: a user who asks for botocore's own validation gets its failure
    # on the first ranged GET (the object's CRC32 is of the whole object), named in one line.
    strict = s3_options(s3_endpoint, config_kwargs={"response_checksum_validation": "when_supported"})
    with pytest.raises(PipelineError, match=r"cannot read s3://bucket/batch-1.tar: FlexibleChecksumError"):
        make_loader(f"s3://{BUCKET}/batch-1.tar", batch_size=2, workers=0, storage_options=strict, **FAST_FAIL)


def test_s3_from_environment_credentials_and_endpoint(s3_endpoint, aws_env, shard_dir, local_keys):
    aws_env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    aws_env.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    clients.close_clients()  # a client this process made under another format's server's environment
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
