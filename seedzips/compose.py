"""Make a seed-layout dataset from your own photos: composites, masks and depth labels.

    python -m seedzips.compose --bg photos/backgrounds --fg photos/cutouts --out data/mine
    python convert_zips.py --dataset data/mine --out shards/mine

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
import json
import multiprocessing
import os
import sys
import time

from tqdm import tqdm

from pipeline import schema
from pipeline.schema import TEMPORARY
from seedzips import placement
from seedzips.composezip import PLACEMENTS_NAME  # noqa: F401 (the name of a zip member, told to users)
from seedzips.composezip import ordered, set_sources, write_sources, write_zip, zip_samples
from seedzips.depthlabel import DEFAULT_MODEL, DEVICES, DepthLabeller
from seedzips.errors import ConvertError
from seedzips.storage import sha256_of

RECORD = "compose.json"
RECORD_VERSION = 1
_FOLDERS = (schema.BG_DIR, schema.FG_DIR, schema.FG_MASK_DIR, schema.ZIP_DIR)


def _file_record(option: str, path: str) -> dict:
    with open(path, "rb") as f:
        return {"option": option, "name": os.path.basename(path), **schema.file_record(f.read())}


def _write_record(out: str, record: dict) -> None:
    schema.write_durably(os.path.join(out, RECORD), (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def _remove_temporaries(out: str) -> None:
    """Delete the half-written files of an interrupted or failed run."""
    for folder in _FOLDERS:
        for name in os.listdir(os.path.join(out, folder)):
            if name.endswith(TEMPORARY):
                os.remove(os.path.join(out, folder, name))


def _prepare(out: str) -> dict | None:
    """Make the output folders, delete an interrupted run's temporaries; the record found, if any."""
    for folder in _FOLDERS:
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    _remove_temporaries(out)
    try:
        with open(os.path.join(out, RECORD)) as f:
            record = json.load(f)
        if isinstance(record, dict) and isinstance(record.get("zips"), dict):
            return record
    except (OSError, ValueError):
        pass
    zips = [n for n in os.listdir(os.path.join(out, schema.ZIP_DIR)) if schema.ZIP_PATTERN.match(n)]
    if zips:
        raise ConvertError(f"--out {out} already holds {schema.ZIP_DIR}/{zips[0]} and no {RECORD} of compose: "
                           "not a dataset compose made; give a new or empty folder")
    return None


def _reusable(out: str, old: dict | None, header: dict) -> dict:
    """The zips an earlier run with this header finished and that are intact: {name: record}."""
    if old is None:
        return {}
    if any(old.get(field) != value for field, value in header.items()):
        print(f"{os.path.join(out, RECORD)} was made with other options or inputs; starting over", file=sys.stderr)
        for folder in _FOLDERS:
            for name in os.listdir(os.path.join(out, folder)):
                os.remove(os.path.join(out, folder, name))
        return {}
    done = {}
    for name, entry in old["zips"].items():
        path = os.path.join(out, schema.ZIP_DIR, os.path.basename(name))
        if isinstance(entry, dict) and os.path.isfile(path) and os.path.getsize(path) == entry.get("bytes") \
                and sha256_of(path) == entry.get("sha256"):
            done[name] = {"bytes": entry["bytes"], "sha256": entry["sha256"]}
    return done


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

    Raises ConvertError with a one-line message on bad input, options, model or output folder.
    """
    started = time.monotonic()
    out = os.fspath(out)
    _check_options(placements, scale, bgs_per_zip, batch_size, workers, seed)
    backgrounds, foregrounds, read = placement.load_sources(bg_dir, fg_dir, fg_masks)
    zip_bgs = [list(range(first, min(first + bgs_per_zip, len(backgrounds) + 1)))
               for first in range(1, len(backgrounds) + 1, bgs_per_zip)]
    pool = None
    sources = ([image for _, image in backgrounds], foregrounds)
    if workers > 1:
        # Forked before torch is imported: a child of a process running torch's threads may hang.
        pool = multiprocessing.get_context("fork").Pool(workers, set_sources, (sources,))
    set_sources(sources)
    try:
        labeller = DepthLabeller(depth_model, device)  # before anything is written: it may fail
        old = _prepare(out)
        header = {"version": RECORD_VERSION, "depth": labeller.identity | {"device": labeller.device.type},
                  "options": {"placements": placements, "scale": list(scale), "bgs_per_zip": bgs_per_zip,
                              "batch_size": batch_size, "seed": seed, "size": placement.SIZE},
                  "inputs": [_file_record(option, path) for option, path in read]}
        entries = _reusable(out, old, header)
        write_sources(out, backgrounds, foregrounds)
        names = [schema.zip_name(b) for b in range(1, len(zip_bgs) + 1)]
        _write_record(out, {**header, "zips": entries, "complete": False})
        todo = [(name, zip_samples(bgs, foregrounds, placements, scale, seed))
                for name, bgs in zip(names, zip_bgs) if name not in entries]
        chunks = [samples[i:i + batch_size] for _, samples in todo for i in range(0, len(samples), batch_size)]
        results = ordered(pool, chunks, 2 * workers)
        with tqdm(total=sum(len(s) for _, s in todo), unit="sample", desc="composing", disable=not progress) as bar:
            for name, samples in todo:
                entries[name] = write_zip(os.path.join(out, schema.ZIP_DIR, name), samples, results,
                                           labeller, batch_size, foregrounds, bar)
                _write_record(out, {**header, "zips": entries, "complete": False})
        record = {**header, "zips": entries, "complete": True}
        _write_record(out, record)
    except BaseException as error:
        with contextlib.suppress(OSError):
            _remove_temporaries(out)  # no half-written zip outlives the run
        if isinstance(error, OSError):
            raise ConvertError(f"cannot write to --out {out}: {error.strerror or error}") from None
        raise
    finally:
        if pool is not None:
            pool.terminate()
    if progress:
        made = sum(len(s) for _, s in todo)
        print(f"{made} samples in {len(todo)} zips ({len(names) - len(todo)} already done), "
              f"{time.monotonic() - started:.1f} s -> {out}")
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
    parser.add_argument("--out", required=True, help="dataset folder to write (bg/, fg/, mask/, zipFiles/)")
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
    try:
        compose(args.bg, args.fg, args.out, fg_masks=args.fg_masks, placements=args.placements,
                scale=tuple(args.scale), bgs_per_zip=args.bgs_per_zip, depth_model=args.depth_model,
                device=args.device, batch_size=args.batch_size, workers=args.workers, seed=args.seed)
    except ConvertError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
