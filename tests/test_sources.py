"""URL expansion, sample counts, byte ranges, tar reading by sample range, and the JPEG checks."""

import io
import json
import os
import shutil
import tarfile

import pytest

from helpers import copy_backgrounds
from pipeline import PipelineError, expand_urls, read_manifest, schema
from pipeline.decode import BadSample, check
from pipeline.shardreader import prepare_shards, read_samples
from pipeline.sources import shard_basename, shard_folder
from pipeline.streams import RetryingStream, open_range


def _train_shards(shard_dir):
    return sorted(str(p) for p in shard_dir.glob(f"{schema.TRAIN_PREFIX}-*.tar"))


def test_expand_urls_braces_globs_lists_and_file_urls(shard_dir):
    shards = _train_shards(shard_dir)
    assert expand_urls(f"{shard_dir}/{schema.TRAIN_PREFIX}-{{1..2}}.tar") == shards
    assert expand_urls(f"{shard_dir}/{schema.TRAIN_PREFIX}-*.tar") == shards
    assert expand_urls([shards[1], f"{shard_dir}/{schema.VAL_PREFIX}-*.tar"]) == [
        shards[1], str(shard_dir / schema.shard_name(schema.VAL_PREFIX, 1))]
    assert expand_urls(f"file://{shard_dir}/{schema.TRAIN_PREFIX}-*.tar") == [f"file://{s}" for s in shards]
    with pytest.raises(PipelineError, match="'.*nope-\\*.tar' matches nothing"):
        expand_urls(f"{shard_dir}/nope-*.tar")
    with pytest.raises(PipelineError, match="no such shard: .*-3.tar"):
        expand_urls(f"{shard_dir}/{schema.TRAIN_PREFIX}-{{1..3}}.tar")


@pytest.mark.parametrize("url, folder, name", [
    ("shards/batch-1.tar", "shards", "batch-1.tar"),
    ("batch-1.tar", ".", "batch-1.tar"),
    ("s3://bucket/shards/batch-1.tar", "s3://bucket/shards", "batch-1.tar"),
    ("s3://bucket/batch-1.tar", "s3://bucket", "batch-1.tar"),
    ("https://host/b/batch-1.tar?X-Amz-Signature=ab%2F.tar&X-Amz-Expires=60", "https://host/b", "batch-1.tar"),
    ("gs://bucket/shards/", "gs://bucket/shards", "")])
def test_shard_folder_and_name_ignore_a_presigned_query(url, folder, name):
    assert shard_folder(url) == folder
    assert shard_basename(url) == name


def _counts(urls, explicit=None):
    return [shard.samples for shard in prepare_shards(urls, explicit=explicit)]


def test_sample_counts_from_manifest_index_scan_or_explicit(shard_dir, tmp_path, caplog):
    import fsspec

    shards = _train_shards(shard_dir)
    manifest = read_manifest(shards[0])
    assert manifest == json.loads((shard_dir / schema.MANIFEST).read_text())
    from_manifest = _counts(shards)
    assert from_manifest == [e["samples"] for e in manifest["shards"][:2]]
    for path in shards:
        shutil.copy(path, tmp_path)
        shutil.copy(schema.index_name(path), tmp_path)
    copies = _train_shards(tmp_path)
    assert read_manifest(copies[0]) is None
    assert _counts(copies) == from_manifest  # from the indexes beside them
    for path in copies:
        os.remove(schema.index_name(path))
    assert _counts(copies) == from_manifest  # counted from the tar headers instead
    assert _counts(copies, explicit=[1, 2]) == [1, 2]
    with pytest.raises(PipelineError, match="2 shards"):
        _counts(copies, explicit=[1])
    remote = f"memory://{tmp_path.name}/batch-1.tar"
    fsspec.filesystem("memory").pipe(remote, open(copies[0], "rb").read())
    with pytest.raises(PipelineError, match="no sample count .*manifest"):
        _counts([remote])  # remote, no manifest, no index: no scan
    fsspec.filesystem("memory").pipe(schema.index_name(remote), open(schema.index_name(shards[0]), "rb").read())
    assert _counts([remote]) == from_manifest[:1]


@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "streamed"])
def test_read_samples_reads_a_range_and_reports_every_sample_a_short_or_cut_shard_lacks(shard_dir, tmp_path, indexed):
    source = _train_shards(shard_dir)[0]
    path = str(tmp_path / os.path.basename(source))
    shutil.copy(source, path)
    copy_backgrounds(shard_dir, tmp_path)
    if indexed:
        shutil.copy(schema.index_name(source), schema.index_name(path))
    whole = list(read_samples(path, 0))  # no stop: to the end, no count to check
    assert all(s.error is None and set(s.members) == set(schema.IMAGE_MEMBERS) for s in whole)
    keys, count = [s.key for s in whole], len(whole)
    assert [s.key for s in read_samples(path, 2, 5)] == keys[2:5]
    over = list(read_samples(path, 0, count + 3))  # a plan that expects 3 samples more
    assert [s.key for s in over] == keys + [f"#{n}" for n in range(count, count + 3)]
    assert all(s.error is None for s in over[:count])
    assert all("expected" in s.error for s in over[count:])
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        per_sample = sum(schema.key_of(member.name) == keys[0] for member in members)
        cut = members[per_sample + 1].offset_data + 100  # inside the second member of sample 1
    (tmp_path / "cut.tar").write_bytes(open(path, "rb").read()[:cut])
    if indexed:
        shutil.copy(schema.index_name(path), tmp_path / schema.index_name("cut.tar"))
    cut_samples = list(read_samples(str(tmp_path / "cut.tar"), 0, count))
    # Sample 0 whole; sample 1, which the shard broke off in, and every later one: lost, one record each.
    assert len(cut_samples) == count and cut_samples[0].error is None
    assert cut_samples[0].members == whole[0].members
    assert all("cut off" in s.error for s in cut_samples[1:])
    named = keys[1:] if indexed else keys[1:2] + [f"#{n}" for n in range(2, count)]
    assert [s.key for s in cut_samples[1:]] == named


def test_retrying_stream_reads_the_file_or_a_range_verbatim_and_names_a_missing_one(shard_dir):
    path = _train_shards(shard_dir)[0]
    data = open(path, "rb").read()
    with RetryingStream(path) as stream:
        assert stream.read() == data
    with open_range(f"file://{path}", start=1000, end=5000) as stream:
        assert stream.read() == data[1000:5000]
    with open_range(path, start=len(data) - 10, end=len(data) + 100) as stream:
        assert stream.read() == data[-10:]
    with pytest.raises(PipelineError, match="cannot read .*missing.tar: FileNotFoundError"):
        RetryingStream(str(shard_dir / "missing.tar"), retries=0)


def test_jpeg_checks_name_the_member(shard_dir):
    sample = next(read_samples(_train_shards(shard_dir)[0], 0, 1))
    check(sample.members)
    padded = dict(sample.members, **{schema.MASK: sample.members[schema.MASK] + b"\0\0\0"})
    check(padded)  # trailing zero padding after EOI is allowed
    cases = {"missing member": {k: v for k, v in sample.members.items() if k != schema.BG},
             "is not a JPEG": dict(sample.members, **{schema.BGFG: b"GIF89a..."}),
             "truncated JPEG": dict(sample.members, **{schema.DEPTH: sample.members[schema.DEPTH][:-50]})}
    for reason, members in cases.items():
        with pytest.raises(BadSample, match=reason):
            check(members)


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_member_names_from_other_tar_writers(shard_dir, tmp_path, tar_format):
    sample = next(read_samples(_train_shards(shard_dir)[0], 0, 1))
    key = "k" * 120  # beyond ustar's 100 characters: needs a GNU or pax header
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w", format=tar_format) as tar:
        for suffix, data in sample.members.items():
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (read,) = read_samples(str(path), 0, 1)
    assert read.key == key and read.members == sample.members


def _child_makes_its_own_client(url, parent_fs):
    from pipeline import clients

    os._exit(0 if clients.client(url)[0] is not parent_fs else 1)


def test_one_client_per_process_and_options_with_s3_checksums_only_when_required(monkeypatch):
    import multiprocessing

    from pipeline import clients

    monkeypatch.delenv("AWS_RESPONSE_CHECKSUM_VALIDATION", raising=False)
    monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    base = "http://127.0.0.1:9/shards"  # nothing is fetched: clients connect on first use
    fs, path = clients.client(f"{base}/batch-1.tar")
    assert path == f"{base}/batch-1.tar"
    assert clients.client(f"{base}/batch-2.tar")[0] is fs  # every shard, index and retry
    assert clients.client(f"{base}/batch-1.tar", {"headers": {"X-Token": "1"}})[0] is not fs
    cached = clients.client(f"simplecache::{base}/batch-1.tar")[0]
    assert clients.client(f"simplecache::{base}/batch-2.tar")[0] is cached  # one cache folder for all
    s3 = clients.client("s3://bucket/batch-1.tar", {"key": "k", "secret": "s"})[0]
    assert s3.config_kwargs == {"response_checksum_validation": "when_required",
                                "request_checksum_calculation": "when_required"}
    strict = {"config_kwargs": {"response_checksum_validation": "when_supported"}}
    mine = clients.client("s3://bucket/batch-1.tar", strict)[0]
    assert mine.config_kwargs["response_checksum_validation"] == "when_supported"  # the user's choice wins
    child = multiprocessing.get_context("fork").Process(target=_child_makes_its_own_client, args=(f"{base}/b.tar", fs))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0  # a forked worker never uses its parent's client
    clients.close_clients()
    assert clients.client(f"{base}/batch-1.tar")[0] is not fs
