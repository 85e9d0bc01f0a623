"""Convert the seed dataset's zips into shuffled, reproducible WebDataset tar shards.

    python convert_zips.py --dataset data/seed --out shards/
    python convert_zips.py --dataset data/seed --out s3://bucket/shards --storage-option anon=false

Writes batch-{1..N}.tar (training), val-{1..M}.tar (every sample of the held-out backgrounds),
a byte index beside each shard (batch-1.tar.idx: where each sample starts, for ranged reads)
and manifest.json. By default the shard set is compact: a sample holds KEY.bgfg.jpg,
KEY.mask.jpg and KEY.depth.jpg; each background is stored once, in backgrounds.tar beside the
shards (KEY 11_bg_5_fg takes 11_bg.bg.jpg), and each sample's provenance (the json a
self-contained sample carries) is in batch-1.tar.sources.json. --self-contained writes every
sample whole (KEY.bg.jpg and KEY.json too), for readers that cannot join a sample to its background. Samples are spread over the shards by a seeded permutation, so each shard
mixes all zips. Shards appear only when complete, and a re-run resumes an interrupted job.
--out and --dataset may be any fsspec URL (s3://, gs://, ...): shards are uploaded as they are
finished and manifest.json last; a remote dataset's zips are indexed by ranged reads and
downloaded once (see seedzips.storage).
"""

import argparse
import sys

from pipeline.clients import storage_option
from seedzips.convert import convert
from seedzips.errors import run_command


def main(argv=None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True,
                        help="seed-layout folder or URL holding bg/ and zipFiles/")
    parser.add_argument("--out", default="shards",
                        help="output folder or fsspec URL for shards and manifest.json (default shards/)")
    parser.add_argument("--shards", type=int, help="training shards (default: one per input zip)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="fraction of backgrounds held out for validation (default 0.05; 0 disables)")
    parser.add_argument("--val-shards", type=int,
                        help="validation shards (default: about as full as training shards)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the held-out choice and the shuffle (default 0)")
    parser.add_argument("--self-contained", action="store_true",
                        help="store each sample's background and json in its shard (5 members per sample, "
                        "about 1.7x the bytes), for stock readers that cannot join a sample to "
                        "backgrounds.tar; default: the compact format (bgfg, mask and depth per sample)")
    parser.add_argument("--workers", type=int, help="processes writing shards (default: all cores)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on an incomplete sample instead of skipping it")
    parser.add_argument("--storage-option", dest="storage_options", action="append", type=storage_option,
                        default=[], metavar="KEY=VALUE",
                        help="fsspec option for a remote --out or --dataset, repeatable; VALUE may be JSON, "
                        'e.g. client_kwargs=\'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    args = parser.parse_args(argv)
    return run_command(lambda: convert(
        args.dataset, args.out, shards=args.shards, val_fraction=args.val_fraction, val_shards=args.val_shards,
        seed=args.seed, self_contained=args.self_contained, workers=args.workers, strict=args.strict,
        storage_options=dict(args.storage_options) or None),
        error_status=1)

if __name__ == "__main__":
    sys.exit(main())
