"""Benchmark: the bytes of a shard set against its source zips' bytes, compact and
self-contained, in the same run (issue 23; goal: compact <= 1.5x the zips).

Converts one seed dataset (--data; by default the issue's 4 full-size zips, 40,000 samples,
generated into a temporary folder as `python -m seedzips.synthetic --zips 4 --bgs-per-zip 5
--fg 100 --placements 20` makes them) with convert_zips.py's defaults into both formats.
Prints one JSON line: for each format the set's bytes (every file the converter wrote: shards,
indexes, backgrounds.tar and its index, sources files, manifest.json) and each part apart, their
ratio to the zips' bytes, and the mean bytes per sample by member (the member's own bytes, and
the tar headers and padding of all its members apart); backgrounds.tar's bytes per sample too.
"""

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline import schema  # noqa: E402  (needs ROOT on the path)

DATASET_ARGS = ["--zips", "4", "--bgs-per-zip", "5", "--fg", "100", "--placements", "20"]


def _part(name: str) -> str:
    """Which part of a shard set a file of it is."""
    if name == schema.MANIFEST:
        return "manifest"
    if name.startswith(schema.BACKGROUNDS):
        return "backgrounds_index" if name.endswith(schema.INDEX_SUFFIX) else "backgrounds"
    if name.endswith(schema.SOURCES_SUFFIX):
        return "sources"
    return "indexes" if name.endswith(schema.INDEX_SUFFIX) else "shards"


def _per_sample(out: str, manifest: dict) -> dict:
    """Mean bytes per sample in the shards by member suffix, and of headers and padding."""
    totals, samples = {}, manifest["totals"]["samples"]
    for entry in manifest["shards"]:
        path = os.path.join(out, entry["name"])
        with tarfile.open(path) as archive:
            members = archive.getmembers()
        for member in members:
            suffix = schema.split_member(member.name)[1]
            totals[suffix] = totals.get(suffix, 0) + member.size
        totals["headers_padding"] = totals.get("headers_padding", 0) + entry["bytes"] - sum(m.size for m in members)
    return {suffix: round(size / samples, 1) for suffix, size in totals.items()}


def measure(dataset: str, work: str, workers: int | None) -> dict:
    """Convert `dataset` into both formats under `work`; the figures of each."""
    import convert_zips

    zip_folder = os.path.join(dataset, schema.ZIP_DIR)
    zip_bytes = sum(entry.stat().st_size for entry in os.scandir(zip_folder))
    figures = {"bench": "shard_bytes", "zip_bytes": zip_bytes}
    for shard_format in schema.FORMATS:
        out = os.path.join(work, shard_format)
        started = time.perf_counter()
        manifest = convert_zips.convert(dataset, out, self_contained=shard_format == schema.SELF_CONTAINED,
                                        workers=workers, progress=False)
        seconds = time.perf_counter() - started
        parts = {}
        for entry in os.scandir(out):
            parts[_part(entry.name)] = parts.get(_part(entry.name), 0) + entry.stat().st_size
        total = sum(parts.values())
        samples = manifest["totals"]["samples"]
        figures.update(samples=samples, backgrounds=manifest["inputs"]["backgrounds"])
        figures[shard_format] = {
            "bytes": total, "ratio": round(total / zip_bytes, 3),
            "shards_ratio": round(manifest["totals"]["bytes"] / zip_bytes, 3), "parts": parts,
            "per_sample": _per_sample(out, manifest),
            "backgrounds_per_sample": round(parts.get("backgrounds", 0) / samples, 1),
            "convert_s": round(seconds, 1)}
    figures["compact_vs_self_contained"] = round(figures[schema.COMPACT]["bytes"]
                                                 / figures[schema.SELF_CONTAINED]["bytes"], 3)
    return figures


def main(argv=None) -> int:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="seed-layout dataset to convert (default: generate the issue's 4 zips)")
    parser.add_argument("--workers", type=int, help="converter processes (default: all cores)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-shard-bytes-") as work:
        dataset = args.data
        if dataset is None:
            dataset = os.path.join(work, "dataset")
            subprocess.run([sys.executable, "-m", "seedzips.synthetic", "--out", dataset, *DATASET_ARGS,
                            "--workers", str(args.workers or os.cpu_count() or 1)],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        print(json.dumps(measure(dataset, work, args.workers)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
