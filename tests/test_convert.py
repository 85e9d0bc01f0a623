"""convert_zips.py on generated data, in both shard set formats: round trip, splits, the exact
tar bytes, reproducibility (resume: test_convert_resume.py, readers: test_convert_readers.py)."""

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import convert_zips
from conftest import SHARD_OPTIONS
from helpers import assert_same_folders, read_manifest
from pipeline import schema
from seedzips import compact, storage, tarwriter
from seedzips.index import MEMBER_OF_FOLDER


def convert_options(shard_format: str) -> dict:
    """convert() keywords: SHARD_OPTIONS in `shard_format`. These tests convert in each format
    themselves, apart from the shard_dir and shard_options fixtures and their format."""
    return {**SHARD_OPTIONS, "self_contained": shard_format == schema.SELF_CONTAINED}


@pytest.fixture(scope="module")
def shard_sets(seed_dataset, tmp_path_factory) -> dict:
    """{format: folder} of the seed_dataset converted in each format with convert_options."""
    folders = {}
    for shard_format in schema.FORMATS:
        folders[shard_format] = tmp_path_factory.mktemp(f"shards-{shard_format}")
        convert_zips.convert(seed_dataset[0], folders[shard_format], **convert_options(shard_format))
    return folders


@pytest.fixture(params=schema.FORMATS)
def converted(request, shard_sets) -> tuple:
    """(format, folder) of the seed_dataset converted in it, once for each format."""
    return request.param, shard_sets[request.param]


def _read_shard(path) -> list:
    """[(member name, bytes)] in archive order."""
    with tarfile.open(path) as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive.getmembers()]


def _format(out) -> str:
    return read_manifest(out)["options"]["format"]


def _samples(out) -> dict:
    """{shard name: {key: {suffix: bytes}}} of every shard in the manifest, checking that each
    sample's members are consecutive and are its format's, in order."""
    members = schema.SAMPLE_MEMBERS if _format(out) == schema.COMPACT else schema.MEMBERS
    shards = {}
    for entry in read_manifest(out)["shards"]:
        samples, order = {}, []
        for name, data in _read_shard(os.path.join(out, entry["name"])):
            key, suffix = schema.split_member(name)
            if not order or order[-1] != key:
                order.append(key)
            samples.setdefault(key, {})[suffix] = data
        assert len(order) == len(samples), f"members of one sample are not consecutive in {entry['name']}"
        assert all(list(found) == list(members) for found in samples.values()), entry["name"]
        shards[entry["name"]] = samples
    return shards


def _backgrounds(out) -> dict:
    """{background key: bytes} of a compact set's backgrounds.tar, one member per key."""
    members = _read_shard(os.path.join(out, schema.BACKGROUNDS))
    assert all(schema.split_member(name)[1] == schema.BG for name, _ in members)
    backgrounds = {schema.key_of(name): data for name, data in members}
    assert len(backgrounds) == len(members)
    return backgrounds


def _provenance(out) -> dict:
    """{key: the KEY.json record}: from the json members, or from a compact set's sources files."""
    if _format(out) == schema.SELF_CONTAINED:
        return {key: json.loads(members[schema.META])
                for samples in _samples(out).values() for key, members in samples.items()}
    records = {}
    for entry in read_manifest(out)["shards"]:
        with open(os.path.join(out, schema.sources_name(entry["name"]))) as f:
            sources = json.load(f)
        assert sources["format"] == compact.SOURCES_FORMAT
        records.update(sources["samples"])
    return records


def _background_of(out, key: str, members: dict) -> bytes:
    if _format(out) == schema.SELF_CONTAINED:
        return members[schema.BG]
    return _backgrounds(out)[schema.background_key_of(key)]


def test_round_trip_keeps_every_complete_sample_once_with_its_bytes(seed_dataset, converted):
    dataset, summary = seed_dataset
    _, out = converted
    shards = _samples(out)
    seen = [key for samples in shards.values() for key in samples]
    assert len(seen) == len(set(seen))
    incomplete = set(summary["faults"]["missing_depth"])
    assert set(seen) == {key for z in summary["zips"] for key in z["keys"]} - incomplete
    by_key = {key: samples[key] for samples in shards.values() for key in samples}
    for entry in summary["zips"]:
        with zipfile.ZipFile(os.path.join(dataset, schema.ZIP_DIR, entry["name"])) as archive:
            for name in archive.namelist():
                folder = os.path.basename(os.path.dirname(name))
                if folder in schema.SEED_FOLDERS.values() and not name.endswith("/") \
                        and schema.key_of(name) not in incomplete:
                    assert by_key[schema.key_of(name)][MEMBER_OF_FOLDER[folder]] == archive.read(name), name
    provenance = _provenance(out)
    assert provenance.keys() == by_key.keys()
    for key, members in by_key.items():
        with open(os.path.join(dataset, schema.BG_DIR, schema.bg_name(schema.background_id(key))), "rb") as f:
            assert _background_of(out, key, members) == f.read()
        assert provenance[key]["bg_id"] == schema.background_id(key)
        assert provenance[key]["zip"] == next(z["name"] for z in summary["zips"] if key in z["keys"])
    for fault in ("truncated", "double_ext"):  # passed through: the reader, not the converter, judges JPEGs
        assert set(summary["faults"][fault]) <= set(by_key)
    truncated = summary["faults"]["truncated"][0]
    assert not by_key[truncated][schema.BGFG].endswith(b"\xff\xd9")
    assert provenance[summary["faults"]["double_ext"][0]]["sources"][schema.BGFG].endswith(".jpg.jpg")


def test_a_compact_set_stores_each_background_once_and_today_s_json_in_its_sources(seed_dataset, shard_sets):
    compact_set, whole = shard_sets[schema.COMPACT], shard_sets[schema.SELF_CONTAINED]
    samples, whole_samples = _samples(compact_set), _samples(whole)
    assert samples.keys() == whole_samples.keys()
    used = sorted({schema.background_id(key) for shard in samples.values() for key in shard})
    names = [name for name, _ in _read_shard(compact_set / schema.BACKGROUNDS)]
    assert names == [f"{schema.background_key(bg_id)}.{schema.BG}" for bg_id in used]  # train and val, once each
    backgrounds = _backgrounds(compact_set)
    for name, shard in samples.items():
        with open(compact_set / schema.sources_name(name)) as f:
            sources = json.load(f)["samples"]
        assert sources.keys() == shard.keys()
        for key, members in shard.items():
            whole_members = whole_samples[name][key]
            assert members == {suffix: whole_members[suffix] for suffix in schema.SAMPLE_MEMBERS}
            assert backgrounds[schema.background_key_of(key)] == whole_members[schema.BG]
            assert compact.encode(sources[key]) == whole_members[schema.META]  # byte for byte today's json


def _tarfile_archive(members: list) -> bytes:
    """What Python's tarfile writes of the (name, bytes) members with the converter's header fields."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime, info.uname, info.gname = len(data), 0o644, 0, "", ""
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_every_tar_is_tarfile_s_archive_of_its_members_and_its_index_is_exact(converted):
    _, out = converted
    tars = [e["name"] for e in read_manifest(out)["shards"]]
    tars += [schema.BACKGROUNDS] if _format(out) == schema.COMPACT else []
    for name in tars:
        data = (out / name).read_bytes()
        assert data == _tarfile_archive(_read_shard(out / name)), name
        index = schema.decode_index((out / schema.index_name(name)).read_bytes())
        with tarfile.open(out / name) as archive:
            starts = {}
            for member in archive.getmembers():
                starts.setdefault(schema.key_of(member.name), member.offset)
        assert index.keys == list(starts) and index.offsets[:-1] == list(starts.values())
        assert index.shard_bytes == len(data) and data[index.offsets[-1]:] == bytes(len(data) - index.offsets[-1])


def test_incomplete_samples_are_listed_with_zip_and_reason(seed_dataset, converted):
    _, summary = seed_dataset
    missing = summary["faults"]["missing_depth"][0]
    zip_name = next(z["name"] for z in summary["zips"] if missing in z["keys"])
    manifest = read_manifest(converted[1])
    assert manifest["skipped"] == [{"key": missing, "zip": zip_name, "reason": f"missing {schema.DEPTH_DIR}"}]
    assert manifest["totals"]["skipped"] == 1
    assert manifest["totals"]["samples"] == summary["samples"] - 1


def test_member_names_and_keys(converted):
    for samples in _samples(converted[1]).values():
        for key in samples:
            assert "." not in key and schema.background_id(key) > 0


def test_validation_holds_out_whole_backgrounds_and_shards_mix_zips(seed_dataset, converted):
    _, summary = seed_dataset
    _, out = converted
    manifest = read_manifest(out)
    shards = _samples(out)
    splits = {e["name"]: e["split"] for e in manifest["shards"]}
    bgs = {split: {schema.background_id(k) for n, s in shards.items() if splits[n] == split for k in s}
           for split in (schema.TRAIN_SPLIT, schema.VAL_SPLIT)}
    assert len(manifest["val_backgrounds"]) == 1
    assert bgs[schema.VAL_SPLIT] == set(manifest["val_backgrounds"])
    assert not bgs[schema.TRAIN_SPLIT] & bgs[schema.VAL_SPLIT]
    val_keys = {k for n, s in shards.items() if splits[n] == schema.VAL_SPLIT for k in s}
    all_keys = {k for z in summary["zips"] for k in z["keys"]} - set(summary["faults"]["missing_depth"])
    assert val_keys == {k for k in all_keys if schema.background_id(k) in bgs[schema.VAL_SPLIT]}
    train = [n for n in shards if splits[n] == schema.TRAIN_SPLIT]
    assert train == [schema.shard_name(schema.TRAIN_PREFIX, i) for i in range(1, len(summary["zips"]) + 1)]
    provenance = _provenance(out)
    for name in train:
        zips = {provenance[key]["zip"] for key in shards[name]}
        assert len(zips) == len(summary["zips"]), f"{name} holds samples of only {zips}"


def _assert_record(out, record: dict, name: str) -> None:
    """A manifest's {name, bytes, sha256} record is what the folder holds."""
    path = os.path.join(out, name)
    assert record["name"] == name
    assert (record["bytes"], record["sha256"]) == (os.path.getsize(path), storage.sha256_of(path))


def test_manifest_describes_every_file(converted):
    shard_format, out = converted
    manifest = read_manifest(out)
    assert manifest["complete"] is True and manifest["version"] == 3
    assert manifest["options"]["format"] == shard_format
    files = {schema.MANIFEST}
    for entry in manifest["shards"]:
        _assert_record(out, entry, entry["name"])
        _assert_record(out, entry["index"], schema.index_name(entry["name"]))
        files |= {entry["name"], schema.index_name(entry["name"])}
        members = schema.MEMBERS if shard_format == schema.SELF_CONTAINED else schema.SAMPLE_MEMBERS
        assert len(_read_shard(out / entry["name"])) == entry["samples"] * len(members)
        if shard_format == schema.COMPACT:
            _assert_record(out, entry["sources"], schema.sources_name(entry["name"]))
            files.add(schema.sources_name(entry["name"]))
        else:
            assert "sources" not in entry
    if shard_format == schema.COMPACT:
        backgrounds = manifest["backgrounds"]
        _assert_record(out, backgrounds, schema.BACKGROUNDS)
        _assert_record(out, backgrounds["index"], schema.index_name(schema.BACKGROUNDS))
        assert backgrounds["samples"] == len(_backgrounds(out))
        assert manifest["totals"]["backgrounds_bytes"] == backgrounds["bytes"]
        files |= {schema.BACKGROUNDS, schema.index_name(schema.BACKGROUNDS)}
    else:
        assert "backgrounds" not in manifest and manifest["totals"]["backgrounds_bytes"] == 0
    assert set(os.listdir(out)) == files
    assert manifest["totals"]["samples"] == sum(e["samples"] for e in manifest["shards"])
    assert manifest["totals"]["bytes"] == sum(e["bytes"] for e in manifest["shards"])
    assert manifest["options"]["val_fraction"] == SHARD_OPTIONS["val_fraction"]


def test_headers_are_tarfiles_own_ustar_headers():
    for name, size in (("1_bg_1_fg.bg.jpg", 0), ("100_bg_2000_fg.json", 511), ("x" * 100, 8 ** 11 - 1)):
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o644, 0, "", ""
        assert tarwriter.header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_two_runs_are_byte_identical_whatever_the_workers(seed_dataset, converted, tmp_path):
    shard_format, out = converted
    convert_zips.convert(seed_dataset[0], tmp_path, **{**convert_options(shard_format), "workers": 1})
    assert_same_folders(out, tmp_path)


def test_the_write_side_never_imports_torch():
    code = ("import sys, convert_zips, seedzips.index, seedzips.synthetic, seedzips.tarwriter, seedzips.compact; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
