"""Make a seed-layout dataset from your own photos: composites, masks and depth labels.

    python -m seedzips.compose --bg photos/backgrounds --fg photos/cutouts --out data/mine
    python convert_zips.py --dataset data/mine --out shards/mine
    python -m seedzips.compose --bg photos/backgrounds --fg photos/cutouts --shards s3://bucket/mine
    torchrun --nproc_per_node=8 -m seedzips.compose ... (each rank labels its own zips on its GPU)

The seed's recipe: every foreground cut-out and its mirror image is pasted --placements times on
every background, at a random scale and position that keep the whole cut-out inside the frame,
alpha-blended; the mask is the pasted alpha, thresholded. A transformers depth model labels
every composite (see seedzips.depthlabel for the conversion to 0..255, larger = farther).

Output (what convert_zips.py reads): bg/{i}_bg.jpg (backgrounds in sorted file-name order,
224x224), fg/{j}_fg.jpg + mask/{j}_fg_mask.jpg (the cut-outs, then their mirror images: j and
j + F are one cut-out), zipFiles/batch_{b}.zip (--bgs-per-zip backgrounds each) holding
bg_fg_1/, bg_fg_mask_1/, depthMap/ {i}_bg_{k}_fg.jpg with k = (j - 1) * placements + p, labels.txt
and placements.json (where each sample's cut-out went), and compose.json (the options, the
inputs' digests, the model, the zips done). A zip appears only when complete; a re-run with the
same inputs and options keeps the zips done and makes the same bytes as one uninterrupted run.
"""

import argparse
import contextlib
import multiprocessing
import os
import shutil
import sys
import time

from tqdm import tqdm

from pipeline import schema
from seedzips import placement
from seedzips.composerecord import RECORD  # noqa: F401 (the record's name, told to users)
from seedzips.composerecord import (RECORD_VERSION, file_record, prepare, ranks_zips, read_record, remove_rank_records,
                                    remove_temporaries, reusable, write_record)
from seedzips.composezip import PLACEMENTS_NAME  # noqa: F401 (the name of a zip member, told to users)
from seedzips.composezip import ordered, set_sources, write_sources, write_zip, zip_samples
from seedzips.depthlabel import DEFAULT_MODEL, DEVICES, DepthLabeller
from seedzips.errors import ConvertError, run_command
from seedzips.convert import convert
from seedzips.ranks import Ranks
from pipeline.clients import storage_option
from seedzips.storage import staging_folder

def _check_options(placements, scale, bgs_per_zip, batch_size, workers, seed) -> None:
    for option, value in (("--placements", placements), ("--bgs-per-zip", bgs_per_zip),
                          ("--batch-size", batch_size), ("--workers", workers)):
        if value < 1:
            raise ConvertError(f"{option} {value}: must be at least 1")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ConvertError(f"--scale {scale[0]} {scale[1]}: need 0 < MIN <= MAX <= 1")
    if seed < 0:
        raise ConvertError(f"--seed {seed}: must be at least 0")


def compose(bg_dir, fg_dir, out, *, fg_masks=None, placements=20, scale=(0.25, 0.75), bgs_per_zip=5,
            depth_model=DEFAULT_MODEL, device="auto", batch_size=16, workers=1, seed=0, progress=True) -> dict:
    """Write the seed-layout dataset of these photos to `out`; return its record (also out/compose.json).

    Under torchrun, each rank writes its own zips (seedzips.ranks); rank 0 returns the whole
    record, the others theirs. Raises ConvertError with a one-line message on bad input,
    options, model or output folder.
    """
    started = time.monotonic()
    out = os.fspath(out)
    _check_options(placements, scale, bgs_per_zip, batch_size, workers, seed)
    backgrounds, foregrounds, read = placement.load_sources(bg_dir, fg_dir, fg_masks)
    zip_bgs = [list(range(first, min(first + bgs_per_zip, len(backgrounds) + 1)))
               for first in range(1, len(backgrounds) + 1, bgs_per_zip)]
    ranks = Ranks()
    pool = None
    sources = ([image for _, image in backgrounds], foregrounds)
    if workers > 1:
        # Forked before torch is imported: a child of a process running torch's threads may hang.
        pool = multiprocessing.get_context("fork").Pool(workers, set_sources, (sources,))
    set_sources(sources)
    try:
        # Before anything is written: it may fail.
        labeller = DepthLabeller(depth_model, device, index=ranks.local if ranks.world > 1 else None)
        ranks.start()
        header = {"version": RECORD_VERSION, "depth": labeller.identity | {"device": labeller.device.type},
                  "options": {"placements": placements, "scale": list(scale), "bgs_per_zip": bgs_per_zip,
                              "batch_size": batch_size, "seed": seed, "size": placement.SIZE},
                  "inputs": [file_record(option, path) for option, path in read]}
        if ranks.rank == 0:
            entries = reusable(out, prepare(out), header)
            write_sources(out, backgrounds, foregrounds)
            write_record(out, {**header, "zips": entries, "complete": False})
            remove_rank_records(out)  # what they listed is in compose.json now, if still intact
        ranks.wait_for_all()
        if ranks.rank != 0:
            entries = read_record(out)["zips"]
        names = [schema.zip_name(b) for b in range(1, len(zip_bgs) + 1)]
        todo = [(name, zip_samples(bgs, foregrounds, placements, scale, seed))
                for name, bgs in zip(names, zip_bgs) if name in ranks.mine(names) and name not in entries]
        chunks = [samples[i:i + batch_size] for _, samples in todo for i in range(0, len(samples), batch_size)]
        results = ordered(pool, chunks, 2 * workers)
        written = {}  # by this rank
        with tqdm(total=sum(len(s) for _, s in todo), unit="sample", desc=f"composing{ranks.label}",
                  disable=not progress) as bar:
            for name, samples in todo:
                written[name] = write_zip(os.path.join(out, schema.ZIP_DIR, name), samples, results,
                                          labeller, batch_size, foregrounds, bar)
                listed = entries | written if ranks.rank == 0 else written
                write_record(out, {**header, "zips": listed, "complete": False}, ranks.rank)
        ranks.wait_for_all()
        if ranks.rank == 0:
            record = {**header, "zips": entries | written | ranks_zips(out, header), "complete": True}
            write_record(out, record)
            remove_rank_records(out)
        else:
            record = {**header, "zips": written, "complete": False}
    except BaseException as error:
        with contextlib.suppress(OSError):
            remove_temporaries(out)  # no half-written zip outlives the run
        if isinstance(error, OSError):
            raise ConvertError(f"cannot write to --out {out}: {error.strerror or error}") from None
        raise
    finally:
        if pool is not None:
            pool.terminate()
        ranks.close()
    if progress:
        made = sum(len(s) for _, s in todo)
        rank, mine = (f"rank {ranks.rank}/{ranks.world}: ", f" ({', '.join(written)})") if ranks.world > 1 else ("", "")
        print(f"{rank}{made} samples in {len(todo)} zips{mine} "
              f"({len(names) - len(todo)} already done), {time.monotonic() - started:.1f} s -> {out}")
    return record


def main(argv=None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m seedzips.compose", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bg", required=True, help="folder of background photos (JPEG/PNG, any size: "
                        "centre-cropped to a square and resized to 224x224)")
    parser.add_argument("--fg", required=True, help="folder of foreground cut-outs: PNGs with alpha, "
                        "or JPEG/PNG with --fg-masks")
    parser.add_argument("--fg-masks", help="folder of masks named as the foregrounds (white = object); "
                        "a mask replaces a PNG's alpha")
    parser.add_argument("--out", help="dataset folder to write (bg/, fg/, mask/, zipFiles/); with --shards "
                        "optional (default: a work folder in TMPDIR, removed once the shards are complete)")
    parser.add_argument("--shards", metavar="OUT", help="also convert the dataset to shards, indexes and "
                        "manifest.json at OUT, a folder or fsspec URL, as convert_zips.py --out does")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="with --shards: fraction of backgrounds held out for validation (default 0.05)")
    parser.add_argument("--self-contained", action="store_true",
                        help="with --shards: every sample carries its background and json, as "
                        "convert_zips.py --self-contained writes (default: the compact format)")
    parser.add_argument("--storage-option", dest="storage_options", action="append", type=storage_option,
                        default=[], metavar="KEY=VALUE",
                        help="with --shards: fsspec option for a remote OUT, repeatable")
    parser.add_argument("--placements", type=int, default=20,
                        help="placements of each cut-out and of its mirror image on each background, each at "
                        "a random scale and position with the whole cut-out inside the frame (default 20)")
    parser.add_argument("--scale", type=float, nargs=2, metavar=("MIN", "MAX"), default=(0.25, 0.75),
                        help="the pasted cut-out's longer side, as a fraction of the frame's side, "
                        "drawn uniformly from [MIN, MAX] (default 0.25 0.75)")
    parser.add_argument("--bgs-per-zip", type=int, default=5, help="backgrounds per zip (default 5, as the seed)")
    parser.add_argument("--depth-model", default=DEFAULT_MODEL,
                        help=f"transformers depth-estimation model: a hub id or a save_pretrained folder "
                        f"(default {DEFAULT_MODEL})")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the depth model runs (default auto: CUDA in bf16/fp16 when present)")
    parser.add_argument("--batch-size", type=int, default=16, help="composites per depth-model batch (default 16)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes composing (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the placements (default 0)")
    args = parser.parse_args(argv)
    if args.out is None and args.shards is None:
        parser.error("give --out DATASET, --shards OUT or both")
    dataset = args.out or staging_folder(args.shards, "compose")  # named after OUT: a re-run resumes

    def work():
        record = compose(args.bg, args.fg, dataset, fg_masks=args.fg_masks, placements=args.placements,
                         scale=tuple(args.scale), bgs_per_zip=args.bgs_per_zip, depth_model=args.depth_model,
                         device=args.device, batch_size=args.batch_size, workers=args.workers, seed=args.seed)
        if args.shards is not None and record["complete"]:  # rank 0 converts what all ranks made
            convert(dataset, args.shards, val_fraction=args.val_fraction, seed=args.seed,
                    self_contained=args.self_contained, workers=args.workers,
                    storage_options=dict(args.storage_options) or None)
            if args.out is None:
                shutil.rmtree(dataset)

    return run_command(work, error_status=2)


if __name__ == "__main__":
    sys.exit(main())
