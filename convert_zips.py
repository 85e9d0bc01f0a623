"""Convert the seed dataset's zips into shuffled, reproducible WebDataset tar shards.

    python convert_zips.py --dataset data/seed --out shards/

Writes batch-{1..N}.tar (training), val-{1..M}.tar (every sample of the held-out backgrounds),
a byte index beside each shard (batch-1.tar.idx: where each sample starts, for ranged reads)
and manifest.json. Samples are spread over the shards by a seeded permutation, so each shard
mixes all zips. Shards appear only when complete, and a re-run resumes an interrupted job.
"""

import argparse
import contextlib
import hashlib
import json
import os
import random
import sys
import time

from tqdm import tqdm

from pipeline import schema
from pipeline.schema import TEMPORARY, replace_durably
from seedzips import tarwriter
from seedzips.errors import ConvertError
from seedzips.index import index_dataset

MANIFEST_VERSION = 2  # 2: every shard has an index beside it, listed in its entry


def _metadata(sample, index) -> bytes:
    """The KEY.json provenance: source zip, original member names, background id."""
    sources = {schema.BG: f"{schema.BG_DIR}/{schema.bg_name(sample.bg_id)}"}
    sources.update((suffix, member.name) for suffix, member in zip(tarwriter.ZIP_SUFFIXES, sample.members))
    record = {"bg_id": sample.bg_id, "zip": index.zips[sample.zip_index][0], "sources": sources}
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def _plan(index, shards, val_fraction, val_shards, seed) -> tuple[list, list]:
    """(held-out background ids, [(shard name, split, samples)]) for the given options."""
    bg_ids = sorted({sample.bg_id for sample in index.samples})
    held_out = round(val_fraction * len(bg_ids))
    if val_fraction > 0 and len(bg_ids) >= 2:
        held_out = max(held_out, 1)
    held_out = min(held_out, len(bg_ids) - 1)  # keep at least one training background
    rng = random.Random(seed)
    val_bgs = sorted(rng.sample(bg_ids, held_out)) if held_out else []
    train = [s for s in index.samples if s.bg_id not in val_bgs]
    val = [s for s in index.samples if s.bg_id in val_bgs]
    rng.shuffle(train)
    rng.shuffle(val)
    shards = len(index.zips) if shards is None else shards
    if not 1 <= shards <= len(train):
        raise ConvertError(f"--shards {shards}: must be between 1 and the {len(train)} training samples")
    if val_shards is None:
        val_shards = min(max(round(len(val) * shards / len(train)), 1), len(val))
    elif val and not 1 <= val_shards <= len(val):
        raise ConvertError(f"--val-shards {val_shards}: must be between 1 and the {len(val)} validation samples")
    plan = []
    for prefix, split, samples, count in ((schema.TRAIN_PREFIX, schema.TRAIN_SPLIT, train, shards),
                                          (schema.VAL_PREFIX, schema.VAL_SPLIT, val, val_shards)):
        for i in range(count if samples else 0):
            chunk = samples[i * len(samples) // count:(i + 1) * len(samples) // count]
            plan.append((schema.shard_name(prefix, i + 1), split, chunk))
    return val_bgs, plan


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_json(path: str, record: dict) -> None:
    schema.write_durably(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def _write_index(out: str, name: str, index) -> dict:
    """Write shard `name`'s byte index beside it; return its manifest record."""
    data = schema.encode_index(index)
    schema.write_durably(os.path.join(out, schema.index_name(name)), data)
    return {"name": schema.index_name(name), **schema.file_record(data)}


def _index_intact(out: str, record) -> bool:
    if not isinstance(record, dict):
        return False
    path = os.path.join(out, os.path.basename(str(record.get("name", ""))))
    return (os.path.isfile(path) and os.path.getsize(path) == record.get("bytes")
            and _sha256(path) == record.get("sha256"))


def _remove_temporaries(out: str) -> None:
    """Delete the half-written shards and manifest of an interrupted or failed run (the shards
    are rewritten if still wanted)."""
    prefixes = tuple(f"{prefix}-" for prefix in (schema.TRAIN_PREFIX, schema.VAL_PREFIX)) + (schema.MANIFEST,)
    for name in os.listdir(out):
        if name.startswith(prefixes) and name.endswith(TEMPORARY):
            os.remove(os.path.join(out, name))


def _reusable(out: str, header: dict) -> dict:
    """Shards an earlier run with the same options and inputs proved done: {name: entry}."""
    _remove_temporaries(out)
    path = os.path.join(out, schema.MANIFEST)
    try:
        with open(path) as f:
            old = json.load(f)
        old_entries = [(e["name"], e["bytes"], e["sha256"], e.get("index")) for e in old.get("shards", [])]
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}  # no manifest, or not one of ours: every shard is rewritten
    if any(old.get(field) != value for field, value in header.items()):
        print(f"{path} was made with other options or inputs; starting over", file=sys.stderr)
        for name, _, _, _ in old_entries:
            for path in (os.path.basename(name), schema.index_name(os.path.basename(name))):
                if os.path.isfile(os.path.join(out, path)):
                    os.remove(os.path.join(out, path))
        return {}
    done = {}
    for name, size, sha256, index in old_entries:
        shard = os.path.join(out, os.path.basename(name))
        if os.path.isfile(shard) and os.path.getsize(shard) == size and _sha256(shard) == sha256 \
                and _index_intact(out, index):
            done[name] = {"bytes": size, "sha256": sha256, "index": index}
    return done


def _manifest(header: dict, plan: list, entries: dict, skipped: list, complete: bool) -> dict:
    """The manifest: header, the shards done so far (in plan order), totals, skipped samples."""
    listed = [{"name": name, "split": split, "samples": len(samples), **entries[name]}
              for name, split, samples in plan if name in entries]
    totals = {"shards": len(listed), "samples": sum(e["samples"] for e in listed),
              "bytes": sum(e["bytes"] for e in listed), "skipped": len(skipped)}
    for split in (schema.TRAIN_SPLIT, schema.VAL_SPLIT):
        totals[f"{split}_samples"] = sum(e["samples"] for e in listed if e["split"] == split)
    return {**header, "complete": complete, "shards": listed, "totals": totals, "skipped": skipped}


def convert(dataset, out, *, shards=None, val_fraction=0.05, val_shards=None, seed=0,
            workers=None, strict=False, progress=True) -> dict:
    """Convert DATASET's zips into shards in OUT and return the manifest (also OUT/manifest.json).

    Raises ConvertError with a one-line message on bad input, options or output folder.
    """
    started = time.monotonic()
    dataset, out = os.fspath(dataset), os.fspath(out)
    if not 0 <= val_fraction < 1:
        raise ConvertError(f"--val-fraction {val_fraction}: must be at least 0 and below 1")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConvertError(f"--workers {workers}: must be at least 1")
    try:
        index = index_dataset(dataset)
    except OSError as error:
        raise ConvertError(f"cannot read {error.filename or dataset}: {error.strerror or error}") from None
    if not index.samples:
        raise ConvertError(f"no complete samples in {dataset} ({len(index.skipped)} incomplete)")
    if strict and index.skipped:
        first = index.skipped[0]
        raise ConvertError(f"{len(index.skipped)} incomplete samples (--strict), e.g. {first['key']} "
                           f"in {first['zip']}: {first['reason']}")
    val_bgs, plan = _plan(index, shards, val_fraction, val_shards, seed)
    # What makes the output what it is: a re-run resumes only when all of this is unchanged.
    header = {"version": MANIFEST_VERSION, "val_backgrounds": val_bgs,
              "options": {"shards": sum(split == schema.TRAIN_SPLIT for _, split, _ in plan),
                          "val_shards": sum(split == schema.VAL_SPLIT for _, split, _ in plan),
                          "val_fraction": val_fraction, "seed": seed, "strict": strict},
              "inputs": {"zips": [{"name": name, "bytes": size} for name, _, size in index.zips],
                         "backgrounds": len(index.bg_sizes)}}
    manifest_path = os.path.join(out, schema.MANIFEST)
    todo = [(name, samples) for name, _, samples in plan]
    try:
        os.makedirs(out, exist_ok=True)
        entries = _reusable(out, header)
        todo = [(name, samples) for name, samples in todo if name not in entries]
        _write_json(manifest_path, _manifest(header, plan, entries, index.skipped, False))
        bar = tqdm(total=sum(len(samples) for _, samples in todo), unit="sample", desc="converting",
                   leave=False, disable=not progress)

        def finish(path: str, sha256: str, shard_index) -> None:
            name = os.path.basename(path)[: -len(TEMPORARY)]
            entries[name] = {"bytes": shard_index.shard_bytes, "sha256": sha256,
                             "index": _write_index(out, name, shard_index)}
            replace_durably(path, os.path.join(out, name))
            _write_json(manifest_path, _manifest(header, plan, entries, index.skipped, False))

        jobs = [(os.path.join(out, name + TEMPORARY),
                 [(sample, index.bg_sizes[sample.bg_id], _metadata(sample, index)) for sample in samples])
                for name, samples in todo]
        with bar:
            tarwriter.write_shards(jobs, [path for _, path, _ in index.zips],
                                   os.path.join(dataset, schema.BG_DIR),
                                   workers=workers, on_part=bar.update, on_shard=finish)
        final = _manifest(header, plan, entries, index.skipped, True)
        _write_json(manifest_path, final)
    except BaseException as error:
        # No temporary outlives a failed or interrupted run (a full disk must not stay full
        # until the next one); finished shards stay for a re-run to reuse. When `out` itself is
        # what failed there is nothing to remove.
        with contextlib.suppress(OSError):
            _remove_temporaries(out)
        if isinstance(error, OSError):
            raise ConvertError(f"cannot write to output folder {out}: {error.strerror or error}") from None
        raise
    if progress:
        seconds = time.monotonic() - started
        written = sum(entries[name]["bytes"] for name, _ in todo)
        print(f"{final['totals']['samples']} samples in {len(plan)} shards ({len(plan) - len(todo)} "
              f"already done), {len(index.skipped)} skipped, {seconds:.1f} s, "
              f"{written / 1e6 / max(seconds, 1e-9):.0f} MB/s -> {out}")
    return final


def main(argv=None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="seed-layout folder holding bg/ and zipFiles/")
    parser.add_argument("--out", default="shards",
                        help="output folder for shards and manifest.json (default shards/)")
    parser.add_argument("--shards", type=int, help="training shards (default: one per input zip)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="fraction of backgrounds held out for validation (default 0.05; 0 disables)")
    parser.add_argument("--val-shards", type=int,
                        help="validation shards (default: about as full as training shards)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the held-out choice and the shuffle (default 0)")
    parser.add_argument("--workers", type=int, help="processes writing shards (default: all cores)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on an incomplete sample instead of skipping it")
    args = parser.parse_args(argv)
    try:
        convert(args.dataset, args.out, shards=args.shards, val_fraction=args.val_fraction,
                val_shards=args.val_shards, seed=args.seed, workers=args.workers, strict=args.strict)
    except ConvertError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
