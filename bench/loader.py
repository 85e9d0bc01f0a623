"""Benchmark: make_loader's pipeline against the decode-only limit and stock webdataset.

On one seed-size zip (5 backgrounds x 100 foregrounds x 20 placements = 10,000 samples at
224 px, mixed depth maps), generated once and converted into 1 and into 20 shards (cached
under --cache), one run measures, each loader in a fresh child process whose CPU time (its
workers' included) is recorded, and in runs of their own (sampling it costs CPU) its peak
memory (PSS of all its processes together):
  (a) decode_only: the same samples' four JPEGs decoded at full size in --workers processes
      from memory, nothing else (bench/loader_baselines.py): the ceiling for any loader
      decoding them whole; and (a_s) the same at the libjpeg reduction scaled decode uses for
      each training size below 224 (1/2 at 112 and 64 px): the ceiling of a scaled decode;
  (b) the pipeline: a pipeline.Pipeline in train mode (shuffle buffer, decode, fit to size,
      augmentation draws; the draws are applied on the training device by Batch.to, which is
      not timed here), --workers workers, --batch-size, TWO epochs back to back on its
      persistent workers, so the epoch change counts; at each of --sizes (the training side:
      224, 112, 64), with scaled decode and, below 224, without it (scaled_decode=False);
      at the first size also on 1 shard (its memory must not grow with the number of
      shards) and in eval mode, for context;
  (w) stock webdataset doing the same work at the first size: webdataset.WebDataset over the
      same 20 shards in the self-contained format (stock readers find no background in a
      compact sample), a shuffle buffer, the pipeline's per-sample decode + fit and draw,
      batches of --batch-size, a torch DataLoader with --workers workers, two epochs;
  (c) seed_zip_pil: the original zip + PIL + ToTensor loader, 1 worker;
  (f) bytes fetched by one train epoch at 8 ranks x 8 workers over 20 shards, with the byte
      index and without it (bench/bytes_fetched.py), as ratios to the shard bytes.
(a), (w) and, at every size, (b) and (a_s) take turns for --rounds rounds and each reports its
best round, so that load from elsewhere that comes and goes does not land on one of them
alone; each round's ratios are printed as well. Loaders are timed from their first batch on,
as (a) starts with its processes up; the first batch's latency is reported apart. Prints one
JSON line: at the first size, samples/s of each, the ratios of (b) to (a) and to (w), CPU
milliseconds per sample (which hold even on a busy machine), peak PSS, what corrupt-JPEG
detection costs (strict vs lenient decode), the decode-only figure of torchvision.io.decode_jpeg
(the decoder used before), and the bytes-fetched ratios; under "sizes", per training size,
(b) with and without scaled decode, (a) and (a_s) and their ratios.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import bytes_fetched, loader_baselines as baselines  # noqa: E402  (needs ROOT on the path)
from bench.loader_runs import EPOCHS, loader_in_child, shard_urls  # noqa: E402
from pipeline import schema  # noqa: E402
from seedzips import synthetic  # noqa: E402

SEED_DATASET = dict(zips=1, bgs_per_zip=5, fg=100, placements=20, seed=0, depth="mixed")
MEMBER_SIZE = 224  # the seed dataset's image side; training sizes below it are fitted to


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
    # The pipeline reads the default (compact) shards; stock webdataset cannot join a sample to
    # its background there, so it reads the self-contained ones ("webdataset").
    folders = {}
    for name, count, shard_format in ((20, 20, schema.COMPACT), (1, 1, schema.COMPACT),
                                      ("webdataset", 20, schema.SELF_CONTAINED)):
        out = os.path.join(cache, f"shards-{image_size}-{count}-{shard_format}")
        manifest = os.path.join(out, schema.MANIFEST)
        if not (os.path.exists(manifest) and json.load(open(manifest)).get("complete")):
            _log(f"converting into {count} {shard_format} shard(s)")
            convert_zips.convert(seed, out, shards=count, val_fraction=0, progress=False,
                                 self_contained=shard_format == schema.SELF_CONTAINED)
        folders[name] = out
    return seed, folders


def _best(results: list, key=lambda result: result["sps"]):
    return max(results, key=key)


def _round(args, folders: dict) -> dict:
    """One round of the runs that take turns: (a) once (it does not depend on the size), then
    per size (b), below the member size also (b) unscaled and (a_s), and (w) at the first."""
    full_shard = shard_urls(folders[1])
    result = {"decode": baselines.decode_only(full_shard, args.workers, "strict"), "sizes": {}}
    for number, size in enumerate(args.sizes):
        runs = {"pipeline": loader_in_child("train", folders[20], args, size)}
        if number == 0:
            runs["webdataset"] = loader_in_child("webdataset", folders["webdataset"], args, size)
        if size < MEMBER_SIZE:
            runs["unscaled"] = loader_in_child("unscaled", folders[20], args, size)
            runs["scaled_decode"] = baselines.decode_only(full_shard, args.workers, "strict", size)
        result["sizes"][size] = runs
    return result


def _by_size(rounds: list, size: int, limit: tuple) -> dict:
    """Per training size: the best round of (b), (b) unscaled and (a_s), and their ratios to (a)."""
    runs = [r["sizes"][size] for r in rounds]
    best = _best([r["pipeline"] for r in runs])
    line = {"make_loader_sps": round(best["sps"], 1), "decode_only_full_sps": round(limit[0], 1),
            "ratio_make_loader_to_decode_only_full": round(best["sps"] / limit[0], 3),
            "ratio_per_round": [round(r["pipeline"]["sps"] / a["decode"][0], 3) for r, a in zip(runs, rounds)],
            "make_loader_cpu_ms_per_sample": round(best["cpu_ms"], 3),
            "make_loader_stage_ms_per_sample": {k: round(v, 3) for k, v in best["stage_ms"].items()}}
    if size < MEMBER_SIZE:
        unscaled = _best([r["unscaled"] for r in runs])
        scaled_sps, scaled_cpu = _best([r["scaled_decode"] for r in runs], key=lambda result: result[0])
        line.update({"make_loader_unscaled_sps": round(unscaled["sps"], 1),
                     "make_loader_unscaled_cpu_ms_per_sample": round(unscaled["cpu_ms"], 3),
                     "speedup_of_scaled_decode": round(best["sps"] / unscaled["sps"], 2),
                     "decode_only_scaled_sps": round(scaled_sps, 1),
                     "decode_only_scaled_cpu_ms_per_sample": round(1000 * scaled_cpu, 3),
                     "ratio_make_loader_to_decode_only_scaled": round(best["sps"] / scaled_sps, 3)})
    return line


def _sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",")]
    if not sizes or min(sizes) < 1 or max(sizes) > MEMBER_SIZE:
        raise argparse.ArgumentTypeError(f"sizes must be between 1 and {MEMBER_SIZE}, got {text!r}")
    return sizes


def main(argv=None) -> int:
    """Run the benchmark and print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=os.path.join(ROOT, "data", "bench-loader"),
                        help="where the generated dataset and shards are kept between runs (default data/bench-loader)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers and decode processes (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--sizes", type=_sizes, default=[MEMBER_SIZE, 112, 64],
                        help=f"training image sides, comma-separated; the first also gets (w), (c), memory and eval "
                        f"(default {MEMBER_SIZE},112,64; the JPEGs are {MEMBER_SIZE} px)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of (a), (b), (a_s) and (w) taking turns; each reports its best (default 3)")
    parser.add_argument("--seed-samples", type=int, default=2000,
                        help="samples timed for the slow seed approach (c) (default 2000)")
    args = parser.parse_args(argv)
    if min(args.workers, args.batch_size, args.seed_samples, args.rounds) < 1:
        parser.error("--workers, --batch-size, --seed-samples and --rounds must be at least 1")
    dataset, folders = prepare(args.cache, MEMBER_SIZE)
    size = args.sizes[0]
    # The machine may be busy with other work that comes and goes: the runs take turns,
    # round after round, and each reports its best round (as timeit does), so that a burst of
    # load hits no one alone. Every round's ratio is printed too.
    rounds = []
    for number in range(1, args.rounds + 1):
        _log(f"round {number}/{args.rounds}: (a) decode only, then (b), (a_s) and (w) at {args.sizes} px")
        rounds.append(_round(args, folders))
    at_first = [r["sizes"][size] for r in rounds]
    many, stock = _best([r["pipeline"] for r in at_first]), _best([r["webdataset"] for r in at_first])
    limit, limit_cpu = _best([r["decode"] for r in rounds], key=lambda result: result[0])
    _log(f"(b') peak memory of the pipeline on 20 shards and on 1 shard, then eval mode, at {size} px")
    many_memory = loader_in_child("train", folders[20], args, size, memory=True)
    one = loader_in_child("train", folders[1], args, size, memory=True)
    evaluation = loader_in_child("eval", folders[20], args, size)
    _log("(a') decode only, lenient and torchvision")
    _, lenient_cpu = baselines.decode_only(shard_urls(folders[1]), args.workers, "lenient")
    torchvision_sps, torchvision_cpu = baselines.decode_only(shard_urls(folders[1]), args.workers, "torchvision")
    _log("(c) seed approach: zip + PIL + ToTensor, 1 worker")
    seed = baselines.seed_zip_pil(dataset, args.seed_samples, args.batch_size, size)
    _log("(f) bytes fetched per epoch, 8 ranks x 8 workers over 20 shards (bench/bytes_fetched.py)")
    fetched = bytes_fetched.measure()
    print(json.dumps({
        "samples_per_epoch": many["samples"] // EPOCHS, "epochs": EPOCHS, "image_size": size,
        "workers": args.workers, "batch_size": args.batch_size, "cpus": os.cpu_count(), "rounds": args.rounds,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "decode_only_sps": round(limit, 1), "make_loader_sps": round(many["sps"], 1),
        "webdataset_sps": round(stock["sps"], 1),
        "ratio_make_loader_to_decode_only": round(many["sps"] / limit, 3),
        "ratio_make_loader_to_webdataset": round(many["sps"] / stock["sps"], 2),
        "ratio_to_decode_only_per_round": [round(r["pipeline"]["sps"] / a["decode"][0], 3)
                                           for r, a in zip(at_first, rounds)],
        "ratio_to_webdataset_per_round": [round(r["pipeline"]["sps"] / r["webdataset"]["sps"], 2) for r in at_first],
        # CPU time per sample does not depend on what else the machine runs at the time.
        "decode_only_cpu_ms_per_sample": round(1000 * limit_cpu, 3),
        "make_loader_cpu_ms_per_sample": round(many["cpu_ms"], 3),
        "webdataset_cpu_ms_per_sample": round(stock["cpu_ms"], 3),
        "cpu_ratio_decode_only_to_make_loader": round(1000 * limit_cpu / many["cpu_ms"], 3),
        "make_loader_stage_ms_per_sample": {k: round(v, 3) for k, v in many["stage_ms"].items()},
        "corrupt_jpeg_check_cpu_ms_per_sample": round(1000 * (limit_cpu - lenient_cpu), 4),
        "torchvision_decode_only_sps": round(torchvision_sps, 1),
        "torchvision_decode_only_cpu_ms_per_sample": round(1000 * torchvision_cpu, 3),
        "make_loader_first_batch_s": round(many["first_batch_s"], 2),
        "make_loader_epoch_change_s": round(many["epoch_change_s"], 3),
        "webdataset_epoch_change_s": round(stock["epoch_change_s"], 3),
        "make_loader_1_shard_sps": round(one["sps"], 1), "make_loader_eval_sps": round(evaluation["sps"], 1),
        "peak_pss_mib_20_shards": round(many_memory["peak_pss_mib"]),
        "peak_pss_mib_1_shard": round(one["peak_pss_mib"]),
        "seed_zip_pil_sps": round(seed, 1), "speedup_over_seed": round(many["sps"] / seed, 2),
        "bytes_fetched_ratio_8x8": fetched[schema.COMPACT]["ratio"],
        "bytes_fetched_baseline_ratio_8x8": fetched[schema.COMPACT]["baseline_ratio"],
        "sizes": {str(side): _by_size(rounds, side, (limit, limit_cpu)) for side in args.sizes},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
