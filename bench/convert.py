"""Benchmark: convert_zips.py against `unzip -q` of the same full-size zip, in the same run.

Generates one seed-size zip (5 backgrounds x 100 foregrounds x 20 placements = 10,000 samples),
then times, alternately and --repeats times each, the converter as a user runs it (its CLI with
default workers, interpreter start included) and `unzip -q` into an empty temporary folder.
Prints one JSON line with the best time of each and their ratio (goal: ratio <= 1.0), the
ratio of the medians, and startup_s: the best time of starting the interpreter and importing
convert_zips.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline import schema  # noqa: E402  (needs ROOT on the path)
from seedzips import synthetic  # noqa: E402


def _timed(command: list, cwd: str) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv=None) -> int:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each command (default 5)")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels (default 224)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
        dataset = os.path.join(tmp, "dataset")
        summary = synthetic.generate(dataset, zips=1, bgs_per_zip=5, fg=100, placements=20,
                                     image_size=args.image_size, depth="mixed")
        zip_path = os.path.join(dataset, schema.ZIP_DIR, schema.zip_name(1))
        zip_bytes = os.path.getsize(zip_path)
        convert_times, unzip_times, startup_times = [], [], []
        for repeat in range(args.repeats):
            out, unzipped = os.path.join(tmp, f"shards-{repeat}"), os.path.join(tmp, f"unzipped-{repeat}")
            os.makedirs(unzipped)
            convert_times.append(_timed([sys.executable, os.path.join(ROOT, "convert_zips.py"),
                                         "--dataset", dataset, "--out", out], ROOT))
            unzip_times.append(_timed(["unzip", "-q", zip_path], unzipped))
            startup_times.append(_timed([sys.executable, "-c", "import convert_zips"], ROOT))
            shard_bytes = sum(entry.stat().st_size for entry in os.scandir(out))
            shutil.rmtree(out)
            shutil.rmtree(unzipped)
    convert_s, unzip_s = min(convert_times), min(unzip_times)
    print(json.dumps({"bench": "convert", "samples": summary["samples"], "zip_bytes": zip_bytes,
                      "shard_bytes": shard_bytes, "cpus": os.cpu_count(), "repeats": args.repeats,
                      "convert_s": round(convert_s, 3), "unzip_s": round(unzip_s, 3),
                      "ratio": round(convert_s / unzip_s, 3),
                      # unzip's time swings with the kernel's writeback of earlier runs' files
                      "ratio_of_medians": round(statistics.median(convert_times) / statistics.median(unzip_times), 3),
                      "startup_s": round(min(startup_times), 3),
                      "convert_all_s": [round(t, 3) for t in convert_times],
                      "unzip_all_s": [round(t, 3) for t in unzip_times]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
