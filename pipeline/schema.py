"""The sample contract: seed-dataset names, shard member names, the key rule, the manifest.

Every part of the project (generator, converter, pipeline, training, tests) imports these
names instead of spelling them out, so the format is defined in exactly one place.
"""

import hashlib
import json
import os
import re
from typing import NamedTuple

# --- The seed dataset (what convert_zips.py reads and seedzips.synthetic writes) ---------
ZIP_DIR = "zipFiles"
ZIP_PATTERN = re.compile(r"^batch_(\d+)\.zip$")  # numeric order: batch_2 before batch_10
BG_DIR = "bg"
FG_DIR = "fg"
FG_MASK_DIR = "mask"
COMPOSITE_DIR = "bg_fg_1"
MASK_DIR = "bg_fg_mask_1"
DEPTH_DIR = "depthMap"
LABELS = "labels.txt"
# A mask pixel is the object where its value is above this (the JPEG masks are only roughly 0/255).
MASK_THRESHOLD = 127
# Which zip folder feeds which shard member.
SEED_FOLDERS = {"bgfg": COMPOSITE_DIR, "mask": MASK_DIR, "depth": DEPTH_DIR}

_SEED_KEY = re.compile(r"^(\d+)_bg_(\d+)_fg$")


def zip_name(batch: int) -> str:
    return f"batch_{batch}.zip"


def bg_name(bg_id: int) -> str:
    return f"{bg_id}_bg.jpg"


def fg_name(fg_id: int) -> str:
    return f"{fg_id}_fg.jpg"


def fg_mask_name(fg_id: int) -> str:
    return f"{fg_id}_fg_mask.jpg"


def seed_key(bg_id: int, placement: int) -> str:
    """Key of the k-th composite made on background bg_id (k counts fg x placements)."""
    return f"{bg_id}_bg_{placement}_fg"


def background_id(key: str) -> int:
    """The background a sample was composed on: '11_bg_5_fg' -> 11."""
    match = _SEED_KEY.match(key)
    if match is None:
        raise ValueError(f"sample key {key!r} does not look like '{{bg}}_bg_{{k}}_fg'")
    return int(match.group(1))


# --- The key rule (shared with webdataset) -----------------------------------------------
def key_of(name: str) -> str:
    """A file's sample key: its basename up to the first dot ('a/11_bg_5_fg.jpg.jpg' -> '11_bg_5_fg')."""
    return os.path.basename(name).split(".", 1)[0]


def split_member(name: str) -> tuple[str, str]:
    """A shard member's (key, suffix): '11_bg_5_fg.bgfg.jpg' -> ('11_bg_5_fg', 'bgfg.jpg')."""
    key, _, suffix = os.path.basename(name).partition(".")
    return key, suffix


# --- Shards ------------------------------------------------------------------------------
BG = "bg.jpg"
BGFG = "bgfg.jpg"
MASK = "mask.jpg"
DEPTH = "depth.jpg"
META = "json"
IMAGE_MEMBERS = (BG, BGFG, MASK, DEPTH)
MEMBERS = IMAGE_MEMBERS + (META,)  # the order members are written in

# Shard set formats (manifest "options.format"). compact, the default: a sample holds only its
# own members (SAMPLE_MEMBERS: no background, no json) and its background is stored once per
# shard set, in BACKGROUNDS beside the shards, as member background_key(bg_id) + "." + BG; the
# sample's key names it (background_key_of). Each sample's provenance (the KEY.json fields) is
# in the shard's sources file (sources_name), which the pipeline never reads. self-contained:
# every sample carries all of MEMBERS, background and json included, for stock readers alone.
COMPACT = "compact"
SELF_CONTAINED = "self-contained"
FORMATS = (COMPACT, SELF_CONTAINED)
SAMPLE_MEMBERS = (BGFG, MASK, DEPTH)  # a compact sample's members, in write order
BACKGROUNDS = "backgrounds.tar"
SOURCES_SUFFIX = ".sources.json"


def background_key(bg_id: int) -> str:
    """The key of a background in BACKGROUNDS: the key rule applied to its seed file name
    (bg/11_bg.jpg -> '11_bg', stored as '11_bg.bg.jpg')."""
    return key_of(bg_name(bg_id))


def background_key_of(key: str) -> str:
    """The background a compact sample takes from BACKGROUNDS: '11_bg_5_fg' -> '11_bg'."""
    return background_key(background_id(key))


def sources_name(shard) -> str:
    """The provenance file beside a compact shard: batch-1.tar -> batch-1.tar.sources.json."""
    return os.fspath(shard) + SOURCES_SUFFIX


MANIFEST = "manifest.json"
TEMPORARY = ".tmp"  # suffix of a file being written; renamed away when complete
TRAIN_PREFIX = "batch"
VAL_PREFIX = "val"


def shard_name(prefix: str, index: int) -> str:
    """Shard file names count from 1: batch-1.tar ... batch-N.tar, val-1.tar ..."""
    return f"{prefix}-{index}.tar"


# Manifest "split" of each shard (batch-*.tar -> train, val-*.tar -> val).
TRAIN_SPLIT = "train"
VAL_SPLIT = "val"


# --- The per-sample byte index beside each shard -------------------------------------------
# batch-1.tar.idx: one line of JSON, {"format", "shard_bytes", "keys", "offsets"}: sample i is
# keys[i] and spans bytes [offsets[i], offsets[i+1]) of the shard (from its first member's first
# header block); offsets has one entry more than keys, the end of the last sample (where the
# end-of-archive blocks begin); shard_bytes is the whole file's size. Written compactly with
# sorted fields, so the same shard always gets the same index bytes, whoever writes it.
INDEX_SUFFIX = ".idx"
INDEX_FORMAT = "bgfg-depth shard index 1"


def index_name(shard) -> str:
    """The index file beside a shard: batch-1.tar -> batch-1.tar.idx (a name or a path)."""
    return os.fspath(shard) + INDEX_SUFFIX


class ShardIndex(NamedTuple):
    keys: list[str]
    offsets: list[int]  # len(keys) + 1 entries, ascending
    shard_bytes: int


def encode_index(index: ShardIndex) -> bytes:
    record = {"format": INDEX_FORMAT, "keys": list(index.keys), "offsets": list(index.offsets),
              "shard_bytes": index.shard_bytes}
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def decode_index(data: bytes) -> ShardIndex:
    """The index in `data`; raises ValueError (saying what is wrong) unless it is a valid one."""
    try:
        record = json.loads(data)
        keys, offsets, size = record["keys"], record["offsets"], record["shard_bytes"]
        fmt = record["format"]
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"not a shard index ({type(error).__name__}: {error})") from None
    if fmt != INDEX_FORMAT:
        raise ValueError(f"index format {fmt!r}, expected {INDEX_FORMAT!r}")
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
            and isinstance(offsets, list) and all(type(o) is int for o in offsets) and type(size) is int):
        raise ValueError("index fields have the wrong types")
    if len(offsets) != len(keys) + 1:
        raise ValueError(f"index has {len(offsets)} offsets for {len(keys)} keys")
    if offsets[0] < 0 or offsets[-1] > size or any(a >= b for a, b in zip(offsets, offsets[1:])):
        raise ValueError("index offsets are not ascending within the shard")
    return ShardIndex(keys, offsets, size)


# --- How files of the contract appear (shards, indexes, manifests, checkpoints, cache) ----
def file_record(data: bytes) -> dict:
    """What a manifest says of a file: its size and sha256."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_durably(path: str, data: bytes) -> None:
    """Write `data` to `path` through `path` + TEMPORARY and replace_durably."""
    with open(path + TEMPORARY, "wb") as f:
        f.write(data)
    replace_durably(path + TEMPORARY, path)


def replace_durably(temporary: str, final: str) -> None:
    """Give a fully written temporary file its final name, so that a crash or power loss at
    any moment leaves either the old file or the whole new one, never a torn one: the data
    reaches the disk before the rename, and the folder entry after it."""
    fd = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, final)
    folder = os.open(os.path.dirname(os.path.abspath(final)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
