"""The same shards through real servers on 127.0.0.1: HTTP with and without Range, S3, GCS.

Each scheme must deliver exactly the keys the local path delivers; failures must name the
URL quickly, and a connection dropped mid-shard must be retried without losing a sample.
"""

import os
import shutil
import time

# gcsfs reads this at import: the fake server has no hierarchical-namespace API.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import pytest
import servers  # tests/servers.py: pytest puts this folder on the path

from pipeline import PipelineError, make_loader, schema

BUCKET = "bucket"
ACCESS_KEY, SECRET_KEY = "pipeline-test-access", "pipeline-test-secret"
FAST_FAIL = dict(retries=1, retry_wait=0.01)


def _shard_names(shard_dir):
    return sorted(p.name for p in shard_dir.glob("*.tar"))


@pytest.fixture(scope="module")
def served_root(shard_dir, tmp_path_factory):
    """A folder whose one sub-folder (the bucket) holds the shards and their manifest."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(shard_dir, root / BUCKET)
    return root


def _eval_keys(urls, **kwargs):
    loader = make_loader(urls, batch_size=4, workers=2, image_size=16, train=False, **kwargs)
    keys = [key for batch in loader for key in batch["key"]]
    assert len(keys) == len(set(keys))
    return sorted(keys), [r["key"] for r in loader.skipped]


@pytest.fixture(scope="module")
def local_keys(shard_dir):
    return _eval_keys([str(shard_dir / name) for name in _shard_names(shard_dir)])


@pytest.fixture(scope="module")
def s3_endpoint(served_root):
    with servers.rclone_s3(served_root, ACCESS_KEY, SECRET_KEY) as url:
        yield url


@pytest.fixture(scope="module")
def gcs_endpoint(served_root):
    with servers.fake_gcs_server(served_root) as url:
        yield url


@pytest.fixture(scope="module")
def nginx_url(served_root, tmp_path_factory):
    with servers.nginx(served_root, tmp_path_factory.mktemp("nginx")) as url:
        yield url


@pytest.fixture(scope="module")
def python_http_url(served_root):
    with servers.python_http(served_root) as url:
        yield url


@pytest.fixture
def aws_env(monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-the-server-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-server-secret")
    return monkeypatch


def _pattern(base, shard_dir):
    names = ",".join(name.removesuffix(".tar") for name in _shard_names(shard_dir))
    return f"{base}/{BUCKET}/{{{names}}}.tar"


@pytest.mark.parametrize("server", ["nginx_url", "python_http_url"])
def test_http_with_and_without_range_gives_the_local_keys(server, request, shard_dir, local_keys):
    base = request.getfixturevalue(server)
    assert _eval_keys(_pattern(base, shard_dir)) == local_keys


def test_s3_with_storage_options_gives_the_local_keys(s3_endpoint, aws_env, shard_dir, local_keys):
    options = {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": s3_endpoint}}
    assert _eval_keys(_pattern("s3:/", shard_dir), storage_options=options) == local_keys


def test_s3_from_environment_credentials_and_endpoint(s3_endpoint, aws_env, shard_dir, local_keys):
    aws_env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    aws_env.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert _eval_keys(f"s3://{BUCKET}/*.tar") == local_keys  # a glob, listed on the server


def test_gcs_gives_the_local_keys(gcs_endpoint, shard_dir, local_keys):
    options = {"endpoint_url": gcs_endpoint, "token": "anon"}
    assert _eval_keys(_pattern("gs:/", shard_dir), storage_options=options) == local_keys


def test_missing_shard_names_the_url(nginx_url):
    url = f"{nginx_url}/{BUCKET}/batch-99.tar"
    started = time.monotonic()
    with pytest.raises(PipelineError, match=f"cannot read {url}.*FileNotFoundError"):
        make_loader(url, batch_size=2, workers=0, shard_sizes=[4], **FAST_FAIL)
    assert time.monotonic() - started < 5


def test_unreachable_server_names_the_url_quickly():
    url = f"http://127.0.0.1:{servers.free_port()}/{BUCKET}/batch-1.tar"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(PipelineError, match=f"cannot read {url} after 2 attempts"):
        make_loader(url, batch_size=2, workers=0, shard_sizes=[4], **FAST_FAIL)
    assert time.monotonic() - started < 5


def test_unreachable_server_is_not_mistaken_for_a_missing_manifest():
    base = f"http://127.0.0.1:{servers.free_port()}/{BUCKET}"  # nothing listens there
    with pytest.raises(PipelineError, match=f"cannot read {base}/{schema.MANIFEST} after"):
        make_loader(f"{base}/batch-1.tar", batch_size=2, workers=0, **FAST_FAIL)
    with pytest.raises(PipelineError, match=f"cannot list {base}/val-\\*.tar"):
        make_loader(f"{base}/val-*.tar", batch_size=2, workers=0, **FAST_FAIL)


def test_connection_dropped_mid_shard_is_retried_and_nothing_is_lost(served_root, shard_dir, local_keys):
    with servers.dropping_http(served_root, drop_after=20_000) as (base, requests):
        keys = _eval_keys(_pattern(base, shard_dir), retries=2, retry_wait=0.01)
    assert keys == local_keys
    dropped = [path for path, count in requests.items() if path.endswith(".tar") and count > 1]
    assert dropped, requests  # at least one shard was cut off and fetched again
    assert all(requests[path] >= 2 for path in dropped)
    assert requests[f"/{BUCKET}/{schema.MANIFEST}"] == 1
