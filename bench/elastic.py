"""Benchmark: bytes fetched by an epoch continued on another topology, per byte of its samples.

The shards of bench/bytes_fetched.py (1,280 samples of 32 px in 20 indexed shards), served by
the loopback HTTP server that counts the body bytes it writes. One train epoch is read at 8
ranks x 8 workers (ranks one after another, as 8 GPUs would split it) and stopped after half its
batches; each rank's state is the same, and rank 0's continues the epoch at 4 ranks x 8 workers.
The continued part's shard bytes are divided by the bytes of the samples it delivered (their
sample records in the shards, from the byte index). Baseline, in the same run: an uninterrupted
epoch at 4 x 8, its shard bytes over the bytes of the samples it delivered. Prints one JSON line.
"""

import argparse
import json
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # counting.py: the tests' counting HTTP server

import counting  # noqa: E402  (needs tests/ on the path)

from bench import bytes_fetched  # noqa: E402
from pipeline import make_loader, schema  # noqa: E402

SHARDS, BATCH = 20, 4


def _sample_bytes(folder: str) -> dict[str, int]:
    """Each key's bytes in its shard (its headers and members), from the byte indexes."""
    sizes = {}
    for n in range(1, SHARDS + 1):
        with open(os.path.join(folder, schema.index_name(schema.shard_name(schema.TRAIN_PREFIX, n))), "rb") as f:
            index = schema.decode_index(f.read())
        sizes.update((key, b - a) for key, a, b in zip(index.keys, index.offsets, index.offsets[1:]))
    return sizes


def _part(url: str, ranks: int, workers: int, *, stop_after=None, state=None) -> tuple[list[str], dict]:
    """The keys delivered by every rank (each stopped after `stop_after` batches) and rank 0's state."""
    keys, first_state = [], None
    for rank in range(ranks):
        loader = make_loader(url, batch_size=BATCH, workers=workers, image_size=32, train=True, rank=rank,
                             world_size=ranks, state=state)
        batches = iter(loader)
        for taken, batch in enumerate(batches, 1):
            keys.extend(batch["key"])
            if taken == stop_after:
                break
        first_state = first_state or loader.state_dict()
        batches.close()
    return keys, first_state


def measure(*, before: int = 8, after: int = 4, workers: int = 8,
            cache: str = os.path.join(ROOT, "data", "bench-bytes")) -> dict:
    folder = bytes_fetched.prepare(cache, SHARDS)
    sizes = _sample_bytes(folder)
    with counting.http_server(folder) as server:
        url = f"{server.url}/{schema.TRAIN_PREFIX}-{{1..{SHARDS}}}.tar"
        half = len(make_loader(url, batch_size=BATCH, workers=0, image_size=32, world_size=before, rank=0)) // 2
        first, state = _part(url, before, workers, stop_after=half)
        server.reset()
        rest, _ = _part(url, after, workers, state=state)
        continued = server.bytes_sent(".tar")
        server.reset()
        whole, _ = _part(url, after, workers)
        uninterrupted = server.bytes_sent(".tar")
    assert not set(first) & set(rest), "a sample delivered twice in the epoch"
    return {"before": f"{before}x{workers}", "after": f"{after}x{workers}", "stopped_at_sample": state["samples_done"],
            "continued_samples": len(rest), "continued_bytes": continued,
            "ratio": round(continued / sum(sizes[key] for key in rest), 3),
            "baseline_ratio": round(uninterrupted / sum(sizes[key] for key in whole), 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=int, default=8, help="ranks of the stopped part (default 8)")
    parser.add_argument("--after", type=int, default=4, help="ranks of the continued part (default 4)")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers per rank (default 8)")
    parser.add_argument("--cache", default=os.path.join(ROOT, "data", "bench-bytes"),
                        help="where bench/bytes_fetched.py's dataset and shards are kept (default data/bench-bytes)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    print(json.dumps(measure(before=args.before, after=args.after, workers=args.workers, cache=args.cache)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
