"""Convert the seed dataset's zips into shuffled, reproducible WebDataset tar shards.

    python convert_zips.py --dataset data/seed --out shards/

Writes batch-{1..N}.tar (training), val-{1..M}.tar (every sample of the held-out backgrounds)
and manifest.json. Samples are spread over the shards by a seeded permutation, so each shard
mixes all zips. Shards appear only when complete, and a re-run resumes an interrupted job.
"""

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import random
import sys
import time

from tqdm import tqdm

from pipeline import schema, tarwriter
from pipeline.seedzips import ConvertError, MEMBER_OF_FOLDER, index_dataset, read_member

MANIFEST_VERSION = 1
_MEMBER_SUFFIXES = (schema.BG,) + tuple(MEMBER_OF_FOLDER.values())  # order of Sample.members
assert sorted(_MEMBER_SUFFIXES + (schema.META,)) == sorted(schema.MEMBERS)
_PART_SAMPLES = (64, 1000)  # bounds of one worker task: small enough to balance, large to amortise


def _metadata(sample, index) -> bytes:
    """The KEY.json provenance: source zip, original member names, background id."""
    sources = {schema.BG: f"{schema.BG_DIR}/{schema.bg_name(sample.bg_id)}"}
    sources.update((suffix, member.name) for suffix, member in zip(_MEMBER_SUFFIXES[1:], sample.members))
    record = {"bg_id": sample.bg_id, "zip": index.zips[sample.zip_index][0], "sources": sources}
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def _plan(index, shards, val_fraction, val_shards, seed) -> tuple[list, list]:
    """(held-out background ids, [(shard name, split, samples)]) for the given options."""
    bg_ids = sorted({sample.bg_id for sample in index.samples})
    held_out = round(val_fraction * len(bg_ids))
    if val_fraction > 0 and len(bg_ids) >= 2:
        held_out = min(max(held_out, 1), len(bg_ids) - 1)  # keep at least one training background
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


# --- Worker side: each process opens each zip once and writes its parts with pwrite ---------
_zip_paths, _bg_dir, _open_zips, _bg_bytes = [], "", {}, {}


def _init_worker(zip_paths: list, bg_dir: str) -> None:
    global _zip_paths, _bg_dir
    _zip_paths, _bg_dir = zip_paths, bg_dir
    _open_zips.clear()
    _bg_bytes.clear()


def _background(bg_id: int, size: int) -> bytes:
    if bg_id not in _bg_bytes:
        path = os.path.join(_bg_dir, schema.bg_name(bg_id))
        with open(path, "rb") as f:
            _bg_bytes[bg_id] = f.read()
        if len(_bg_bytes[bg_id]) != size:
            raise ConvertError(f"{path} changed size during the conversion")
    return _bg_bytes[bg_id]


def _write_part(task) -> int:
    """Write samples at their precomputed offset of a shard's temporary file; return the count."""
    path, offset, samples = task
    parts = []
    for sample, bg_size, metadata in samples:
        zip_path = _zip_paths[sample.zip_index]
        if zip_path not in _open_zips:
            _open_zips[zip_path] = os.open(zip_path, os.O_RDONLY)
        tarwriter.append_member(parts, f"{sample.key}.{schema.BG}", _background(sample.bg_id, bg_size))
        for suffix, member in zip(_MEMBER_SUFFIXES[1:], sample.members):
            data = read_member(_open_zips[zip_path], member, zip_path)
            tarwriter.append_member(parts, f"{sample.key}.{suffix}", data)
        tarwriter.append_member(parts, f"{sample.key}.{schema.META}", metadata)
    blob = b"".join(parts)
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(blob)
        while view:
            view = view[os.pwrite(fd, view, offset + len(blob) - len(view)):]
    finally:
        os.close(fd)
    return len(samples)


def _close_zips() -> None:
    for fd in _open_zips.values():
        os.close(fd)
    _open_zips.clear()


# --- Main side: layout, manifest, resume ------------------------------------------------
def _layout(index, samples, part_samples) -> tuple[int, list]:
    """(archive size, [(offset, [(sample, bg size, json bytes)])]) of one shard, split in parts."""
    offset, parts = 0, []
    for start in range(0, len(samples), part_samples):
        part_offset, part = offset, []
        for sample in samples[start:start + part_samples]:
            metadata, bg_size = _metadata(sample, index), index.bg_sizes[sample.bg_id]
            sizes = [bg_size, len(metadata)] + [member.file_size for member in sample.members]
            offset += sum(tarwriter.member_span(size) for size in sizes)
            part.append((sample, bg_size, metadata))
        parts.append((part_offset, part))
    return tarwriter.archive_size(offset), parts


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: str, record: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _reusable(out: str, header: dict) -> dict:
    """Shards an earlier run with the same options and inputs proved done: {name: entry}."""
    path = os.path.join(out, schema.MANIFEST)
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return {}
    old_entries = old.get("shards", []) if isinstance(old, dict) else []
    if any(old.get(field) != value for field, value in header.items()):
        print(f"{path} was made with other options or inputs; starting over", file=sys.stderr)
        for entry in old_entries:
            if os.path.isfile(os.path.join(out, entry["name"])):
                os.remove(os.path.join(out, entry["name"]))
        return {}
    done = {}
    for entry in old_entries:
        shard = os.path.join(out, entry["name"])
        if os.path.isfile(shard) and os.path.getsize(shard) == entry["bytes"] and _sha256(shard) == entry["sha256"]:
            done[entry["name"]] = {"bytes": entry["bytes"], "sha256": entry["sha256"]}
    return done


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
    index = index_dataset(dataset)
    if not index.samples:
        raise ConvertError(f"no complete samples in {dataset} ({len(index.skipped)} incomplete)")
    if strict and index.skipped:
        first = index.skipped[0]
        raise ConvertError(f"{len(index.skipped)} incomplete samples (--strict), e.g. {first['key']} "
                           f"in {first['zip']}: {first['reason']}")
    val_bgs, plan = _plan(index, shards, val_fraction, val_shards, seed)
    header = {"version": MANIFEST_VERSION, "val_backgrounds": val_bgs,
              "options": {"shards": sum(split == schema.TRAIN_SPLIT for _, split, _ in plan),
                          "val_shards": sum(split == schema.VAL_SPLIT for _, split, _ in plan),
                          "val_fraction": val_fraction, "seed": seed, "strict": strict},
              "inputs": {"zips": [{"name": name, "bytes": size} for name, _, size in index.zips],
                         "backgrounds": len(index.bg_sizes)}}
    try:
        os.makedirs(out, exist_ok=True)
        done = _reusable(out, header)
    except OSError as error:
        raise ConvertError(f"cannot write to output folder {out}: {error.strerror or error}") from None
    entries = dict(done)

    def manifest(complete: bool) -> dict:
        listed = [{"name": name, "split": split, "samples": len(samples), **entries[name]}
                  for name, split, samples in plan if name in entries]
        totals = {"shards": len(listed), "samples": sum(e["samples"] for e in listed),
                  "bytes": sum(e["bytes"] for e in listed), "skipped": len(index.skipped)}
        for split in (schema.TRAIN_SPLIT, schema.VAL_SPLIT):
            totals[f"{split}_samples"] = sum(e["samples"] for e in listed if e["split"] == split)
        return {**header, "complete": complete, "shards": listed, "totals": totals, "skipped": index.skipped}

    todo = [(name, samples) for name, _, samples in plan if name not in done]
    total = sum(len(samples) for _, samples in todo)
    part_samples = min(max(math.ceil(total / (workers * 4)), _PART_SAMPLES[0]), _PART_SAMPLES[1])
    tasks, parts_left, temporary = [], {}, {}
    try:
        for name, samples in todo:
            size, parts = _layout(index, samples, part_samples)
            temporary[name] = os.path.join(out, name + ".tmp")
            with open(temporary[name], "wb") as f:
                f.truncate(size)
            parts_left[name] = len(parts)
            tasks += [(name, (temporary[name], offset, part)) for offset, part in parts]
        _write_json(os.path.join(out, schema.MANIFEST), manifest(False))
        bar = tqdm(total=total, unit="sample", disable=not progress, desc="converting")
        zip_paths = [path for _, path, _ in index.zips]
        bg_dir = os.path.join(dataset, schema.BG_DIR)
        names = [name for name, _ in tasks]
        if workers == 1 or len(tasks) <= 1:
            _init_worker(zip_paths, bg_dir)
            results, pool = ((i, _write_part(task)) for i, (_, task) in enumerate(tasks)), None
        else:
            pool = multiprocessing.get_context("fork").Pool(min(workers, len(tasks)), _init_worker, (zip_paths, bg_dir))
            results = pool.imap_unordered(_indexed_part, enumerate(task for _, task in tasks))
        try:
            for task_index, count in results:
                bar.update(count)
                name = names[task_index]
                parts_left[name] -= 1
                if parts_left[name] == 0:
                    path = temporary[name]
                    entries[name] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
                    os.replace(path, os.path.join(out, name))
                    _write_json(os.path.join(out, schema.MANIFEST), manifest(False))
        finally:
            bar.close()
            if pool is None:
                _close_zips()
            else:
                pool.terminate()
    except OSError as error:
        raise ConvertError(f"cannot write to output folder {out}: {error.strerror or error}") from None
    final = manifest(True)
    _write_json(os.path.join(out, schema.MANIFEST), final)
    if progress:
        seconds = time.monotonic() - started
        written = sum(entries[name]["bytes"] for name, _ in todo)
        print(f"{final['totals']['samples']} samples in {len(plan)} shards "
              f"({len(done)} already done), {len(index.skipped)} skipped, {seconds:.1f} s, "
              f"{written / 1e6 / max(seconds, 1e-9):.0f} MB/s -> {out}")
    return final


def _indexed_part(numbered_task) -> tuple[int, int]:
    task_index, task = numbered_task
    return task_index, _write_part(task)


def main(argv=None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="seed-layout folder holding bg/ and zipFiles/")
    parser.add_argument("--out", default="shards", help="output folder for shards and manifest.json (default shards/)")
    parser.add_argument("--shards", type=int, help="training shards (default: one per input zip)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="fraction of backgrounds held out for validation (default 0.05; 0 disables)")
    parser.add_argument("--val-shards", type=int, help="validation shards (default: about as full as training shards)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out choice and the shuffle (default 0)")
    parser.add_argument("--workers", type=int, help="processes writing shards (default: all cores)")
    parser.add_argument("--strict", action="store_true", help="fail on an incomplete sample instead of skipping it")
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
