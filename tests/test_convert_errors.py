"""convert_zips.py on bad input and failing disks: one-line errors naming the path, skips that
are listed, no temporary file left behind."""

import errno
import filecmp
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import convert_zips
from faults import file_size_limit
from helpers import assert_same_folders, read_manifest
from pipeline import schema
from test_convert import converted, format_options, shard_sets  # noqa: F401 (fixtures)


def _broken_copy(dataset, tmp_path, change) -> str:
    copy = tmp_path / "dataset"
    shutil.copytree(dataset, copy)
    change(copy)
    return str(copy)


def _write(path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _damage_first_image(dataset) -> None:
    """Flip a byte inside the compressed data of batch_1.zip's first image (its CRC then fails)."""
    path = dataset / schema.ZIP_DIR / schema.zip_name(1)
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if not i.is_dir())
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename) + info.compress_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


BAD_INPUTS = {
    "missing dataset": (lambda d: shutil.rmtree(d), "dataset folder not found"),
    "no zips": (lambda d: shutil.rmtree(d / schema.ZIP_DIR), f"no {schema.ZIP_DIR}/batch_*.zip"),
    "corrupt zip": (lambda d: _write(d / schema.ZIP_DIR / schema.zip_name(2), b"PK not a zip"),
                    "unreadable or corrupt zip"),
    "damaged member": (_damage_first_image, "corrupt zip"),
    "missing bg folder": (lambda d: shutil.rmtree(d / schema.BG_DIR), "background folder not found"),
    "duplicate key": (lambda d: shutil.copy(d / schema.ZIP_DIR / schema.zip_name(1),
                                            d / schema.ZIP_DIR / schema.zip_name(7)), "duplicate key"),
}


def _error_line(capsys) -> str:
    """What the user is left with on stderr: one line (an erased progress bar aside)."""
    err = capsys.readouterr().err
    visible = err.rsplit("\r", 1)[-1]
    assert err.count("\n") == 1 and visible.startswith("error: ") and visible.endswith("\n"), err
    return visible


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_one_line_error_naming_the_path(case, seed_dataset, tmp_path, capsys):
    change, message = BAD_INPUTS[case]
    dataset = _broken_copy(seed_dataset[0], tmp_path, change)
    status = convert_zips.main(["--dataset", dataset, "--out", str(tmp_path / "out")])
    err = _error_line(capsys)
    assert status != 0 and message in err
    if case == "duplicate key":
        assert schema.zip_name(1) in err and schema.zip_name(7) in err
    else:
        assert dataset in err


def test_unwritable_output_is_a_one_line_error(seed_dataset, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    status = convert_zips.main(["--dataset", str(seed_dataset[0]), "--out", str(blocker / "shards")])
    assert status != 0 and str(blocker / "shards") in _error_line(capsys)


def test_strict_fails_on_the_incomplete_sample_and_a_missing_background_is_skipped(seed_dataset, shard_options,
                                                                                    tmp_path, capsys):
    dataset, summary = seed_dataset
    assert convert_zips.main(["--dataset", str(dataset), "--out", str(tmp_path / "s"), "--strict"]) != 0
    assert summary["faults"]["missing_depth"][0] in capsys.readouterr().err
    bg_id = summary["zips"][-1]["bg_ids"][-1]
    copy = _broken_copy(dataset, tmp_path, lambda d: os.remove(d / schema.BG_DIR / schema.bg_name(bg_id)))
    manifest = convert_zips.convert(copy, tmp_path / "out", **shard_options)
    reasons = {e["key"]: e["reason"] for e in manifest["skipped"]}
    lost = [k for k in summary["zips"][-1]["keys"] if schema.background_id(k) == bg_id]
    assert all(schema.bg_name(bg_id) in reasons[k] for k in lost)


def test_hidden_files_and_other_members_are_ignored(seed_dataset, converted, shard_options, tmp_path):
    def add_clutter(dataset):
        with zipfile.ZipFile(dataset / schema.ZIP_DIR / schema.zip_name(1), "a") as archive:
            archive.writestr(f"__MACOSX/{schema.COMPOSITE_DIR}/._{schema.seed_key(1, 1)}.jpg", b"resource fork")
            archive.writestr(f"{schema.COMPOSITE_DIR}/.DS_Store", b"finder")
            archive.writestr("readme.txt", b"not an image")

    shard_format, made = converted
    dataset = _broken_copy(seed_dataset[0], tmp_path, add_clutter)
    manifest = convert_zips.convert(dataset, tmp_path / "out", **format_options(shard_options, shard_format))
    assert manifest["skipped"] == read_manifest(made)["skipped"]
    for entry in manifest["shards"]:
        assert filecmp.cmp(tmp_path / "out" / entry["name"], made / entry["name"], shallow=False)


@pytest.mark.parametrize("shard_format,failing", [(schema.COMPACT, "manifest"), (schema.COMPACT, "backgrounds"),
                                                  (schema.COMPACT, "shard"), (schema.SELF_CONTAINED, "manifest"),
                                                  (schema.SELF_CONTAINED, "shard")])
def test_a_failed_write_leaves_no_temporaries_and_a_rerun_completes(shard_format, failing, seed_dataset, shard_sets,
                                                                    shard_options, tmp_path):
    made = shard_sets[shard_format]
    manifest = read_manifest(made)
    manifest_size = (made / schema.MANIFEST).stat().st_size  # more than any earlier progress record
    smallest_shard = min(entry["bytes"] for entry in manifest["shards"])
    # The manifest is written first, then (compact) backgrounds.tar, then every shard's temporary
    # file is sized before parts land.
    if failing == "manifest":
        limit = 64
    elif failing == "backgrounds":
        limit = (manifest_size + manifest["backgrounds"]["bytes"]) // 2
        assert manifest_size < limit < manifest["backgrounds"]["bytes"]
    else:
        limit = (max(manifest_size, manifest["totals"]["backgrounds_bytes"]) + smallest_shard) // 2
        assert manifest_size < limit < smallest_shard and manifest["totals"]["backgrounds_bytes"] < limit
    out = tmp_path / "shards"
    command = [sys.executable, "convert_zips.py", "--dataset", str(seed_dataset[0]), "--out", str(out),
               "--val-fraction", str(shard_options["val_fraction"]), "--seed", str(shard_options["seed"]),
               "--workers", str(shard_options["workers"])]
    command += ["--self-contained"] if shard_format == schema.SELF_CONTAINED else []
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=120, preexec_fn=file_size_limit(limit),
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    # In a pipe the progress bar leaves lines of its own; in a terminal it is erased.
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("converting:")]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and str(out) in lines[0] and os.strerror(errno.EFBIG) in lines[0]
    assert [name for name in os.listdir(out) if name.endswith(schema.TEMPORARY)] == []
    if failing == "shard":
        assert not [name for name in os.listdir(out) if name.endswith(".tar") and name != schema.BACKGROUNDS]
    convert_zips.convert(seed_dataset[0], out, **format_options(shard_options, shard_format))
    assert_same_folders(made, out)
