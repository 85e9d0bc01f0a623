"""convert_zips.py re-run in both shard set formats: after a SIGKILL, over damaged files, with
other options, in the other format."""

import multiprocessing
import os
import shutil
import signal

import convert_zips
from conftest import SHARD_OPTIONS
from helpers import assert_same_folders, read_manifest
from pipeline import schema
from seedzips import storage
from test_convert import convert_options, converted, shard_sets  # noqa: F401 (fixtures)


def _killed_after_first_shard(dataset, out, options) -> None:
    """Run in a forked child: convert, and SIGKILL this process once the manifest lists one shard."""
    write_progress = storage.Target.write_progress

    def write_then_maybe_die(target, record):
        write_progress(target, record)
        if record["shards"]:
            os.kill(os.getpid(), signal.SIGKILL)

    storage.Target.write_progress = write_then_maybe_die
    convert_zips.convert(dataset, out, **options)


def test_a_killed_run_resumes_to_the_uninterrupted_result(seed_dataset, converted, tmp_path):
    shard_format, out = converted
    options = convert_options(shard_format)
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


def test_damaged_files_are_rewritten_and_other_options_start_over(seed_dataset, converted,
                                                                  tmp_path, capsys):
    shard_format, made = converted
    options = convert_options(shard_format)
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


def test_a_run_in_the_other_format_starts_over_and_leaves_none_of_the_first(seed_dataset, shard_sets, tmp_path, capsys):
    out = tmp_path / "shards"
    shutil.copytree(shard_sets[schema.COMPACT], out)
    argv = ["--dataset", str(seed_dataset[0]), "--out", str(out), "--val-fraction", str(SHARD_OPTIONS["val_fraction"]),
            "--seed", str(SHARD_OPTIONS["seed"]), "--workers", str(SHARD_OPTIONS["workers"])]
    for flags, expected in ((["--self-contained"], schema.SELF_CONTAINED), ([], schema.COMPACT)):
        assert convert_zips.main(argv + flags) == 0
        assert "starting over" in capsys.readouterr().err
        assert_same_folders(shard_sets[expected], out)
