"""seedzips.compose --shards (the converter's own writing, to a folder or to `rclone serve s3` on
127.0.0.1) and under torchrun with 2 CPU ranks, with test_compose's photos and tiny random
depth model."""

import json
import os
import re
import shutil
import subprocess
import sys

import servers

import convert_zips
from helpers import ROOT, TORCHRUN, assert_same_folders, read_manifest
from pipeline import schema
from seedzips import compose, storage
from test_compose import OPTIONS, _compose, _tree, depth_model, photos  # noqa: F401 (fixtures)
from test_convert_remote import BUCKET, _storage_args, s3  # noqa: F401 (s3: a fixture)

VAL_FRACTION = "0.34"  # one of the 3 backgrounds held out


def _argv(photos, depth_model, *extra) -> list[str]:
    return ["--bg", str(photos / "bg"), "--fg", str(photos / "fg"), "--fg-masks", str(photos / "masks"),
            "--depth-model", depth_model, "--device", "cpu", "--batch-size", str(OPTIONS["batch_size"]),
            "--placements", str(OPTIONS["placements"]), *extra]


def _reference(photos, depth_model, tmp_path, self_contained=False):
    """compose, then convert_zips: what --shards must write."""
    _compose(photos, depth_model, tmp_path / "dataset")
    out = tmp_path / f"reference-{self_contained}"
    convert_zips.convert(tmp_path / "dataset", out, val_fraction=float(VAL_FRACTION), self_contained=self_contained,
                         workers=1, progress=False)
    return out


def test_shards_are_what_compose_then_convert_write_locally_and_on_s3(photos, depth_model, s3, tmp_path):
    server, root = s3
    reference = _reference(photos, depth_model, tmp_path)
    common = _argv(photos, depth_model, "--bgs-per-zip", str(OPTIONS["bgs_per_zip"]), "--workers", "1",
                   "--val-fraction", VAL_FRACTION)
    assert compose.main([*common, "--out", str(tmp_path / "kept"), "--shards", str(tmp_path / "shards")]) == 0
    assert_same_folders(reference, tmp_path / "shards")
    assert _tree(tmp_path / "kept") == _tree(tmp_path / "dataset")  # --out is kept as it is
    url = f"s3://{BUCKET}/own"
    assert compose.main([*common, "--shards", url, *_storage_args(server.url)]) == 0
    assert_same_folders(reference, root / BUCKET / "own")
    assert not os.path.exists(storage.staging_folder(url, "compose"))  # the work folder, gone once done
    whole = _reference(photos, depth_model, tmp_path, self_contained=True)
    assert compose.main([*common, "--out", str(tmp_path / "kept"), "--shards", str(tmp_path / "whole"),
                         "--self-contained"]) == 0
    assert_same_folders(whole, tmp_path / "whole")
    assert read_manifest(whole)["options"]["format"] == schema.SELF_CONTAINED


def test_two_ranks_label_their_own_zips_and_make_one_process_s_bytes(photos, depth_model, tmp_path):
    argv = _argv(photos, depth_model, "--bgs-per-zip", "1", "--workers", "1")  # 3 zips
    # torchrun gives each rank one thread; a depth model's float sums, and so the depth JPEGs,
    # may differ in their last bits with another thread count: the one process gets one too.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "seedzips.compose", *argv, "--out", str(tmp_path / "one")],
                         cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "seedzips.compose", *argv,
               "--out", str(tmp_path / "two")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # The ranks share one stdout, so their lines can run into each other: match, don't split.
    wrote = dict(re.findall(r"rank (\d)/2: \d+ samples in \d zips \(([^)]*)\)", done.stdout))
    assert wrote == {"0": "batch_1.zip, batch_3.zip", "1": "batch_2.zip"}, done.stdout  # each its own
    assert _tree(tmp_path / "two") == _tree(tmp_path / "one")  # compose.json too; no rank record left


def test_a_rank_s_record_left_by_a_crash_is_kept_by_a_run_of_another_rank_count(photos, depth_model, tmp_path):
    """As a 2-rank run killed after rank 1 finished batch_2.zip leaves it: the zip in its rank's
    record only; one process then keeps that zip and makes the rest."""
    whole = tmp_path / "whole"
    _compose(photos, depth_model, whole, bgs_per_zip=1)
    out = tmp_path / "crashed"
    shutil.copytree(whole, out)
    record = json.loads((out / compose.RECORD).read_text())
    rank_1 = {**record, "complete": False, "zips": {"batch_2.zip": record["zips"]["batch_2.zip"]}}
    (out / "compose.rank-1.json").write_text(json.dumps(rank_1))
    (out / compose.RECORD).write_text(json.dumps({**record, "complete": False, "zips": {}}))
    os.remove(out / schema.ZIP_DIR / "batch_3.zip")
    inode = os.stat(out / schema.ZIP_DIR / "batch_2.zip").st_ino
    _compose(photos, depth_model, out, bgs_per_zip=1)
    assert os.stat(out / schema.ZIP_DIR / "batch_2.zip").st_ino == inode  # kept, not made again
    assert _tree(out) == _tree(whole)  # batch_1 and batch_3 made again, the rank record folded in and gone
