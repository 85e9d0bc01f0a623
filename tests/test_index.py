"""Per-sample byte indexes: the converter's, and `python -m pipeline.index` for shards written
by stock webdataset and GNU tar; both agree, point at the samples' first headers, and read back."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import counting  # tests/counting.py: pytest puts this folder on the path
import webdataset

import convert_zips
from pipeline import schema
from pipeline.index import build_index
from pipeline.shardreader import read_samples
from seedzips.storage import sha256_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _index_command(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pipeline.index", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def _read_index(path):
    with open(path, "rb") as f:
        return schema.decode_index(f.read())


def _expected_index(path) -> schema.ShardIndex:
    """The index worked out by tarfile: each key's first header, the end of the last member."""
    keys, offsets, end = [], [], 0
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _ = schema.split_member(member.name)
            if not keys or keys[-1] != key:
                keys.append(key)
                offsets.append(member.offset)
            end = member.offset_data + -(-member.size // 512) * 512
    return schema.ShardIndex(keys, offsets + [end], os.path.getsize(path))


def _samples(path):
    return [(s.key, s.members, s.error) for s in read_samples(str(path), 0)]


def test_the_converter_writes_an_index_beside_each_shard_listed_in_the_manifest(shard_dir):
    manifest = json.loads((shard_dir / schema.MANIFEST).read_text())
    for entry in manifest["shards"]:
        shard = shard_dir / entry["name"]
        index_path = shard_dir / schema.index_name(entry["name"])
        data = index_path.read_bytes()
        assert entry["index"] == {"name": schema.index_name(entry["name"]), "bytes": len(data),
                                  "sha256": sha256_of(index_path)}
        index = _read_index(index_path)
        assert index == _expected_index(shard)
        assert len(index.keys) == entry["samples"] and index.shard_bytes == entry["bytes"]
        assert build_index(str(shard)) == index  # the scan finds what the layout said
        assert schema.encode_index(index) == data


def test_the_command_builds_the_converters_index_byte_for_byte(shard_dir, shard_format, tmp_path):
    names = [schema.shard_name(schema.TRAIN_PREFIX, 1)]
    if shard_format == schema.COMPACT:  # a compact set's backgrounds.tar is indexed the same way
        names.append(schema.BACKGROUNDS)
    for name in names:
        shutil.copy(shard_dir / name, tmp_path)
        result = _index_command(tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / schema.index_name(name)).read_bytes() == (shard_dir / schema.index_name(name)).read_bytes()
        assert f"{len(_read_index(tmp_path / schema.index_name(name)).keys)} samples" in result.stdout


def _stock_webdataset_shard(source, path):
    with webdataset.TarWriter(str(path)) as writer:
        for key, members, _ in _samples(source):
            writer.write({"__key__": key, **members})


def _gnu_tar_shard(source, path):
    folder = path.parent / "files"
    folder.mkdir()
    for key, members, _ in _samples(source):
        for suffix, data in members.items():
            (folder / f"{key}.{suffix}").write_bytes(data)
    # --sort=name keeps a sample's members together; the archive starts with a "./" directory.
    subprocess.run(["tar", "cf", str(path), "--sort=name", "-C", str(folder), "."], check=True)


@pytest.mark.parametrize("writer", [_stock_webdataset_shard, _gnu_tar_shard], ids=["webdataset", "gnu-tar"])
def test_the_command_indexes_shards_of_other_tools_and_the_reader_uses_it(writer, shard_dir, tmp_path):
    source = shard_dir / schema.shard_name(schema.VAL_PREFIX, 1)
    path = tmp_path / "other.tar"
    writer(source, path)
    streamed = _samples(path)
    result = _index_command(path)
    assert result.returncode == 0, result.stderr
    index = _read_index(schema.index_name(path))
    assert index == _expected_index(path)
    assert sorted(index.keys) == sorted(key for key, _, _ in _samples(source))  # GNU tar sorts by name
    assert _samples(path) == streamed  # read by byte range now: the same samples
    middle = len(index.keys) // 2
    assert [s.key for s in read_samples(str(path), middle, middle + 2)] == index.keys[middle:middle + 2]


def test_the_command_reads_remote_shards_and_writes_to_out_when_it_cannot_write_beside(shard_dir, tmp_path):
    names = [schema.shard_name(schema.TRAIN_PREFIX, i) for i in (1, 2)]
    served = tmp_path / "served"
    served.mkdir()
    for name in names:
        shutil.copy(shard_dir / name, served)
    with counting.http_server(served) as server:
        beside = _index_command(f"{server.url}/{names[0]}")
        out = _index_command(f"{server.url}/{{{','.join(n.removesuffix('.tar') for n in names)}}}.tar",
                             "--out", tmp_path / "indexes")
    assert beside.returncode == 1 and beside.stderr.count("\n") == 1
    assert f"cannot write {server.url}/{names[0]}{schema.INDEX_SUFFIX}" in beside.stderr
    assert "--out" in beside.stderr
    assert out.returncode == 0, out.stderr
    for name in names:
        assert (tmp_path / "indexes" / schema.index_name(name)).read_bytes() == \
            (shard_dir / schema.index_name(name)).read_bytes()


def test_the_command_fails_in_one_line_on_a_file_that_is_not_a_tar(shard_dir, tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(json.dumps({"not": "a tar"}).encode() * 100)
    result = _index_command(bad)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and str(bad) in result.stderr and "bad tar header at byte 0" in result.stderr
    assert not os.path.exists(schema.index_name(bad))
    usage = _index_command("--help")
    assert usage.returncode == 0 and "--out" in usage.stdout and "pipeline.index" in usage.stdout


def test_a_missing_or_damaged_index_makes_the_converter_rewrite_its_shard(seed_dataset, shard_dir, shard_options,
                                                                          tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    os.remove(out / schema.index_name(schema.shard_name(schema.TRAIN_PREFIX, 1)))
    (out / schema.index_name(schema.shard_name(schema.TRAIN_PREFIX, 2))).write_bytes(b"{}")
    shards = [out / schema.shard_name(schema.TRAIN_PREFIX, i) for i in (1, 2)] + [
        out / schema.shard_name(schema.VAL_PREFIX, 1)]
    before = [os.stat(shard).st_ino for shard in shards]  # a rewrite replaces the file: a new inode
    convert_zips.convert(seed_dataset[0], out, **shard_options)
    after = [os.stat(shard).st_ino for shard in shards]
    assert after[0] != before[0] and after[1] != before[1]  # index missing, index damaged: rewritten
    assert after[2] == before[2]  # its index was intact: not rewritten
    for name in os.listdir(shard_dir):
        assert (out / name).read_bytes() == (shard_dir / name).read_bytes(), name
