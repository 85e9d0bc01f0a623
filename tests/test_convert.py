"""convert_zips.py on generated data, in both shard set formats: round trip, splits, readers
(GNU tar, stock webdataset, HF datasets, the README's join), reproducibility, resume, a format switch."""

import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import webdataset

import convert_zips
from helpers import ROOT, assert_same_folders, read_manifest
from pipeline import schema
from seedzips import compact, storage, tarwriter
from seedzips.index import MEMBER_OF_FOLDER


def format_options(shard_options: dict, shard_format: str) -> dict:
    """shard_options for a conversion in `shard_format`, whichever format shard_dir has."""
    return {**shard_options, "self_contained": shard_format == schema.SELF_CONTAINED}


@pytest.fixture(scope="module")
def shard_sets(seed_dataset, shard_options, tmp_path_factory) -> dict:
    """{format: folder} of the seed_dataset converted in each format with shard_options."""
    folders = {}
    for shard_format in schema.FORMATS:
        folders[shard_format] = tmp_path_factory.mktemp(f"shards-{shard_format}")
        convert_zips.convert(seed_dataset[0], folders[shard_format], **format_options(shard_options, shard_format))
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


def test_manifest_describes_every_file(converted, shard_options):
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
    assert manifest["options"]["val_fraction"] == shard_options["val_fraction"]


def _tars(out) -> list:
    """Every tar of a set, backgrounds.tar included, as {name: {key: {suffix: bytes}}}."""
    tars = _samples(out)
    if _format(out) == schema.COMPACT:
        tars[schema.BACKGROUNDS] = {key: {schema.BG: data} for key, data in _backgrounds(out).items()}
    return tars


def test_stock_webdataset_and_gnu_tar_read_every_tar(converted):
    _, out = converted
    for name, samples in _tars(out).items():
        path = os.path.join(out, name)
        read = {s["__key__"]: s for s in webdataset.WebDataset(path, shardshuffle=False, empty_check=False)}
        assert read.keys() == samples.keys()
        assert all({suffix: read[k][suffix] for suffix in members} == members for k, members in samples.items())
        listing = subprocess.run(["tar", "-tf", path], check=True, capture_output=True, text=True)
        assert listing.stdout.split() == [n for n, _ in _read_shard(path)]
        assert listing.stderr == ""


def test_hf_datasets_reads_every_tar_from_local_files(converted, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    _, out = converted
    for name, samples in _tars(out).items():
        loaded = datasets.load_dataset("webdataset", data_files={"train": [str(out / name)]}, split="train",
                                       cache_dir=str(tmp_path / "hf" / name))
        suffixes = [c for c in loaded.column_names if not c.startswith("__")]
        for suffix in set(suffixes) & set(schema.IMAGE_MEMBERS):  # the JPEGs' own bytes, not pictures
            loaded = loaded.cast_column(suffix, datasets.Image(decode=False))
        read = {row["__key__"]: row for row in loaded}
        assert read.keys() == samples.keys()
        for key, members in samples.items():
            assert set(suffixes) == set(members)
            for suffix, data in members.items():
                if suffix == schema.META:
                    assert read[key][suffix] == json.loads(data)
                else:
                    assert read[key][suffix]["bytes"] == data


def _readme_join_snippet() -> str:
    """The README's stock-webdataset join: the python block that defines with_backgrounds."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (snippet,) = [block for block in blocks if "def with_backgrounds" in block]
    return snippet


def test_the_readme_s_stock_webdataset_join_gives_the_self_contained_samples(shard_sets, tmp_path, monkeypatch):
    compact_set, whole = shard_sets[schema.COMPACT], shard_sets[schema.SELF_CONTAINED]
    monkeypatch.chdir(tmp_path)
    os.symlink(compact_set, "shards")  # where the README's lines look
    namespace = {}
    exec(_readme_join_snippet(), namespace)  # noqa: S102 (the project's own README)
    for name, samples in _samples(whole).items():
        joined = {s["__key__"]: s for s in namespace["with_backgrounds"](f"shards/{name}")}
        assert joined.keys() == samples.keys()
        for key, members in samples.items():
            assert {suffix: joined[key][suffix] for suffix in members if suffix != schema.META} == \
                {suffix: data for suffix, data in members.items() if suffix != schema.META}


def test_headers_are_tarfiles_own_ustar_headers():
    for name, size in (("1_bg_1_fg.bg.jpg", 0), ("100_bg_2000_fg.json", 511), ("x" * 100, 8 ** 11 - 1)):
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o644, 0, "", ""
        assert tarwriter.header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_two_runs_are_byte_identical_whatever_the_workers(seed_dataset, converted, shard_options, tmp_path):
    shard_format, out = converted
    convert_zips.convert(seed_dataset[0], tmp_path, **{**format_options(shard_options, shard_format), "workers": 1})
    assert_same_folders(out, tmp_path)


def _killed_after_first_shard(dataset, out, options) -> None:
    """Run in a forked child: convert, and SIGKILL this process once the manifest lists one shard."""
    write_progress = storage.Target.write_progress

    def write_then_maybe_die(target, record):
        write_progress(target, record)
        if record["shards"]:
            os.kill(os.getpid(), signal.SIGKILL)

    storage.Target.write_progress = write_then_maybe_die
    convert_zips.convert(dataset, out, **options)


def test_a_killed_run_resumes_to_the_uninterrupted_result(seed_dataset, converted, shard_options, tmp_path):
    shard_format, out = converted
    options = format_options(shard_options, shard_format)
    child = multiprocessing.get_context("fork").Process(target=_killed_after_first_shard,
                                                        args=(seed_dataset[0], tmp_path, options))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    partial = read_manifest(tmp_path)
    assert partial["complete"] is False and len(partial["shards"]) == 1
    assert len(read_manifest(out)["shards"]) > 1
    kept = [partial["shards"][0]["name"]] + ([schema.BACKGROUNDS] if shard_format == schema.COMPACT else [])
    inodes = [os.stat(tmp_path / name).st_ino for name in kept]
    convert_zips.convert(seed_dataset[0], tmp_path, **options)
    assert [os.stat(tmp_path / name).st_ino for name in kept] == inodes  # kept, not rewritten
    assert_same_folders(out, tmp_path)


def test_damaged_files_are_rewritten_and_other_options_start_over(seed_dataset, converted, shard_options,
                                                                  tmp_path, capsys):
    shard_format, made = converted
    options = format_options(shard_options, shard_format)
    out = tmp_path / "shards"
    shutil.copytree(made, out)
    shard = schema.shard_name(schema.TRAIN_PREFIX, 1)
    damaged = [shard] + ([schema.BACKGROUNDS, schema.sources_name(schema.shard_name(schema.VAL_PREFIX, 1))]
                         if shard_format == schema.COMPACT else [])
    for name in damaged:
        with open(out / name, "r+b") as f:
            f.write(b"damaged")
    convert_zips.convert(seed_dataset[0], out, **options)
    assert_same_folders(made, out)
    convert_zips.convert(seed_dataset[0], out, **{**options, "shards": 3, "seed": 1})
    assert "starting over" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    convert_zips.convert(seed_dataset[0], fresh, **{**options, "shards": 3, "seed": 1})
    assert_same_folders(fresh, out)


def test_a_run_in_the_other_format_starts_over_and_leaves_none_of_the_first(seed_dataset, shard_sets,
                                                                            shard_options, tmp_path, capsys):
    out = tmp_path / "shards"
    shutil.copytree(shard_sets[schema.COMPACT], out)
    argv = ["--dataset", str(seed_dataset[0]), "--out", str(out), "--val-fraction", str(shard_options["val_fraction"]),
            "--seed", str(shard_options["seed"]), "--workers", str(shard_options["workers"])]
    for flags, expected in ((["--self-contained"], schema.SELF_CONTAINED), ([], schema.COMPACT)):
        assert convert_zips.main(argv + flags) == 0
        assert "starting over" in capsys.readouterr().err
        assert_same_folders(shard_sets[expected], out)


def test_the_write_side_never_imports_torch():
    code = ("import sys, convert_zips, seedzips.index, seedzips.synthetic, seedzips.tarwriter, seedzips.compact; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
