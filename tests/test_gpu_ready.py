"""What the CUDA path needs, checked on the CPU (issue 20): checkpoints that do not depend on
the GPUs, the precision and backend choices for a GPU, fp16 without a sync per step, the
shared-memory check in a /dev/shm of a chosen size. The GPU itself is bench/gpu.py's."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import CPU, ROOT, checkpoint_step, run_train
from model import UNet, UNetConfig
from training import checkpoint, distributed
from training.steps import amp_dtype_for, make_optimizer, train_step


@pytest.fixture
def gpus_not_to_touch(monkeypatch):
    """A machine that shows one GPU, where starting CUDA fails the test (the fake cannot run
    anything, so a --device cpu run passes only if it never starts CUDA)."""

    def start_cuda():
        raise AssertionError("CUDA was started")

    # The driver reads CUDA_VISIBLE_DEVICES when first asked.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: os.environ["CUDA_VISIBLE_DEVICES"] != "")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "_lazy_init", start_cuda)


def test_a_checkpoint_of_an_8_gpu_run_resumes_on_the_cpu_and_never_starts_cuda(shard_dir, tmp_path, gpus_not_to_touch):
    # As an 8-GPU run of an earlier version saved it: torch.cuda.get_rng_state_all(), one per GPU.
    eight_gpus = [torch.zeros(16, dtype=torch.uint8) for _ in range(8)]
    # What a CUDA run (one GPU visible) saves and restores: no CUDA generator is touched.
    states = checkpoint.rng_states()
    assert set(states) == {"python", "numpy", "torch"}
    checkpoint.restore_rng_states({**states, "cuda": eight_gpus})

    out = tmp_path / "run"
    assert run_train(shard_dir, out, "--steps", "2", "--no-val") == 0
    state = torch.load(out / "last.pt", weights_only=False)
    assert set(state["rng"]) == {"python", "numpy", "torch"}
    state["rng"]["cuda"] = eight_gpus
    torch.save(state, out / "last.pt")
    assert run_train(shard_dir, out, "--steps", "4", "--no-val", "--resume") == 0
    assert checkpoint_step(out / "last.pt") == 4


@pytest.mark.parametrize("bf16_arithmetic, expected", [(True, torch.bfloat16), (False, torch.float16)],
                         ids=["Ampere or later", "T4 or V100"])
def test_amp_auto_picks_bf16_only_where_the_gpu_has_it(monkeypatch, bf16_arithmetic, expected):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return bf16_arithmetic or including_emulation  # as torch answers: emulation "supports" it anywhere

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert amp_dtype_for("auto", torch.device("cuda")) == expected
    assert asked == [False]
    assert amp_dtype_for("bf16", torch.device("cuda")) == torch.bfloat16  # an explicit choice stands
    assert amp_dtype_for("auto", torch.device("cpu")) is None


def test_cuda_turns_on_cudnn_benchmark_and_leaves_the_cores_to_the_workers(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        distributed.configure_process(torch.device("cpu"))
        assert not torch.backends.cudnn.benchmark and torch.get_num_threads() == threads
        distributed.configure_process(torch.device("cuda"))
        assert torch.backends.cudnn.benchmark and torch.get_num_threads() == 1
        torch.set_num_threads(threads)
        monkeypatch.setenv("OMP_NUM_THREADS", str(threads))  # the user's (or torchrun's) choice stands
        distributed.configure_process(torch.device("cuda"))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)


def test_the_heads_and_the_depth_sigmoid_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, depth = model(torch.randn(2, 6, 64, 64))
    assert logits.dtype == depth.dtype == torch.float32
    assert (depth != depth.bfloat16().float()).any()  # finer than bf16's steps


def host_reads(monkeypatch) -> list:
    """Calls that read a tensor back to the host (on a GPU: a sync), counted from now on."""
    reads = []
    for name in ("item", "__bool__", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name: reads.append(_n) or _f(self, *a))
    return reads


@pytest.mark.parametrize("device", ["cuda", "cpu"], ids=["fused (CUDA's)", "default kernel (the CPU's)"])
def test_an_fp16_step_reads_nothing_back_with_the_optimizer_chosen_for_cuda(monkeypatch, device):
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4))
    # The optimizer train.py makes for `device`, over CPU parameters (the fused kernel has both).
    optimizer = make_optimizer(model.parameters(), lr=1e-3, weight_decay=0.0, device=torch.device(device))
    scaler = torch.amp.GradScaler("cpu")
    x, target = torch.randn(2, 6, 64, 64), torch.rand(2, 1, 64, 64)
    before = [p.detach().clone() for p in model.parameters()]
    train_step(model, optimizer, scaler, x, target.round(), target, amp_dtype=torch.float16)  # warm-up
    reads = host_reads(monkeypatch)
    for _ in range(2):
        train_step(model, optimizer, scaler, x, target.round(), target, amp_dtype=torch.float16)
    # GradScaler.step reads the inf flag back unless the optimizer takes it on the device.
    assert (reads == []) == (device == "cuda"), reads
    monkeypatch.undo()
    assert any((p != b).any() for p, b in zip(model.parameters(), before))  # the steps were taken


def test_a_bf16_run_resumes_with_amp_fp16(shard_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_train(shard_dir, out, "--steps", "2", "--no-val", "--amp", "bf16") == 0
    assert run_train(shard_dir, out, "--steps", "3", "--no-val", "--amp", "fp16", "--resume") == 0
    assert checkpoint_step(out / "last.pt") == 3
    assert "its loss scale starts afresh" in capsys.readouterr().out
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["scaler"]["scale"] > 0  # fp16's scaler state is saved from then on


def train_with_shm(size_mib: int, shard_dir, out, *options) -> subprocess.CompletedProcess:
    """train.py in a mount namespace of its own, whose /dev/shm is a fresh tmpfs of `size_mib`
    MiB (as in a Docker container, which gets 64 MB unless told --shm-size)."""
    mount = f'mount -t tmpfs -o size={size_mib}m tmpfs /dev/shm && exec "$@"'
    command = ["unshare", "--mount", "sh", "-c", mount, "sh", sys.executable, str(ROOT / "train.py"), *CPU,
               "--shards", f"{shard_dir}/batch-{{1..2}}.tar", "--out", str(out), "--width", "4", *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_too_little_dev_shm_is_one_line_naming_it_and_dockers_shm_size(shard_dir, tmp_path):
    # As the example (batch 32: more than these shards hold), which died before step 1
    # with a traceback from torch's UntypedStorage._new_shared.
    done = train_with_shm(64, shard_dir, tmp_path / "run", "--image-size", "224", "--batch-size", "8",
                          "--workers", "2", "--steps", "2")
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("train.py: error: /dev/shm has 64 MiB free") and "--shm-size=" in done.stderr
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_config_trains_and_validates_in_a_dev_shm_just_larger_than_the_check_asks(shard_dir, tmp_path):
    options = ["--image-size", "224", "--batch-size", "4", "--workers", "2", "--steps", "2", "--val-every", "1"]
    refused = train_with_shm(8, shard_dir, tmp_path / "refused", *options)
    assert refused.returncode == 2, refused.stderr[-3000:]
    needed = int(re.search(r"batch buffers need (\d+) MiB", refused.stderr).group(1))  # rounded to the MiB
    assert 32 < needed < 64  # the buffers (two pipelines of 2 workers) are most of it, and fit Docker's default
    assert train_with_shm(needed - 1, shard_dir, tmp_path / "refused", *options).returncode == 2
    # What the workers, the baselines' fit and validation really put there fits what was asked for.
    out = tmp_path / "run"
    done = train_with_shm(needed + 1, shard_dir, out, *options)
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoint_step(out / "last.pt") == 2
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("val") == 2 and "baseline" in kinds


def test_the_gpu_script_runs_every_part_tiny_on_the_cpu_and_stops_at_once_without_a_gpu():
    script = [sys.executable, str(ROOT / "bench" / "gpu.py")]
    hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # as on a machine without one, also on one with
    refused = subprocess.run(script, capture_output=True, text=True, timeout=120, cwd=ROOT, env=hidden)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("bench/gpu.py: error: no CUDA GPU visible") and len(refused.stderr.splitlines()) == 1

    done = subprocess.run([*script, "--device", "cpu", "--workers", "2"], capture_output=True, text=True,
                          timeout=540, cwd=ROOT, env=hidden)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = done.stdout.splitlines()
    report = json.loads(line)
    model = report["model_only"]
    assert all(model[f"{name}_samples_per_s"] > 0 for name in ("benchmark_off", "benchmark_on", "compile")), model
    assert model["preflight_estimate_gib"] > 0
    run = report["pipeline"]["2"]
    assert run["windows"] == 1 and run["samples_per_s"] > 0 and 0 <= run["data_wait"] < 1, run
    assert run["loader_decode_ms"] > 0
    assert report["sigterm_resume"] == {"status": 143, "stopped_at": report["sigterm_resume"]["stopped_at"],
                                        "resumed_to": report["sigterm_resume"]["stopped_at"] + 2, "ok": True}
    group = report["nccl_group"]
    assert group["ok"] and group["backend"] == "gloo" and len(group["ddp_losses"]) == 2, group
