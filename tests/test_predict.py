"""predict.py writes mask/depth images at the input's size for a pair, a folder and a shard."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import predict
import train
from pipeline import schema
from pipeline.shardreader import read_samples

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(shard_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict-run") / "run"
    argv = ["--shards", f"{shard_dir}/batch-{{1..2}}.tar", "--out", str(out), "--image-size", "64",
            "--width", "4", "--batch-size", "4", "--workers", "0", "--steps", "1"]
    assert train.main(argv) == 0
    return out / "best.pt"


@pytest.fixture(scope="module")
def pair_images(shard_dir):
    """(key, bg, bgfg) PIL images of the first validation samples."""
    samples = read_samples(f"{shard_dir}/val-1.tar", 0, 2, wanted=(schema.BG, schema.BGFG))
    return [(s.key, *(Image.open(io.BytesIO(s.members[m])).convert("RGB") for m in (schema.BG, schema.BGFG)))
            for s in samples]


def check_outputs(folder: Path, size: tuple[int, int]):
    mask, depth, color = (Image.open(folder / f"{name}.png") for name in ("mask", "depth", "depth_color"))
    assert mask.size == depth.size == color.size == size
    assert (mask.mode, depth.mode, color.mode) == ("L", "L", "RGB")
    assert set(np.unique(np.asarray(mask))) <= {0, 255}


def test_cli_writes_mask_and_depth_at_the_input_size(checkpoint, pair_images, tmp_path):
    _, bg, bgfg = pair_images[0]
    bg.resize((96, 40)).save(tmp_path / "bg.jpg")
    bgfg.resize((96, 40)).save(tmp_path / "bgfg.jpg")
    done = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(checkpoint),
                           "--bg", str(tmp_path / "bg.jpg"), "--bgfg", str(tmp_path / "bgfg.jpg"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    check_outputs(tmp_path / "out", (96, 40))


def test_pairs_folder_gives_one_subfolder_per_name(checkpoint, pair_images, tmp_path):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for (_, bg, bgfg), (name, size) in zip(pair_images, [("one", (64, 64)), ("two", (50, 70))]):
        bg.resize(size).save(pairs / f"{name}.bg.png")
        bgfg.resize(size).save(pairs / f"{name}.bgfg.png")
    assert predict.main(["--checkpoint", str(checkpoint), "--pairs", str(pairs), "--out", str(tmp_path / "out")]) == 0
    check_outputs(tmp_path / "out" / "one", (64, 64))
    check_outputs(tmp_path / "out" / "two", (50, 70))


def test_shard_input_writes_the_first_samples_by_key(checkpoint, pair_images, shard_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--shard", f"{shard_dir}/val-1.tar", "--limit", "2", "--out", str(out)]
    assert predict.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(key for key, _, _ in pair_images)
    for key, _, bgfg in pair_images:
        check_outputs(out / key, bgfg.size)


def test_whole_shard_gives_every_sample_and_no_warning(checkpoint, shard_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert predict.main(["--checkpoint", str(checkpoint), "--shard", f"{shard_dir}/val-1.tar", "--out", str(out)]) == 0
    manifest = json.loads((shard_dir / schema.MANIFEST).read_text())
    (expected,) = [e["samples"] for e in manifest["shards"] if e["name"] == "val-1.tar"]
    assert len(list(out.iterdir())) == expected
    assert "skipping" not in capsys.readouterr().err


def test_bad_inputs_fail_with_one_line(checkpoint, pair_images, tmp_path, capsys):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    pair_images[0][1].save(pairs / "lonely.bg.jpg")
    assert predict.main(["--checkpoint", str(checkpoint), "--pairs", str(pairs), "--out", str(tmp_path)]) == 2
    assert "lonely" in capsys.readouterr().err
    (tmp_path / "not.pt").write_bytes(b"not a checkpoint")
    assert predict.main(["--checkpoint", str(tmp_path / "not.pt"), "--pairs", str(pairs), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not.pt" in err
    assert predict.main(["--checkpoint", str(checkpoint), "--shard", "x.tar", "--limit", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--limit 0" in err
