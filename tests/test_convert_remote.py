"""convert_zips.py straight to `rclone serve s3` on 127.0.0.1 and from it: the objects are the
local conversion's bytes, training reads them back by range, a SIGKILL in mid-upload and a
re-run give the uninterrupted dataset, a remote dataset's zips are fetched once."""

import json
import os
import signal
import subprocess
import sys

import pytest
import s3fs
import counting
import servers

import convert_zips
import train
from helpers import ROOT, TINY, assert_same_folders, read_manifest
from pipeline import schema
from seedzips import storage, synthetic
from remote import ACCESS_KEY, BUCKET, SECRET_KEY, assert_loopback
from test_convert import converted, shard_sets  # noqa: F401 (fixtures)

PREFIX = "shards"
URL = f"s3://{BUCKET}/{PREFIX}"


def _storage_args(endpoint: str) -> list[str]:
    options = {"key": ACCESS_KEY, "secret": SECRET_KEY,
               "client_kwargs": json.dumps({"endpoint_url": assert_loopback(endpoint)})}
    return [arg for key, value in options.items() for arg in ("--storage-option", f"{key}={value}")]


def _convert_args(dataset, out, endpoint, shard_options, shard_format=schema.COMPACT) -> list[str]:
    return ["--dataset", str(dataset), "--out", out, "--val-fraction", str(shard_options["val_fraction"]),
            "--seed", str(shard_options["seed"]), "--workers", str(shard_options["workers"]),
            *(["--self-contained"] if shard_format == schema.SELF_CONTAINED else []), *_storage_args(endpoint)]


@pytest.fixture
def s3(aws_env, tmp_path):
    """(the server, its root folder: each sub-folder a bucket), empty; nothing is put there by hand."""
    root = tmp_path / "s3"
    root.mkdir()
    with servers.rclone_s3(root, ACCESS_KEY, SECRET_KEY) as server:
        yield server, root


def test_conversion_to_s3_is_the_local_one_and_trains_by_range(s3, seed_dataset, converted, shard_options,
                                                                tmp_path, capsys):
    server, root = s3
    shard_format, made = converted
    assert convert_zips.main(_convert_args(seed_dataset[0], URL, server.url, shard_options, shard_format)) == 0
    assert URL in capsys.readouterr().out
    assert_same_folders(made, root / BUCKET / PREFIX)  # no progress record, no temporary left
    assert not os.path.exists(storage.staging_folder(URL, "shards"))
    run = tmp_path / "run"
    with counting.proxy(server.url) as (proxy, sent):
        status = train.main(["--shards", f"{URL}/batch-{{1..2}}.tar", "--out", str(run), *TINY, "--steps", "3",
                             "--val-every", "3", "--save-every", "3", *_storage_args(proxy)])
        fetched = sent()
    assert status == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["kind"] == "train"][-1] == 3
    assert [line["step"] for line in lines if line["kind"] == "val"] == [3]  # val-1.tar, found from the manifest
    # Ranged reads of the samples each loader is given, not shard after shard fetched whole by
    # every loader (training and validation each read the manifest and indexes they need).
    everything = sum(f.stat().st_size for f in (root / BUCKET / PREFIX).iterdir())
    assert 0 < fetched <= 2 * everything, (fetched, everything)


def test_a_sigkill_in_mid_upload_and_a_rerun_give_the_uninterrupted_dataset(s3, seed_dataset, converted,
                                                                           shard_options, tmp_path):
    server, root = s3
    shard_format, made = converted
    folder = root / BUCKET / PREFIX
    options = {**shard_options, "workers": 1}  # shards finish in plan order: batch-1, batch-2, val-1
    with servers.stalling_proxy(server.url, f"PUT /{BUCKET}/{PREFIX}/batch-2.tar".encode()) as (proxy, held):
        child = subprocess.Popen([sys.executable, "convert_zips.py",
                                  *_convert_args(seed_dataset[0], URL, proxy, options, shard_format)],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert held.wait(timeout=120), "the converter never uploaded batch-2.tar"
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    progress = json.loads((folder / storage.PROGRESS).read_text())
    assert progress["complete"] is False and [e["name"] for e in progress["shards"]] == ["batch-1.tar"]
    assert not (folder / schema.MANIFEST).exists()  # no reader takes this for a dataset
    assert not (folder / "batch-2.tar").exists()  # the cut-off upload left nothing
    kept = ["batch-1.tar"] + ([schema.BACKGROUNDS, schema.sources_name("batch-1.tar")]
                              if shard_format == schema.COMPACT else [])
    inodes = [(folder / name).stat().st_ino for name in kept]
    rerun = [sys.executable, "convert_zips.py", *_convert_args(seed_dataset[0], URL, server.url, options, shard_format)]
    done = subprocess.run(rerun, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(1 already done)" in done.stdout
    assert [(folder / name).stat().st_ino for name in kept] == inodes  # verified where they were, not uploaded again
    assert_same_folders(made, folder)
    assert read_manifest(folder) == read_manifest(made)


def test_a_damaged_object_is_uploaded_again(s3, seed_dataset, converted, shard_options):
    server, root = s3
    shard_format, made = converted
    args = _convert_args(seed_dataset[0], URL, server.url, shard_options, shard_format)
    assert convert_zips.main(args) == 0
    damaged = ["val-1.tar"] + ([schema.BACKGROUNDS] if shard_format == schema.COMPACT else [])
    for name in damaged:
        with open(root / BUCKET / PREFIX / name, "r+b") as f:  # same size, other bytes
            f.write(b"damaged")
    assert convert_zips.main(args) == 0
    assert_same_folders(made, root / BUCKET / PREFIX)


@pytest.fixture(scope="module")
def larger_dataset(tmp_path_factory):
    """3 zips of 16 samples at 128 px (~60 kB each, ten times their central directories)."""
    path = tmp_path_factory.mktemp("larger") / "seed"
    synthetic.generate(path, zips=3, bgs_per_zip=2, fg=4, placements=2, seed=1, image_size=128)
    return path


def test_a_remote_dataset_is_indexed_by_range_and_downloaded_once(s3, larger_dataset, tmp_path):
    server, root = s3
    local = tmp_path / "local"
    convert_zips.convert(larger_dataset, local, val_fraction=0.0, workers=1, progress=False)  # as the CLI parses it
    fs = s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, client_kwargs={"endpoint_url": server.url})
    fs.mkdir(BUCKET)
    fs.put(str(larger_dataset), f"{BUCKET}/seed", recursive=True)  # the user's dataset, uploaded as users do
    dataset = f"s3://{BUCKET}/seed"
    zips = sum(f.stat().st_size for f in (larger_dataset / schema.ZIP_DIR).iterdir())
    inputs = zips + sum(f.stat().st_size for f in (larger_dataset / schema.BG_DIR).iterdir())
    out = tmp_path / "out"
    with counting.proxy(server.url) as (proxy, sent):
        args = ["--dataset", dataset, "--out", str(out), "--val-fraction", "0", "--workers", "1", *_storage_args(proxy)]
        assert convert_zips.main(args) == 0
        first = sent()
        assert convert_zips.main(args) == 0  # everything done: only the central directories are read
        second = sent() - first
    assert_same_folders(local, out)
    # What the first run read beyond what the second did is the download: each file once.
    assert inputs <= first - second <= 1.1 * inputs, (first, second, inputs)
    assert second <= 0.25 * zips, (second, zips)
    assert not os.path.exists(storage.staging_folder(dataset, "dataset"))


def test_remote_trouble_is_one_line_naming_the_url(s3, seed_dataset, shard_options, tmp_path, capsys):
    server, root = s3
    (root / BUCKET).mkdir()
    missing = f"s3://{BUCKET}/nowhere"
    wrong_key = [*_storage_args(server.url), "--storage-option", "secret=not-the-secret"]  # the last one counts
    for argv, said in ((["--dataset", missing, "--out", str(tmp_path / "out"), *_storage_args(server.url)],
                        f"dataset folder not found: {missing}"),
                       (["--dataset", str(seed_dataset[0]), "--out", URL, *wrong_key],
                        f"cannot write to output {URL}")):
        assert convert_zips.main(argv) == 1
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: {said}"), lines
    assert os.listdir(root / BUCKET) == []
