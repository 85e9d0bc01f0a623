"""What the remote-storage tests share: the loopback guard, the test bucket and its
credentials, uploads as users make them (boto3) and the fsspec options that reach the server."""

import ipaddress
import os
import socket
from urllib.parse import urlsplit

import boto3
import pytest

from pipeline import schema

BUCKET = "bucket"
ACCESS_KEY, SECRET_KEY = "pipeline-test-access", "pipeline-test-secret"


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


def shard_names(shard_dir):
    """The shards in a folder (a compact set's backgrounds.tar is not one)."""
    return sorted(p.name for p in shard_dir.glob("*.tar") if p.name != schema.BACKGROUNDS)


def upload_with_boto3(endpoint: str, folder, prefix: str = "") -> None:
    """Upload as users do: boto3 with its default checksums (a whole-object CRC32 on each)."""
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
    assert_loopback(s3.meta.endpoint_url)
    s3.create_bucket(Bucket=BUCKET)
    for name in sorted(os.listdir(folder)):
        s3.upload_file(str(folder / name), BUCKET, prefix + name)
    first = prefix + shard_names(folder)[0]
    assert "ChecksumCRC32" in s3.head_object(Bucket=BUCKET, Key=first, ChecksumMode="ENABLED")


def s3_options(endpoint, **extra):
    return {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": assert_loopback(endpoint)},
            **extra}
