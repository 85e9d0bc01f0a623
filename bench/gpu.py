"""The prepared GPU run of issue 20: one call, one JSON line, under 8 minutes on one GPU.

    python bench/gpu.py                  # a machine with a CUDA GPU and the project's venv
    python bench/gpu.py --device cpu     # every part tiny on the CPU: checks this script, measures nothing

Parts (each reported under its own key; one that fails reports its error and the others still run):
- model_only: optimizer steps of the default U-Net on batches already on the device (224 px,
  batch 64, bf16), cudnn.benchmark off, on, and on with torch.compile; the peak memory of the
  benchmark-on steps beside preflight's estimate for the same step (training.preflight.step_memory).
- pipeline: train.py through the loader from synthetic shards at 2, 4 and 8 workers: samples/s,
  data-wait share (the goal: under 5%) and the loader's stage times per sample, the mean of the
  log windows after the first (which holds the warm-up and cuDNN's algorithm search).
- sigterm_resume: train.py sent SIGTERM mid-run (status 143, last.pt), then --resume 2 steps on.
- nccl_group: a 1-GPU NCCL process group built explicitly (torchrun with one process makes
  none), its gloo group for host numbers beside it, 2 DDP steps, the stop vote.
Exit status: 0 when every part ran, 1 when one failed, 2 without a GPU (unless --device cpu).
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import convert_zips  # noqa: E402
from model import UNet, UNetConfig  # noqa: E402
from seedzips import synthetic  # noqa: E402
from training import distributed, preflight  # noqa: E402
from training.steps import amp_dtype_for, make_optimizer, train_step  # noqa: E402

# What each part does on the GPU, and the tiny version of it on the CPU.
SIZES = {
    "cuda": dict(width=UNetConfig().width, image_size=224, batch_size=64, warmup=5, steps=30, train_steps=100, log_every=25,
                 dataset=dict(zips=4, bgs_per_zip=5, fg=20, placements=10, image_size=224)),  # 4,000 samples
    "cpu": dict(width=4, image_size=64, batch_size=4, warmup=1, steps=2, train_steps=4, log_every=2,
                dataset=dict(zips=2, bgs_per_zip=2, fg=3, placements=3, image_size=64)),  # 36 samples
}
RUN_TIMEOUT = 150  # seconds for one train.py run: the whole script must stay under 8 minutes


def model_only(device: torch.device, size: dict) -> dict:
    """Samples/s of optimizer steps on in-memory batches, three ways; peak memory against the estimate."""
    amp_dtype = amp_dtype_for("bf16", device)
    config = UNetConfig(width=size["width"])
    shape = (size["batch_size"], 1, size["image_size"], size["image_size"])
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape[0], config.in_channels, *shape[2:], device=device, generator=generator)
    x = x.contiguous(memory_format=torch.channels_last)
    mask = (torch.rand(shape, device=device, generator=generator) > 0.5).float()
    depth = torch.rand(shape, device=device, generator=generator)
    result = {}
    for name, benchmark, compiled in (("benchmark_off", False, False), ("benchmark_on", True, False),
                                      ("compile", True, True)):
        torch.backends.cudnn.benchmark = benchmark
        torch.manual_seed(0)
        model = UNet(config).to(device, memory_format=torch.channels_last)
        # On the CPU, dynamo's tracing without inductor's C++ build: the check stays quick.
        forward = torch.compile(model, backend="inductor" if device.type == "cuda" else "eager") if compiled else model
        optimizer = make_optimizer(model.parameters(), lr=1e-3, weight_decay=0.05, device=device)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(size["warmup"]):  # cuDNN's search and the compilation happen here
            train_step(forward, optimizer, scaler, x, mask, depth, amp_dtype=amp_dtype)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(size["steps"]):
            loss, _ = train_step(forward, optimizer, scaler, x, mask, depth, amp_dtype=amp_dtype)
        synchronize(device)
        result[f"{name}_samples_per_s"] = round(size["steps"] * shape[0] / (time.perf_counter() - started), 1)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{name}: the loss is {loss.item()}")
        if name == "benchmark_on" and device.type == "cuda":
            result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 3)
        del model, forward, optimizer
    estimate = preflight.step_memory(config, size["image_size"], size["batch_size"], training=True, amp_dtype=amp_dtype)
    result["preflight_estimate_gib"] = round(estimate / 2**30, 3)
    if "peak_reserved_gib" in result:
        result["estimate_over_peak_reserved"] = round(result["preflight_estimate_gib"] / result["peak_reserved_gib"], 3)
    torch.backends.cudnn.benchmark = True  # train.py's setting on CUDA
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_shards(folder: Path, size: dict) -> Path:
    synthetic.generate(folder / "dataset", **size["dataset"], workers=os.cpu_count())
    convert_zips.convert(folder / "dataset", folder / "shards", val_fraction=0, seed=0, progress=False)
    return folder / "shards"


def train_command(device: torch.device, shards: Path, out: Path, size: dict, workers: int, *extra) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--device", device.type, "--shards", str(shards / "batch-*.tar"),
            "--out", str(out), "--image-size", str(size["image_size"]), "--batch-size", str(size["batch_size"]),
            "--workers", str(workers), "--width", str(size["width"]), "--no-val", *extra]


def failed(what: str, done) -> RuntimeError:
    return RuntimeError(f"{what} exited with {done.returncode}: {done.stderr[-1500:]}")


def pipeline(device: torch.device, shards: Path, folder: Path, size: dict, workers_list: list[int]) -> dict:
    """train.py at each worker count: throughput, data-wait share and stage times after warm-up."""
    result = {}
    for workers in workers_list:
        out = folder / f"pipeline-{workers}"
        done = subprocess.run(train_command(device, shards, out, size, workers, "--steps", str(size["train_steps"]),
                                            "--log-every", str(size["log_every"])),
                              capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=ROOT)
        if done.returncode != 0:
            raise failed(f"train.py --workers {workers}", done)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        windows = [record for record in records if record["kind"] == "train"][1:]
        figures = {key: round(statistics.mean(window[key] for window in windows), 4) for key in windows[0]
                   if key in ("samples_per_s", "data_wait") or key.startswith("loader_")}
        result[str(workers)] = {**figures, "data_wait_under_5pct": figures["data_wait"] < 0.05,
                                "windows": len(windows)}
    return result


def sigterm_resume(device: torch.device, shards: Path, folder: Path, size: dict) -> dict:
    """SIGTERM after a few steps: status 143 and last.pt at the step it reports; --resume goes on."""
    out = folder / "sigterm"
    command = train_command(device, shards, out, size, 2, "--log-every", "1", "--schedule-steps", "10000")
    with open(folder / "sigterm.err", "w+") as errors:
        process = subprocess.Popen([*command, "--steps", "10000"], stdout=subprocess.DEVNULL, stderr=errors, cwd=ROOT)
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # a bench's poll, not a test's
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                errors.seek(0)
                raise RuntimeError(f"train.py never logged 2 steps: {errors.read()[-1500:]}")
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=RUN_TIMEOUT)
    step = torch.load(out / "last.pt", map_location="cpu", weights_only=False)["step"]
    done = subprocess.run([*command, "--steps", str(step + 2), "--resume"], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, cwd=ROOT)
    if done.returncode != 0:
        raise failed("train.py --resume", done)
    resumed = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    return {"status": status, "stopped_at": step, "resumed_to": resumed["step"],
            "ok": status == 128 + signal.SIGTERM and resumed["step"] == step + 2 and "cuda" not in resumed["rng"]}


def _group_rank(rank: int, device_type: str, port: int, report: str) -> None:
    """The one rank of nccl_group, in a process of its own."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    distributed.join_group(device)
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=8)).to(device, memory_format=torch.channels_last)
    forward = DistributedDataParallel(model, device_ids=[0] if device.type == "cuda" else None)
    optimizer = make_optimizer(model.parameters(), lr=1e-3, weight_decay=0.0, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    x = torch.randn(2, 6, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.rand(2, 1, 64, 64, device=device)
    losses = [train_step(forward, optimizer, scaler, x, target.round(), target,
                         amp_dtype=amp_dtype_for("bf16", device))[0].item() for _ in range(2)]
    ones = torch.ones(1, device=device)
    dist.all_reduce(ones)
    votes = [distributed.all_max_a_step_late([0, 15]) for _ in range(2)]
    result = {"backend": dist.get_backend(), "host_sum": distributed.all_sum([2])[0], "device_all_reduce": ones.item(),
              "ddp_losses": losses, "votes": votes}
    distributed.teardown()
    Path(report).write_text(json.dumps(result))


def nccl_group(device: torch.device, folder: Path) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    report = folder / "group.json"
    mp.spawn(_group_rank, args=(device.type, port, str(report)), nprocs=1)
    result = json.loads(report.read_text())
    result["ok"] = (result["backend"] == ("nccl" if device.type == "cuda" else "gloo") and result["host_sum"] == 2
                    and result["device_all_reduce"] == 1 and result["votes"] == [[0, 0], [0, 15]])
    return result


def describe(device: torch.device) -> dict:
    about = {"device": device.type, "torch": torch.__version__, "cpus": os.cpu_count()}
    if device.type == "cuda":
        about.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                     cudnn=torch.backends.cudnn.version(),
                     bf16=torch.cuda.is_bf16_supported(including_emulation=False),
                     gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return about


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8], help="train.py's --workers to measure")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: error: no CUDA GPU visible (torch.cuda.is_available() is False): this script "
              "measures a GPU; --device cpu runs every part tiny on the CPU, to check the script", file=sys.stderr)
        return 2
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    size = SIZES[args.device]
    started = time.perf_counter()
    report, seconds = {"bench": "gpu", **describe(device)}, {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as folder:
        folder = Path(folder)
        shards = make_shards(folder, size)
        seconds["data"] = round(time.perf_counter() - started, 1)
        parts = {"model_only": lambda: model_only(device, size),
                 "pipeline": lambda: pipeline(device, shards, folder, size, args.workers),
                 "sigterm_resume": lambda: sigterm_resume(device, shards, folder, size),
                 "nccl_group": lambda: nccl_group(device, folder)}
        for name, part in parts.items():
            began = time.perf_counter()
            try:
                report[name] = part()
            except Exception as error:  # the other parts still run: one call must bring back all it can
                report[name] = {"error": f"{type(error).__name__}: {error}"}
            seconds[name] = round(time.perf_counter() - began, 1)
    report["seconds"] = {**seconds, "total": round(time.perf_counter() - started, 1)}
    print(json.dumps(report), flush=True)
    broken = [name for name in parts if "error" in report[name] or report[name].get("ok") is False]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
