"""What several test files share: converted folders compared, tiny train.py runs on the CPU,
their checkpoints, and waiting for what a running process does."""

import filecmp
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import train
from pipeline import schema


def read_manifest(out) -> dict:
    with open(os.path.join(out, schema.MANIFEST)) as f:
        return json.load(f)


def format_options(shard_format: str) -> dict:
    """convert_zips.convert's keyword arguments for a shard set of `shard_format` (schema.FORMATS)."""
    return {"self_contained": shard_format == schema.SELF_CONTAINED}


def copy_backgrounds(folder, to) -> None:
    """Copy a compact shard set's backgrounds.tar and its index (when `folder` has them) into
    `to`, beside shards copied there."""
    for name in (schema.BACKGROUNDS, schema.index_name(schema.BACKGROUNDS)):
        if os.path.exists(os.path.join(folder, name)):
            shutil.copy(os.path.join(folder, name), to)


def assert_same_folders(a, b) -> None:
    """The two folders hold the same file names with the same bytes."""
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert (mismatch, errors) == ([], [])


ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(ROOT / ".venv" / "bin" / "torchrun")
# Tests train on the CPU, also on a machine with a GPU (where `auto` would pick CUDA and bf16).
CPU = ["--device", "cpu"]


def tiny(*, batch_size: int = 4, workers: int = 0, log_every: int = 1) -> list[str]:
    """train.py options of a tiny CPU run: 64 px, width 4, a log line every `log_every` steps."""
    return [*CPU, "--image-size", "64", "--width", "4", "--batch-size", str(batch_size),
            "--workers", str(workers), "--log-every", str(log_every)]


TINY = tiny()


def run_train(shard_dir, out, *extra) -> int:
    """train.main on conftest's training shards with TINY options (an option in `extra` wins)."""
    return train.main(["--shards", f"{shard_dir}/batch-{{1..2}}.tar", "--out", str(out), *TINY, *extra])


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def checkpoint_step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["step"]


def assert_same_weights(first: dict, second: dict) -> None:
    """Two state dicts agree (to float rounding: summation order may differ)."""
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], rtol=1e-5, atol=1e-6, msg=name)


def assert_same_checkpoint_weights(a, b) -> None:
    """Two checkpoints' weights agree (see assert_same_weights)."""
    assert_same_weights(weights(a), weights(b))


def wait_for(condition, what: str, timeout: float = 120.0, log: Path | None = None):
    """Poll `condition` until it returns something true; fail after `timeout` seconds, showing
    the end of `log` (a job's stderr) when given."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    shown = f":\n{log.read_text()[-3000:]}" if log is not None else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{shown}")
