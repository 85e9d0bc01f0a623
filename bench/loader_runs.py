"""One loader run of bench/loader.py, in a child process of its own so that its memory and CPU
are measured alone: (b) the pipeline (train, train without scaled decode, eval) or (w) stock
webdataset, over the shards in one folder, two epochs back to back.

  python bench/loader_runs.py KIND SHARD_FOLDER --workers N --batch-size B --image-size S

prints one JSON line (what `loader_in_child` reads); bench/loader.py starts it.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import loader_baselines as baselines  # noqa: E402  (needs ROOT on the path)
from pipeline import Pipeline, schema  # noqa: E402

EPOCHS = 2
KINDS = ("train", "unscaled", "eval", "webdataset")


def shard_urls(folder: str) -> list[str]:
    manifest = json.load(open(os.path.join(folder, schema.MANIFEST)))
    return [os.path.join(folder, entry["name"]) for entry in manifest["shards"]]


def _epochs(kind: str, urls: list[str], args):
    """The loader's epochs (each an iterable of batches), and what to call when done."""
    if kind == "webdataset":
        loader = baselines.webdataset_batches(urls, args.workers, args.batch_size, args.image_size)
        return [loader] * EPOCHS, lambda: None
    pipeline = Pipeline(urls, batch_size=args.batch_size, workers=args.workers, image_size=args.image_size,
                        train=kind != "eval", scaled_decode=kind != "unscaled", pin_memory=False)
    return [pipeline.epoch(epoch) for epoch in range(EPOCHS)], pipeline.close


def run_loader(kind: str, urls: list[str], args) -> None:
    """Two epochs; prints the samples after the first batch and their seconds, the first
    batch's latency, the longest pause at an epoch change (last batch of one epoch to the first
    of the next) and the CPU seconds of the loader alone (this process from the loader's making
    on, plus its workers), not the interpreter's start and imports."""
    cpu_before = baselines.cpu_seconds(resource.RUSAGE_SELF)
    started = time.perf_counter()
    epochs, close = _epochs(kind, urls, args)
    samples, steady, first, last, change, stages = 0, 0, None, None, 0.0, {}
    for number, epoch in enumerate(epochs):
        for i, batch in enumerate(epoch):
            now = time.perf_counter()
            if first is None:
                first = now  # throughput counts from here, as (a) starts with its pool up
            else:
                steady += len(batch["key"])
            if i == 0 and number:
                change = max(change, now - last)
            samples, last = samples + len(batch["key"]), now
        for stage, seconds in getattr(epoch, "stats", {}).items():
            if stage.endswith("_s"):
                stages[stage] = stages.get(stage, 0.0) + seconds
    close()  # the workers exit and are reaped: their CPU is in RUSAGE_CHILDREN
    del epochs
    cpu = baselines.cpu_seconds(resource.RUSAGE_SELF) - cpu_before + baselines.cpu_seconds(resource.RUSAGE_CHILDREN)
    print(json.dumps({"samples": samples, "steady_samples": steady, "seconds": last - first,
                      "first_batch_seconds": first - started, "epoch_change_seconds": change,
                      "cpu_seconds": cpu, "stages": stages}))


def _tree_pss_kib(root: int) -> int:
    """Proportional set size of a process and all its descendants, in KiB: resident memory
    with pages shared between them (torch's libraries, forked workers) counted once."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    tree, frontier = {root}, [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier and pid not in tree]
        tree.update(children)
        frontier = children
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


def loader_in_child(kind: str, folder: str, args, size: int, *, memory: bool = False) -> dict:
    """One loader run in a child process (kind: train, unscaled (train without scaled
    decode), eval or webdataset) at training size `size`; with `memory`, its peak PSS is
    sampled meanwhile (reading every process's smaps costs CPU: not in the runs whose speed is
    compared)."""
    command = [sys.executable, os.path.abspath(__file__), kind, folder, "--workers", str(args.workers),
               "--batch-size", str(args.batch_size), "--image-size", str(size)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.wait(0.05):
            peak[0] = max(peak[0], _tree_pss_kib(child.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    if memory:
        sampler.start()
    output, _ = child.communicate()
    stop.set()
    if memory:
        sampler.join()
    if child.returncode:
        raise SystemExit(f"error: the {kind} run on {folder} failed (status {child.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    return {"sps": result["steady_samples"] / result["seconds"], "samples": result["samples"],
            "first_batch_s": result["first_batch_seconds"], "epoch_change_s": result["epoch_change_seconds"],
            "cpu_ms": 1000 * result["cpu_seconds"] / result["samples"], "peak_pss_mib": peak[0] / 1024,
            "stage_ms": {stage: 1000 * seconds / result["samples"] for stage, seconds in result["stages"].items()}}




def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("folder", help="a shard folder with its manifest")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--image-size", type=int, required=True)
    args = parser.parse_args(argv)
    run_loader(args.kind, shard_urls(args.folder), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
