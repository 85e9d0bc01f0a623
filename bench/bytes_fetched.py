"""Benchmark: bytes fetched per train epoch at 8 ranks x 8 workers over 20 shards, in both shard
formats (compact: backgrounds once in backgrounds.tar; self-contained), against the old
behaviour (each share streams every shard it touches from byte 0), all in the same run.

Generates a small seed dataset (32 px, 64 samples per shard; cached under --cache), converts it
into 20 shards with their byte indexes, in each format, and serves it from a loopback HTTP server that counts
the body bytes it writes, per path. One train epoch is read rank by rank (rank=/world_size=,
as 8 GPUs would split it), each rank with 8 DataLoader workers:
  (a) indexed: the shards with their indexes, as the converter writes them;
  (b) baseline: the same shards without indexes (the manifest lists none), so every share
      streams its shards from the first byte, as the pipeline did before the index existed.
Prints one JSON line, per format: tar bytes sent (shards and backgrounds.tar) / the set's tar
bytes (ratio, baseline_ratio), the same / the bytes of the samples' own bgfg, mask and depth
members (per_member_bytes), and the index and manifest bytes apart. measure() returns the same
figures as a dict.
"""

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # counting.py: the tests' counting HTTP server

import counting  # noqa: E402  (needs tests/ on the path)

from pipeline import make_loader, schema  # noqa: E402
from seedzips import synthetic  # noqa: E402

# 4 zips x 4 backgrounds x 8 foregrounds x 10 placements = 1,280 samples: 64 in each of 20 shards.
SEED_DATASET = dict(zips=4, bgs_per_zip=4, fg=8, placements=10, seed=0, image_size=32)


def prepare(cache: str, shards: int, shard_format: str = schema.COMPACT) -> str:
    """The cached shard folder in `shard_format` (made when missing), with indexes and manifest."""
    import convert_zips

    out = os.path.join(cache, f"shards-{shards}-{shard_format}")
    manifest = os.path.join(out, schema.MANIFEST)
    if not (os.path.exists(manifest) and json.load(open(manifest)).get("complete")):
        seed = os.path.join(cache, "seed")
        if not os.path.isdir(seed):
            synthetic.generate(seed, workers=os.cpu_count() or 1, **SEED_DATASET)
        convert_zips.convert(seed, out, shards=shards, val_fraction=0, progress=False,
                             self_contained=shard_format == schema.SELF_CONTAINED)
    return out


def _without_indexes(folder: str, copy: str) -> str:
    """A copy of the shards whose manifest lists no index and beside which there is none."""
    os.makedirs(copy)
    manifest = json.load(open(os.path.join(folder, schema.MANIFEST)))
    for entry in manifest["shards"]:
        entry.pop("index")
        shutil.copy(os.path.join(folder, entry["name"]), copy)
    if "backgrounds" in manifest:
        for name in (schema.BACKGROUNDS, schema.index_name(schema.BACKGROUNDS)):
            shutil.copy(os.path.join(folder, name), copy)
    with open(os.path.join(copy, schema.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return copy


def _epoch_bytes(folder: str, shards: int, ranks: int, workers: int, batch_size: int) -> dict:
    with counting.http_server(folder) as server:
        url = f"{server.url}/{schema.TRAIN_PREFIX}-{{1..{shards}}}.tar"
        batches = 0
        for rank in range(ranks):
            loader = make_loader(url, batch_size=batch_size, workers=workers, image_size=32, train=True,
                                 rank=rank, world_size=ranks)
            batches += sum(1 for _ in loader)
        return {"tar": server.bytes_sent(".tar"), "index": server.bytes_sent(schema.INDEX_SUFFIX),
                "manifest": server.bytes_sent(schema.MANIFEST), "batches": batches}


def _tar_bytes(folder: str) -> tuple[int, int]:
    """(bytes of the set's tar files, training shards and backgrounds.tar; bytes of the training
    samples' own bgfg, mask and depth members)."""
    total = own = 0
    for name in os.listdir(folder):
        shard = name.endswith(".tar") and name.startswith(schema.TRAIN_PREFIX + "-")
        if shard or name == schema.BACKGROUNDS:
            total += os.path.getsize(os.path.join(folder, name))
        if shard:
            with tarfile.open(os.path.join(folder, name)) as tar:
                own += sum(m.size for m in tar if schema.split_member(m.name)[1] in schema.SAMPLE_MEMBERS)
    return total, own


def _measure_format(cache: str, shard_format: str, ranks: int, workers: int, shards: int, batch_size: int) -> dict:
    folder = prepare(cache, shards, shard_format)
    set_bytes, own_bytes = _tar_bytes(folder)
    indexed = _epoch_bytes(folder, shards, ranks, workers, batch_size)
    with tempfile.TemporaryDirectory(prefix="bench-bytes-") as tmp:
        baseline = _epoch_bytes(_without_indexes(folder, os.path.join(tmp, "shards")), shards, ranks, workers,
                                batch_size)
    assert indexed["batches"] == baseline["batches"], (indexed, baseline)
    return {"set_bytes": set_bytes, "own_member_bytes": own_bytes,
            "ratio": round(indexed["tar"] / set_bytes, 3),
            "baseline_ratio": round(baseline["tar"] / set_bytes, 3),
            "per_member_bytes": round(indexed["tar"] / own_bytes, 3),
            "index_bytes": indexed["index"], "manifest_bytes": indexed["manifest"],
            "batches": indexed["batches"]}


def measure(*, ranks: int = 8, workers: int = 8, shards: int = 20, batch_size: int = 4,
            cache: str = os.path.join(ROOT, "data", "bench-bytes")) -> dict:
    """Bytes fetched by one train epoch at ranks x workers, per format, indexed and baseline."""
    figures = {shard_format: _measure_format(cache, shard_format, ranks, workers, shards, batch_size)
               for shard_format in schema.FORMATS}
    return {"ranks": ranks, "workers": workers, "shards": shards, **figures}


def main(argv=None) -> int:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=8, help="ranks, simulated one after another (default 8)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers per rank (default 8)")
    parser.add_argument("--shards", type=int, default=20, help="training shards (default 20)")
    parser.add_argument("--cache", default=os.path.join(ROOT, "data", "bench-bytes"),
                        help="where the generated dataset and shards are kept (default data/bench-bytes)")
    args = parser.parse_args(argv)
    # 8 workers on a small machine is the point here, not a mistake worth a warning per rank.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    print(json.dumps(measure(ranks=args.ranks, workers=args.workers, shards=args.shards, cache=args.cache)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
