"""The converter: a seed-layout dataset's zips into shuffled, reproducible WebDataset shards,
their byte indexes and manifest.json, in a local folder or at any writable fsspec URL (see
seedzips.storage for what a remote output and a remote dataset mean). convert_zips.py is its
command line; seedzips.compose --shards calls it too.
"""

import contextlib
import json
import os
import random
import sys
import time

from tqdm import tqdm

from pipeline import schema
from pipeline.schema import TEMPORARY
from seedzips import tarwriter
from seedzips.errors import ConvertError
from seedzips.index import index_dataset
from seedzips.storage import Source, Target

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


def _intact(target: Target, record) -> bool:
    """Whether a manifest's {name, bytes, sha256} record is what the output holds."""
    return isinstance(record, dict) and target.intact(os.path.basename(str(record.get("name", ""))),
                                                      record.get("bytes"), record.get("sha256"))


def _reusable(target: Target, header: dict) -> dict:
    """Shards an earlier run with the same options and inputs proved done: {name: entry}."""
    old = target.read_record()
    try:
        old_entries = [(e["name"], e["bytes"], e["sha256"], e.get("index")) for e in old.get("shards", [])]
    except (AttributeError, KeyError, TypeError):
        return {}  # no manifest, or not one of ours: every shard is rewritten
    if any(old.get(field) != value for field, value in header.items()):
        print(f"{target.url}: the manifest there was made with other options or inputs; starting over",
              file=sys.stderr)
        target.withdraw_manifest()
        for name, _, _, _ in old_entries:
            target.remove(os.path.basename(name))
            target.remove(schema.index_name(os.path.basename(name)))
        return {}
    done = {}
    for name, size, sha256, index in old_entries:
        if _intact(target, {"name": name, "bytes": size, "sha256": sha256}) and _intact(target, index):
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
            workers=None, strict=False, storage_options=None, progress=True) -> dict:
    """Convert DATASET's zips into shards at OUT and return the manifest (also OUT/manifest.json).

    DATASET and OUT are local folders or fsspec URLs (storage_options go to fsspec for both).
    Raises ConvertError with a one-line message on bad input, options or output.
    """
    started = time.monotonic()
    dataset, out = os.fspath(dataset), os.fspath(out)
    if not 0 <= val_fraction < 1:
        raise ConvertError(f"--val-fraction {val_fraction}: must be at least 0 and below 1")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ConvertError(f"--workers {workers}: must be at least 1")
    try:
        source = Source(dataset, storage_options)
        target = Target(out, storage_options)
    except (ValueError, ImportError) as error:  # fsspec's unknown protocol, a missing client library
        raise ConvertError(f"cannot use {dataset} or {out}: {error}") from None
    try:
        index = index_dataset(source)
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
    todo = [(name, samples) for name, _, samples in plan]
    try:
        target.prepare()
        entries = _reusable(target, header)
        todo = [(name, samples) for name, samples in todo if name not in entries]
        target.write_progress(_manifest(header, plan, entries, index.skipped, False))
        if todo:
            target.withdraw_manifest()
        zip_paths, bg_dir = source.local_copies(index.zips) if todo else ([], "")
        bar = tqdm(total=sum(len(samples) for _, samples in todo), unit="sample", desc="converting",
                   leave=False, disable=not progress)

        def finish(path: str, sha256: str, shard_index) -> None:
            name = os.path.basename(path)[: -len(TEMPORARY)]
            data = schema.encode_index(shard_index)
            target.write_index(name, data)
            target.publish(path, name, shard_index.shard_bytes)
            entries[name] = {"bytes": shard_index.shard_bytes, "sha256": sha256,
                             "index": {"name": schema.index_name(name), **schema.file_record(data)}}
            target.write_progress(_manifest(header, plan, entries, index.skipped, False))

        jobs = [(os.path.join(target.staging, name + TEMPORARY),
                 [(sample, index.bg_sizes[sample.bg_id], _metadata(sample, index)) for sample in samples])
                for name, samples in todo]
        with bar:
            tarwriter.write_shards(jobs, zip_paths, bg_dir, workers=workers, on_part=bar.update, on_shard=finish)
        final = _manifest(header, plan, entries, index.skipped, True)
        target.write_manifest(final)
        source.done()
    except BaseException as error:
        # No temporary outlives a failed or interrupted run (a full disk must not stay full
        # until the next one); finished shards stay for a re-run to reuse. When `out` itself is
        # what failed there is nothing to remove.
        with contextlib.suppress(OSError):
            target.remove_temporaries()
        if isinstance(error, OSError):
            raise ConvertError(f"cannot write to output {out}: {error.strerror or error}") from None
        raise
    if progress:
        seconds = time.monotonic() - started
        written = sum(entries[name]["bytes"] for name, _ in todo)
        print(f"{final['totals']['samples']} samples in {len(plan)} shards ({len(plan) - len(todo)} "
              f"already done), {len(index.skipped)} skipped, {seconds:.1f} s, "
              f"{written / 1e6 / max(seconds, 1e-9):.0f} MB/s -> {out}")
    return final
