"""The converter: a seed-layout dataset's zips into shuffled, reproducible WebDataset shards,
their byte indexes and manifest.json, in a local folder or at any writable fsspec URL (see
seedzips.storage for what a remote output and a remote dataset mean), in either shard set
format of pipeline/schema.py: compact (backgrounds.tar and sources files beside the shards,
seedzips.compact) or self-contained. convert_zips.py is its command line; seedzips.compose
--shards calls it too.
"""

import contextlib
import os
import random
import sys
import time

from tqdm import tqdm

from pipeline import schema
from pipeline.schema import TEMPORARY
from seedzips import compact, tarwriter
from seedzips.errors import ConvertError
from seedzips.index import index_dataset
from seedzips.storage import Source, Target

# 3: options.format; a compact set lists its backgrounds.tar and each shard's sources file
MANIFEST_VERSION = 3


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


def _entry_files(entry: dict, name: str, header: dict) -> list:
    """The {name, bytes, sha256} records of a shard entry's files that its format requires."""
    files = [{"name": name, "bytes": entry.get("bytes"), "sha256": entry.get("sha256")}, entry.get("index")]
    if header["options"]["format"] == schema.COMPACT:
        files.append(entry.get("sources"))
    return files


def _reusable(target: Target, header: dict) -> tuple[dict, dict | None]:
    """What an earlier run with the same options and inputs proved done: ({shard name: entry},
    the backgrounds record or None)."""
    old = target.read_record()
    try:
        names = [str(entry["name"]) for entry in old["shards"]]
    except (KeyError, TypeError):
        return {}, None  # no manifest, or not one of ours: everything is rewritten
    if any(old.get(field) != value for field, value in header.items()):
        print(f"{target.url}: the manifest there was made with other options or inputs; starting over",
              file=sys.stderr)
        target.withdraw_manifest()
        for name in map(os.path.basename, names):
            for path in (name, schema.index_name(name), schema.sources_name(name)):
                target.remove(path)
        for path in (schema.BACKGROUNDS, schema.index_name(schema.BACKGROUNDS)):
            target.remove(path)
        return {}, None
    done = {}
    for name, entry in zip(names, old["shards"]):
        if all(_intact(target, record) for record in _entry_files(entry, name, header)):
            done[name] = {field: entry[field] for field in ("bytes", "sha256", "index", "sources") if field in entry}
    backgrounds = old.get("backgrounds")
    if not (isinstance(backgrounds, dict) and _intact(target, backgrounds) and _intact(target, backgrounds.get("index"))):
        backgrounds = None
    return done, backgrounds


def _manifest(header: dict, plan: list, entries: dict, backgrounds: dict | None, skipped: list,
              complete: bool) -> dict:
    """The manifest: header, the backgrounds and the shards done so far (in plan order), totals,
    skipped samples."""
    listed = [{"name": name, "split": split, "samples": len(samples), **entries[name]}
              for name, split, samples in plan if name in entries]
    totals = {"shards": len(listed), "samples": sum(e["samples"] for e in listed),
              "bytes": sum(e["bytes"] for e in listed), "skipped": len(skipped),
              "backgrounds_bytes": backgrounds["bytes"] if backgrounds else 0}
    for split in (schema.TRAIN_SPLIT, schema.VAL_SPLIT):
        totals[f"{split}_samples"] = sum(e["samples"] for e in listed if e["split"] == split)
    extra = {"backgrounds": backgrounds} if backgrounds else {}
    return {**header, **extra, "complete": complete, "shards": listed, "totals": totals, "skipped": skipped}


def _write_backgrounds(target: Target, bg_ids: list, bg_dir: str, bg_sizes: dict) -> dict:
    """Write backgrounds.tar and its index (atomically, each whole or not at all); return its record."""
    data, bg_index = compact.backgrounds(bg_ids, bg_dir, bg_sizes)
    index_data = schema.encode_index(bg_index)
    target.write_file(schema.index_name(schema.BACKGROUNDS), index_data)
    target.write_file(schema.BACKGROUNDS, data)
    return {"name": schema.BACKGROUNDS, "samples": len(bg_ids), **schema.file_record(data),
            "index": {"name": schema.index_name(schema.BACKGROUNDS), **schema.file_record(index_data)}}


def convert(dataset, out, *, shards=None, val_fraction=0.05, val_shards=None, seed=0, self_contained=False,
            workers=None, strict=False, storage_options=None, progress=True) -> dict:
    """Convert DATASET's zips into shards at OUT and return the manifest (also OUT/manifest.json).

    The shard set is compact (backgrounds.tar and a sources file per shard beside the shards)
    unless `self_contained`. DATASET and OUT are local folders or fsspec URLs (storage_options
    go to fsspec for both). Raises ConvertError with a one-line message on bad input, options or output.
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
                          "val_fraction": val_fraction, "seed": seed, "strict": strict,
                          "format": schema.SELF_CONTAINED if self_contained else schema.COMPACT},
              "inputs": {"zips": [{"name": name, "bytes": size} for name, _, size in index.zips],
                         "backgrounds": len(index.bg_sizes)}}
    todo = [(name, samples) for name, _, samples in plan]
    try:
        target.prepare()
        entries, backgrounds = _reusable(target, header)
        todo = [(name, samples) for name, samples in todo if name not in entries]
        target.write_progress(_manifest(header, plan, entries, backgrounds, index.skipped, False))
        missing_backgrounds = not self_contained and backgrounds is None
        writing = bool(todo) or missing_backgrounds
        if writing:
            target.withdraw_manifest()
        zip_paths, bg_dir = source.local_copies(index.zips) if writing else ([], "")
        if missing_backgrounds:  # before any shard: a shard set never lacks its backgrounds
            used = {sample.bg_id for _, _, samples in plan for sample in samples}
            backgrounds = _write_backgrounds(target, sorted(used), bg_dir, index.bg_sizes)
            target.write_progress(_manifest(header, plan, entries, backgrounds, index.skipped, False))
        bar = tqdm(total=sum(len(samples) for _, samples in todo), unit="sample", desc="converting",
                   leave=False, disable=not progress)
        samples_of = dict(todo)

        def finish(path: str, sha256: str, shard_index) -> None:
            name = os.path.basename(path)[: -len(TEMPORARY)]
            data = schema.encode_index(shard_index)
            target.write_index(name, data)
            entry = {"bytes": shard_index.shard_bytes, "sha256": sha256,
                     "index": {"name": schema.index_name(name), **schema.file_record(data)}}
            if not self_contained:
                sources = compact.sources_file(samples_of[name], index)
                target.write_file(schema.sources_name(name), sources)
                entry["sources"] = {"name": schema.sources_name(name), **schema.file_record(sources)}
            target.publish(path, name, shard_index.shard_bytes)
            entries[name] = entry
            target.write_progress(_manifest(header, plan, entries, backgrounds, index.skipped, False))

        def record(sample) -> tuple:
            """What tarwriter writes of a sample: a self-contained one carries background and json."""
            if not self_contained:
                return sample, None, None
            return sample, index.bg_sizes[sample.bg_id], compact.encode(compact.provenance(sample, index))

        jobs = [(os.path.join(target.staging, name + TEMPORARY), [record(sample) for sample in samples])
                for name, samples in todo]
        with bar:
            tarwriter.write_shards(jobs, zip_paths, bg_dir, workers=workers, on_part=bar.update, on_shard=finish)
        final = _manifest(header, plan, entries, backgrounds, index.skipped, True)
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
