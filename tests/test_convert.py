"""convert_zips.py on generated data: round trip, splits, readers, reproducibility, resume."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import webdataset

import convert_zips
from helpers import assert_same_folders, read_manifest
from pipeline import schema
from seedzips import storage, tarwriter
from seedzips.index import MEMBER_OF_FOLDER


def _read_shard(path) -> list:
    """[(member name, bytes)] in archive order."""
    with tarfile.open(path) as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive.getmembers()]


def _samples(out) -> dict:
    """{shard name: {key: {suffix: bytes}}} of every shard in the manifest, checking member order."""
    shards = {}
    for entry in read_manifest(out)["shards"]:
        samples, order = {}, []
        for name, data in _read_shard(os.path.join(out, entry["name"])):
            key, suffix = schema.split_member(name)
            if not order or order[-1] != key:
                order.append(key)
            samples.setdefault(key, {})[suffix] = data
        assert len(order) == len(samples), f"members of one sample are not consecutive in {entry['name']}"
        assert all(list(members) == list(schema.MEMBERS) for members in samples.values())
        shards[entry["name"]] = samples
    return shards


def test_round_trip_keeps_every_complete_sample_once_with_its_bytes(seed_dataset, shard_dir):
    dataset, summary = seed_dataset
    shards = _samples(shard_dir)
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
    for key, members in by_key.items():
        with open(os.path.join(dataset, schema.BG_DIR, schema.bg_name(schema.background_id(key))), "rb") as f:
            assert members[schema.BG] == f.read()
        meta = json.loads(members[schema.META])
        assert meta["bg_id"] == schema.background_id(key)
        assert meta["zip"] == next(z["name"] for z in summary["zips"] if key in z["keys"])
    for fault in ("truncated", "double_ext"):  # passed through: the reader, not the converter, judges JPEGs
        assert set(summary["faults"][fault]) <= set(by_key)
    truncated = summary["faults"]["truncated"][0]
    assert not by_key[truncated][schema.BGFG].endswith(b"\xff\xd9")
    double = json.loads(by_key[summary["faults"]["double_ext"][0]][schema.META])
    assert double["sources"][schema.BGFG].endswith(".jpg.jpg")


def test_incomplete_samples_are_listed_with_zip_and_reason(seed_dataset, shard_dir):
    _, summary = seed_dataset
    missing = summary["faults"]["missing_depth"][0]
    zip_name = next(z["name"] for z in summary["zips"] if missing in z["keys"])
    manifest = read_manifest(shard_dir)
    assert manifest["skipped"] == [{"key": missing, "zip": zip_name, "reason": f"missing {schema.DEPTH_DIR}"}]
    assert manifest["totals"]["skipped"] == 1
    assert manifest["totals"]["samples"] == summary["samples"] - 1


def test_member_names_and_keys(shard_dir):
    for samples in _samples(shard_dir).values():
        for key in samples:
            assert "." not in key and schema.background_id(key) > 0


def test_validation_holds_out_whole_backgrounds_and_shards_mix_zips(seed_dataset, shard_dir):
    _, summary = seed_dataset
    manifest = read_manifest(shard_dir)
    shards = _samples(shard_dir)
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
    for name in train:
        zips = {json.loads(members[schema.META])["zip"] for members in shards[name].values()}
        assert len(zips) == len(summary["zips"]), f"{name} holds samples of only {zips}"


def test_manifest_describes_every_shard(shard_dir, shard_options):
    manifest = read_manifest(shard_dir)
    assert manifest["complete"] is True
    for entry in manifest["shards"]:
        path = os.path.join(shard_dir, entry["name"])
        assert os.path.getsize(path) == entry["bytes"]
        assert storage.sha256_of(path) == entry["sha256"]
        assert len(_read_shard(path)) == entry["samples"] * len(schema.MEMBERS)
    assert manifest["totals"]["samples"] == sum(e["samples"] for e in manifest["shards"])
    assert manifest["totals"]["bytes"] == sum(e["bytes"] for e in manifest["shards"])
    assert manifest["options"]["val_fraction"] == shard_options["val_fraction"]


def test_stock_webdataset_and_gnu_tar_read_every_shard(shard_dir):
    expected = _samples(shard_dir)
    for name, samples in expected.items():
        path = os.path.join(shard_dir, name)
        read = {s["__key__"]: s for s in webdataset.WebDataset(path, shardshuffle=False, empty_check=False)}
        assert read.keys() == samples.keys()
        assert all(read[k][schema.BGFG] == samples[k][schema.BGFG] for k in samples)
        listing = subprocess.run(["tar", "-tf", path], check=True, capture_output=True, text=True)
        assert listing.stdout.split() == [n for n, _ in _read_shard(path)]
        assert listing.stderr == ""


def test_headers_are_tarfiles_own_ustar_headers():
    for name, size in (("1_bg_1_fg.bg.jpg", 0), ("100_bg_2000_fg.json", 511), ("x" * 100, 8 ** 11 - 1)):
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.uname, info.gname = size, 0o644, 0, "", ""
        assert tarwriter.header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def test_two_runs_are_byte_identical_whatever_the_workers(seed_dataset, shard_dir, shard_options, tmp_path):
    convert_zips.convert(seed_dataset[0], tmp_path, **{**shard_options, "workers": 1})
    assert_same_folders(shard_dir, tmp_path)


def _killed_after_first_shard(dataset, out, shard_options) -> None:
    """Run in a forked child: convert, and SIGKILL this process once the manifest lists one shard."""
    write_progress = storage.Target.write_progress

    def write_then_maybe_die(target, record):
        write_progress(target, record)
        if record["shards"]:
            os.kill(os.getpid(), signal.SIGKILL)

    storage.Target.write_progress = write_then_maybe_die
    convert_zips.convert(dataset, out, **shard_options)


def test_a_killed_run_resumes_to_the_uninterrupted_result(seed_dataset, shard_dir, shard_options, tmp_path):
    child = multiprocessing.get_context("fork").Process(target=_killed_after_first_shard,
                                                        args=(seed_dataset[0], tmp_path, shard_options))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    partial = read_manifest(tmp_path)
    assert partial["complete"] is False and len(partial["shards"]) == 1
    done = os.path.join(tmp_path, partial["shards"][0]["name"])
    assert len(read_manifest(shard_dir)["shards"]) > 1
    inode = os.stat(done).st_ino
    convert_zips.convert(seed_dataset[0], tmp_path, **shard_options)
    assert os.stat(done).st_ino == inode  # the finished shard was kept, not rewritten
    assert_same_folders(shard_dir, tmp_path)


def test_a_damaged_shard_is_rewritten_and_other_options_start_over(seed_dataset, shard_dir, shard_options,
                                                                   tmp_path, capsys):
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    with open(out / schema.shard_name(schema.TRAIN_PREFIX, 1), "r+b") as f:
        f.write(b"damaged")
    convert_zips.convert(seed_dataset[0], out, **shard_options)
    assert_same_folders(shard_dir, out)
    convert_zips.convert(seed_dataset[0], out, **{**shard_options, "shards": 3, "seed": 1})
    assert "starting over" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    convert_zips.convert(seed_dataset[0], fresh, **{**shard_options, "shards": 3, "seed": 1})
    assert_same_folders(fresh, out)


def test_the_write_side_never_imports_torch():
    code = ("import sys, convert_zips, seedzips.index, seedzips.synthetic, seedzips.tarwriter; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
