"""The compact format's files beside its shards (see pipeline/schema.py): backgrounds.tar, each
background once, and each shard's sources file, the provenance a self-contained sample carries
as its KEY.json member."""

import json
import os

from pipeline import schema
from seedzips import tarwriter
from seedzips.errors import ConvertError

SOURCES_FORMAT = "bgfg-depth sources 1"


def provenance(sample, index) -> dict:
    """A sample's source zip, original member names and background id (the KEY.json record)."""
    sources = {schema.BG: f"{schema.BG_DIR}/{schema.bg_name(sample.bg_id)}"}
    sources.update((suffix, member.name) for suffix, member in zip(tarwriter.ZIP_SUFFIXES, sample.members))
    return {"bg_id": sample.bg_id, "zip": index.zips[sample.zip_index][0], "sources": sources}


def encode(record) -> bytes:
    """Compact JSON with sorted keys: the same record always gets the same bytes."""
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def sources_file(samples: list, index) -> bytes:
    """The sources file of a shard holding `samples`: {"format", "samples": {key: provenance}}."""
    return encode({"format": SOURCES_FORMAT, "samples": {s.key: provenance(s, index) for s in samples}})


def backgrounds(bg_ids: list, bg_dir: str, bg_sizes: dict) -> tuple[bytes, schema.ShardIndex]:
    """(backgrounds.tar, its byte index): the verbatim bg/{id}_bg.jpg of each of `bg_ids`, sorted by id."""
    members = []
    for bg_id in sorted(bg_ids):
        path = os.path.join(bg_dir, schema.bg_name(bg_id))
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as error:
            raise ConvertError(f"cannot read {path}: {error.strerror or error}") from None
        if len(data) != bg_sizes[bg_id]:
            raise ConvertError(f"{path} changed size during the conversion")
        members.append((f"{schema.background_key(bg_id)}.{schema.BG}", data))
    return tarwriter.archive(members)
