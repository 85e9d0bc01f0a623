"""Benchmark: make_loader against the decode-only limit and the seed's zip + PIL loader.

On one seed-size zip (5 backgrounds x 100 foregrounds x 20 placements = 10,000 samples at
224 px, mixed depth maps), generated once and converted into 1 and into 20 shards (cached
under --cache), one run measures:
  (a) decode_only: the same samples' four JPEGs decoded by torchvision in --workers
      processes from memory, nothing else (the ceiling for any loader doing this decode);
  (b) make_loader end to end: --workers workers, --batch-size, train mode (shuffle buffer,
      decode, fit to size, augmentation draws; the draws are applied on the training device
      by Batch.to, which is not timed here), on the 20-shard and on the 1-shard
      set, each in a fresh process whose peak memory (PSS of all its processes together) is
      recorded: it must not grow with the number of shards; also in eval mode (no shuffle
      buffer, no draws) on 20 shards, for context. Timed from the first batch on, as (a)
      starts with its processes up; the first batch's latency is reported apart;
  (c) seed_zip_pil: the original approach, a map-style Dataset reading the zip directly with
      PIL and transforms.ToTensor, in a DataLoader with 1 worker (more broke the seed).
Prints one JSON line: samples/s of each, ratio = (b) on 20 shards / (a), peak PSS in MiB,
and CPU milliseconds per sample of (a) and (b), whose ratio holds even on a busy machine.
"""

import argparse
import io
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import threading
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402  (needs ROOT on the path)
from torchvision.io import decode_jpeg  # noqa: E402

from pipeline import make_loader, schema  # noqa: E402
from seedzips import synthetic  # noqa: E402
from pipeline.decode import MODES  # noqa: E402
from pipeline.shardreader import read_samples  # noqa: E402

SEED_DATASET = dict(zips=1, bgs_per_zip=5, fg=100, placements=20, seed=0, depth="mixed")
_SAMPLES = []  # (a)'s encoded samples, filled before the decode processes fork


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare(cache: str, image_size: int) -> tuple[str, dict]:
    """The cached seed dataset and {shard count: shard folder} (made when missing)."""
    import convert_zips

    seed = os.path.join(cache, f"seed-{image_size}")
    done = os.path.join(seed, "complete")
    if not os.path.exists(done):
        _log(f"generating {seed} (once)")
        synthetic.generate(seed, image_size=image_size, workers=os.cpu_count() or 1, **SEED_DATASET)
        open(done, "w").close()
    folders = {}
    for count in (20, 1):
        out = os.path.join(cache, f"shards-{image_size}-{count}")
        manifest = os.path.join(out, schema.MANIFEST)
        if not (os.path.exists(manifest) and json.load(open(manifest)).get("complete")):
            _log(f"converting into {count} shard(s)")
            convert_zips.convert(seed, out, shards=count, val_fraction=0, progress=False)
        folders[count] = out
    return seed, folders


def _shard_urls(folder: str) -> list[str]:
    manifest = json.load(open(os.path.join(folder, schema.MANIFEST)))
    return [os.path.join(folder, entry["name"]) for entry in manifest["shards"]]


def _cpu(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


# --- (a) decode only ---------------------------------------------------------------------
def _decode_range(bounds) -> int:
    torch.set_num_threads(1)
    for members in _SAMPLES[bounds[0]:bounds[1]]:
        for name, mode in MODES.items():
            decode_jpeg(torch.frombuffer(bytearray(members[name]), dtype=torch.uint8), mode=mode)
    return bounds[1] - bounds[0]


def decode_only(urls: list[str], workers: int) -> tuple[float, float]:
    """(samples/s, CPU seconds per sample) of decoding the shards' JPEGs in `workers` processes."""
    _SAMPLES.extend(s.members for url in urls for s in read_samples(url, 0, 10**9) if s.error is None)
    step = -(-len(_SAMPLES) // workers)
    cpu_before = _cpu(resource.RUSAGE_CHILDREN)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_decode_range, [(0, 1)] * workers)  # processes up before the clock starts
        started = time.perf_counter()
        done = sum(pool.map(_decode_range, [(i, i + step) for i in range(0, len(_SAMPLES), step)]))
        elapsed = time.perf_counter() - started
    _SAMPLES.clear()
    return done / elapsed, (_cpu(resource.RUSAGE_CHILDREN) - cpu_before) / done


# --- (b) make_loader, in a child process so its memory is measured alone -----------------
def run_loader(urls: list[str], workers: int, batch_size: int, image_size: int, train: bool) -> None:
    """One epoch; prints samples, seconds and the CPU seconds of the loader alone (this
    process from make_loader on, plus its workers), not the interpreter's start and imports."""
    cpu_before = _cpu(resource.RUSAGE_SELF)
    started = time.perf_counter()
    loader = make_loader(urls, batch_size=batch_size, workers=workers, image_size=image_size,
                         train=train, pin_memory=False)
    batches = iter(loader)
    samples = len(next(batches)["key"])
    first = time.perf_counter()  # throughput counts from here, as (a) starts with its pool up
    steady = sum(len(batch["key"]) for batch in batches)
    seconds = time.perf_counter() - first
    del loader, batches  # its workers have exited and been reaped: their CPU is in RUSAGE_CHILDREN
    cpu = _cpu(resource.RUSAGE_SELF) - cpu_before + _cpu(resource.RUSAGE_CHILDREN)
    print(json.dumps({"samples": samples + steady, "steady_samples": steady, "seconds": seconds,
                      "first_batch_seconds": first - started, "cpu_seconds": cpu}))


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


def loader_in_child(folder: str, args, train: bool = True) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--run-loader", folder, "--workers", str(args.workers),
               "--batch-size", str(args.batch_size), "--image-size", str(args.image_size)] + ([] if train else ["--eval"])
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.wait(0.05):
            peak[0] = max(peak[0], _tree_pss_kib(child.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = child.communicate()
    stop.set()
    sampler.join()
    if child.returncode:
        raise SystemExit(f"error: the make_loader run on {folder} failed (status {child.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    return {"sps": result["steady_samples"] / result["seconds"], "samples": result["samples"],
            "first_batch_s": result["first_batch_seconds"],
            "cpu_ms": 1000 * result["cpu_seconds"] / result["samples"], "peak_pss_mib": peak[0] / 1024}


# --- (c) the seed's approach ------------------------------------------------------------
class SeedZipDataset(torch.utils.data.Dataset):
    """As the original code did: one ZipFile, folders paired by list position, PIL + ToTensor."""

    def __init__(self, dataset: str, image_size: int):
        from torchvision import transforms

        self.zip = zipfile.ZipFile(os.path.join(dataset, schema.ZIP_DIR, schema.zip_name(1)))
        names = self.zip.namelist()
        self.lists = [sorted(n for n in names if n.startswith(folder + "/") and not n.endswith("/"))
                      for folder in (schema.COMPOSITE_DIR, schema.MASK_DIR, schema.DEPTH_DIR)]
        self.bg_dir = os.path.join(dataset, schema.BG_DIR)
        self.to_tensor = transforms.ToTensor()
        self.resize = transforms.Resize((image_size, image_size))

    def __len__(self):
        return min(map(len, self.lists))

    def __getitem__(self, i):
        from PIL import Image

        bgfg, mask, depth = (Image.open(io.BytesIO(self.zip.read(names[i]))) for names in self.lists)
        bg = Image.open(os.path.join(self.bg_dir, schema.bg_name(schema.background_id(schema.key_of(self.lists[0][i])))))
        return (self.to_tensor(bg.convert("RGB")), self.to_tensor(bgfg.convert("RGB")),
                self.to_tensor(mask.convert("L")), self.to_tensor(self.resize(depth.convert("L"))))


def seed_zip_pil(dataset: str, samples: int, batch_size: int, image_size: int) -> float:
    data = SeedZipDataset(dataset, image_size)
    subset = torch.utils.data.Subset(data, range(min(samples, len(data))))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=True, num_workers=1)
    started = time.perf_counter()
    count = sum(len(batch[0]) for batch in loader)
    return count / (time.perf_counter() - started)


def main(argv=None) -> int:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=os.path.join(ROOT, "data", "bench-loader"),
                        help="where the generated dataset and shards are kept between runs (default data/bench-loader)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers and decode processes (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--seed-samples", type=int, default=2000,
                        help="samples timed for the slow seed approach (c) (default 2000)")
    parser.add_argument("--run-loader", metavar="FOLDER", help=argparse.SUPPRESS)  # (b)'s child process
    parser.add_argument("--eval", action="store_true", help=argparse.SUPPRESS)  # ... in eval mode
    args = parser.parse_args(argv)
    if args.run_loader:
        run_loader(_shard_urls(args.run_loader), args.workers, args.batch_size, args.image_size, not args.eval)
        return 0
    if min(args.workers, args.batch_size, args.image_size, args.seed_samples) < 1:
        parser.error("--workers, --batch-size, --image-size and --seed-samples must be at least 1")
    dataset, folders = prepare(args.cache, args.image_size)
    _log("(b) make_loader on 20 shards, then on 1 shard")
    many, one = loader_in_child(folders[20], args), loader_in_child(folders[1], args)
    _log("(b') make_loader in eval mode on 20 shards")
    evaluation = loader_in_child(folders[20], args, train=False)
    _log("(a) decode only")
    limit, limit_cpu = decode_only(_shard_urls(folders[1]), args.workers)
    _log("(c) seed approach: zip + PIL + ToTensor, 1 worker")
    seed = seed_zip_pil(dataset, args.seed_samples, args.batch_size, args.image_size)
    print(json.dumps({
        "samples": many["samples"], "image_size": args.image_size, "workers": args.workers,
        "batch_size": args.batch_size, "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
        "decode_only_sps": round(limit, 1), "make_loader_sps": round(many["sps"], 1),
        "make_loader_1_shard_sps": round(one["sps"], 1), "seed_zip_pil_sps": round(seed, 1),
        "ratio_make_loader_to_decode_only": round(many["sps"] / limit, 3),
        "speedup_over_seed": round(many["sps"] / seed, 2),
        # CPU time per sample does not depend on what else the machine runs at the time.
        "decode_only_cpu_ms_per_sample": round(1000 * limit_cpu, 3), "make_loader_cpu_ms_per_sample": round(many["cpu_ms"], 3),
        "cpu_ratio_decode_only_to_make_loader": round(1000 * limit_cpu / many["cpu_ms"], 3),
        "make_loader_eval_sps": round(evaluation["sps"], 1), "make_loader_first_batch_s": round(many["first_batch_s"], 2),
        "peak_pss_mib_20_shards": round(many["peak_pss_mib"]), "peak_pss_mib_1_shard": round(one["peak_pss_mib"]),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
