"""predict.py writes mask/depth images at the input's size for a pair, a folder and a shard."""

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from faults import overwrite
import train
from helpers import CPU, ROOT, copy_backgrounds
from model import UNet, UNetConfig
from pipeline import schema
from pipeline.decode import BadSample, check
from pipeline.shardreader import read_samples


@pytest.fixture(scope="module")
def checkpoint(shard_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict-run") / "run"
    argv = ["--shards", f"{shard_dir}/batch-{{1..2}}.tar", "--out", str(out), "--image-size", "64",
            "--width", "4", "--batch-size", "4", "--workers", "0", "--steps", "1", *CPU]
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
                           "--out", str(tmp_path / "out"), *CPU], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    check_outputs(tmp_path / "out", (96, 40))


def test_pairs_folder_gives_one_subfolder_per_name(checkpoint, pair_images, tmp_path):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for (_, bg, bgfg), (name, size) in zip(pair_images, [("one", (64, 64)), ("two", (50, 70))]):
        bg.resize(size).save(pairs / f"{name}.bg.png")
        bgfg.resize(size).save(pairs / f"{name}.bgfg.png")
    assert predict.main([*CPU, "--checkpoint", str(checkpoint), "--pairs", str(pairs), "--out", str(tmp_path / "out")]) == 0
    check_outputs(tmp_path / "out" / "one", (64, 64))
    check_outputs(tmp_path / "out" / "two", (50, 70))


def test_shard_input_writes_the_first_samples_by_key(checkpoint, pair_images, shard_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--shard", f"{shard_dir}/val-1.tar", "--limit", "2", "--out", str(out)]
    assert predict.main([*CPU, *argv]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(key for key, _, _ in pair_images)
    for key, _, bgfg in pair_images:
        check_outputs(out / key, bgfg.size)


def test_whole_shard_gives_every_sample_and_no_warning(checkpoint, shard_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert predict.main([*CPU, "--checkpoint", str(checkpoint), "--shard", f"{shard_dir}/val-1.tar", "--out", str(out)]) == 0
    manifest = json.loads((shard_dir / schema.MANIFEST).read_text())
    (expected,) = [e["samples"] for e in manifest["shards"] if e["name"] == "val-1.tar"]
    assert len(list(out.iterdir())) == expected
    assert "predict.py: skipped" not in capsys.readouterr().err


def test_bad_inputs_fail_with_one_line(checkpoint, pair_images, tmp_path, capsys):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    pair_images[0][1].save(pairs / "lonely.bg.jpg")
    assert predict.main([*CPU, "--checkpoint", str(checkpoint), "--pairs", str(pairs), "--out", str(tmp_path)]) == 2
    assert "lonely" in capsys.readouterr().err
    (tmp_path / "not.pt").write_bytes(b"not a checkpoint")
    assert predict.main([*CPU, "--checkpoint", str(tmp_path / "not.pt"), "--pairs", str(pairs), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not.pt" in err
    assert predict.main([*CPU, "--checkpoint", str(checkpoint), "--shard", "x.tar", "--limit", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--limit" in err and "got 0" in err


def shard_keys(path) -> list[str]:
    return [sample.key for sample in read_samples(str(path), 0, None)]


def member_offsets(path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as archive:
        return {member.name: member for member in archive.getmembers()}


def predict_shard(checkpoint, shard, out, *extra):
    return predict.main([*CPU, "--checkpoint", str(checkpoint), "--shard", str(shard), "--out", str(out), *extra])


def test_bad_samples_in_a_shard_are_skipped_by_name_and_the_rest_predicted(checkpoint, shard_dir, tmp_path, capsys):
    # The generator's truncated composite, in whichever shard the converter put it ...
    for entry in json.loads((shard_dir / schema.MANIFEST).read_text())["shards"]:
        for sample in read_samples(str(shard_dir / entry["name"]), 0, None):
            try:
                check(sample.members)
            except BadSample:
                shard, truncated = tmp_path / entry["name"], sample.key
                shutil.copy(shard_dir / entry["name"], shard)
    copy_backgrounds(shard_dir, tmp_path)
    keys = shard_keys(shard)
    # ... and, in the same shard, a composite that is not a JPEG at all.
    garbled = next(key for key in keys if key != truncated)
    overwrite(shard, member_offsets(shard)[f"{garbled}.{schema.BGFG}"].offset_data, b"not an image" * 4)

    assert predict_shard(checkpoint, shard, tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(set(keys) - {truncated, garbled})
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("predict.py: skipped")]
    assert len(skipped) == 2 and all(str(shard) in line for line in skipped), captured.err
    assert f"{truncated}.{schema.BGFG}" in skipped[0 if keys.index(truncated) < keys.index(garbled) else 1]
    assert f"{garbled}.{schema.BGFG} is not an image" in captured.err and "BytesIO" not in captured.err
    assert "skipped 2 sample(s)" in captured.out


@pytest.mark.parametrize("with_index", [False, True])
def test_damaged_tar_data_is_reported_and_the_other_samples_predicted(checkpoint, shard_dir, tmp_path, capsys,
                                                                      with_index):
    shard = tmp_path / "val-1.tar"
    shutil.copy(shard_dir / "val-1.tar", shard)
    copy_backgrounds(shard_dir, tmp_path)
    if with_index:
        shutil.copy(shard_dir / schema.index_name("val-1.tar"), tmp_path)
    keys = shard_keys(shard)
    # Text over the third sample's first header: not even its numeric fields parse.
    first = min(member.offset for name, member in member_offsets(shard).items() if schema.key_of(name) == keys[2])
    overwrite(shard, first, b"garbage!" * 64)

    assert predict_shard(checkpoint, shard, tmp_path / "out") == 0
    predicted = {p.name for p in (tmp_path / "out").iterdir()}
    if with_index:  # the index says where the next sample starts: only the damaged one is lost
        assert predicted == set(keys) - {keys[2]}
    else:  # streamed: the damage ends the shard
        assert predicted == set(keys[:2])
    err = capsys.readouterr().err
    assert "predict.py: skipped" in err and str(shard) in err and "Traceback" not in err


def _gzip_copy(shard_dir, path):
    path.write_bytes(gzip.compress((shard_dir / "val-1.tar").read_bytes()))


BAD_SHARDS = {  # case: (make the --shard file, or None to pass a path as is; --shard; what the error names)
    "empty": (lambda shard_dir, path: path.write_bytes(b""), "empty.tar"),
    "not a tar": (lambda shard_dir, path: path.write_bytes(os.urandom(4096)), "not-a-tar.tar"),
    "gzipped": (_gzip_copy, "gzipped.tar.gz"),
    "missing": (None, "missing.tar"),
    "manifest": (None, schema.MANIFEST),
}


@pytest.mark.parametrize("case", sorted(BAD_SHARDS))
def test_a_missing_empty_or_non_tar_shard_is_a_one_line_error(case, checkpoint, shard_dir, tmp_path, capsys):
    make, name = BAD_SHARDS[case]
    path = (shard_dir if case == "manifest" else tmp_path) / name
    if make:
        make(shard_dir, path)
    assert predict_shard(checkpoint, path, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("predict.py: error:") and str(path) in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, named", [(["--image-size", "0"], "--image-size"),
                                          (["--image-size", "100000"], "--image-size 100000"),
                                          (["--image-size", "80"], "image size 80"),
                                          (["--limit", "-1"], "--limit")])
def test_bad_options_are_a_one_line_error(extra, named, checkpoint, shard_dir, tmp_path, capsys):
    assert predict_shard(checkpoint, shard_dir / "val-1.tar", tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("predict.py: error:") and named in err, err


def test_device_cuda_without_a_gpu_is_a_one_line_error(checkpoint, shard_dir, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(checkpoint),
                           "--shard", str(shard_dir / "val-1.tar"), "--out", str(tmp_path / "out"), "--device", "cuda"],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # no GPU, also on a machine with one
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "predict.py: error: --device cuda: no CUDA device is available (use --device cpu or auto)"]


def test_a_compact_shard_takes_its_backgrounds_from_beside_it_a_damaged_one_costing_its_samples(
        checkpoint, compact_dir, tmp_path, capsys):
    shard = tmp_path / "batch-1.tar"
    for name in ("batch-1.tar", schema.index_name("batch-1.tar"), schema.MANIFEST):
        shutil.copy(compact_dir / name, tmp_path)
    # The manifest says the set is compact: without its backgrounds.tar, one line naming it.
    assert predict_shard(checkpoint, shard, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and err.startswith("predict.py: error:") and str(
        tmp_path / schema.BACKGROUNDS) in err, err
    assert not (tmp_path / "out").exists()
    copy_backgrounds(compact_dir, tmp_path)
    keys = shard_keys(shard)
    damaged = schema.background_key_of(keys[0])
    body = member_offsets(tmp_path / schema.BACKGROUNDS)[f"{damaged}.{schema.BG}"]
    overwrite(tmp_path / schema.BACKGROUNDS, body.offset_data + body.size // 2, b"\xff\x00garbage" * 16)

    assert predict_shard(checkpoint, shard, tmp_path / "out") == 0
    lost = {key for key in keys if schema.background_key_of(key) == damaged}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(set(keys) - lost)
    skipped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("predict.py: skipped")]
    assert len(skipped) == len(lost) and all(f"background {damaged}: does not decode" in line for line in skipped)


def test_flip_average_predicts_the_mirror_image_of_a_mirrored_pair():
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4)).eval()
    torch.nn.init.zeros_(model.mask_head.bias)  # a mask of both values, not the prior's empty one
    with torch.no_grad():
        model.depth_head.weight.mul_(20)  # depth over the whole range, not all near 0.5
    bg, bgfg = torch.randint(0, 256, (2, 3, 40, 96), dtype=torch.uint8)

    def asymmetry(flip_average: bool) -> tuple[int, float]:
        (mask, depth), (mirrored_mask, mirrored_depth) = (
            predict.predict(model, b, f, 64, torch.device("cpu"), flip_average=flip_average)
            for b, f in ((bg, bgfg), (bg.flip(-1), bgfg.flip(-1))))
        return (np.abs(depth.astype(int) - mirrored_depth[:, ::-1]).max(), (mask != mirrored_mask[:, ::-1]).mean())

    depth_error, mask_error = asymmetry(flip_average=True)
    assert depth_error <= 1 and mask_error < 0.005  # rounding to 8 bits; logits at 0 either way
    depth_error, mask_error = asymmetry(flip_average=False)
    assert depth_error > 1 and mask_error > 0.005  # the network alone is not mirror-symmetric
