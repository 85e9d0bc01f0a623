"""Shared test data: one small faulty seed-layout dataset and its shards, made once per session."""

import pytest

from helpers import format_options
from pipeline import schema
from seedzips import synthetic

# 2 zips x 2 backgrounds x 3 foregrounds x 2 placements = 24 samples, 3 of them faulty.
SEED_DATASET = dict(zips=2, bgs_per_zip=2, fg=3, placements=2, seed=0, image_size=64,
                    depth="mixed", faults=True)
# 0.25 of 4 backgrounds holds out exactly one background for validation.
SHARD_OPTIONS = dict(val_fraction=0.25, seed=0, workers=2, progress=False)


@pytest.fixture(scope="session")
def seed_dataset(tmp_path_factory):
    """(dataset path, generate()'s summary) of a tiny faulty dataset with mixed depth maps."""
    path = tmp_path_factory.mktemp("seed") / "dataset"
    return path, synthetic.generate(path, **SEED_DATASET)


@pytest.fixture(scope="session")
def shard_options(shard_format):
    """The convert_zips.convert keyword arguments shard_dir was made with (copy before changing)."""
    return dict(SHARD_OPTIONS, **format_options(shard_format))


@pytest.fixture(scope="session", params=schema.FORMATS)
def shard_format(request):
    """Each shard set format in turn (schema.FORMATS): every test using shard_dir, or a
    fixture of its own that converts in this format, runs on both."""
    return request.param


@pytest.fixture(scope="session")
def compact_dir(seed_dataset, tmp_path_factory):
    """The seed_dataset converted to compact shards (with backgrounds.tar), for the tests of
    what only that format has."""
    import convert_zips

    out = tmp_path_factory.mktemp(f"shards-{schema.COMPACT}")
    convert_zips.convert(seed_dataset[0], out, **SHARD_OPTIONS, **format_options(schema.COMPACT))
    return out


@pytest.fixture(scope="session")
def shard_dir(seed_dataset, shard_format, shard_options, tmp_path_factory, request):
    """The seed_dataset converted to shards (batch-1..2.tar, val-1.tar, manifest.json; with
    backgrounds.tar when compact) in each shard_format."""
    import convert_zips

    if shard_format == schema.COMPACT:
        return request.getfixturevalue("compact_dir")
    out = tmp_path_factory.mktemp(f"shards-{shard_format}")
    convert_zips.convert(seed_dataset[0], out, **shard_options)
    return out


@pytest.fixture
def aws_env(monkeypatch):
    """An environment in which an S3 client finds no credentials, endpoint or profile but the
    test's own (never the cloud's metadata service): the remote tests pass theirs explicitly."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                 "AWS_RESPONSE_CHECKSUM_VALIDATION", "AWS_REQUEST_CHECKSUM_CALCULATION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-the-server-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-server-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    return monkeypatch
