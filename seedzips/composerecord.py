"""compose.json, the composer's record: the options, the inputs' digests, the depth model and the
zips done (bytes, sha256), so that a re-run with the same header keeps the zips that are still
intact and starts over otherwise. Under torchrun, ranks other than 0 record their zips in
compose.rank-R.json, folded into compose.json by rank 0 (see seedzips.ranks).
"""

import glob
import json
import os
import sys

from pipeline import schema
from pipeline.schema import TEMPORARY
from seedzips.errors import ConvertError
from seedzips.storage import sha256_of

RECORD = "compose.json"
RECORD_VERSION = 1
FOLDERS = (schema.BG_DIR, schema.FG_DIR, schema.FG_MASK_DIR, schema.ZIP_DIR)


def file_record(option: str, path: str) -> dict:
    with open(path, "rb") as f:
        return {"option": option, "name": os.path.basename(path), **schema.file_record(f.read())}


def _record_name(rank: int) -> str:
    return RECORD if rank == 0 else f"compose.rank-{rank}.json"


def write_record(out: str, record: dict, rank: int = 0) -> None:
    path = os.path.join(out, _record_name(rank))
    schema.write_durably(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())


def read_record(out: str, rank: int = 0) -> dict | None:
    try:
        with open(os.path.join(out, _record_name(rank))) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("zips"), dict) else None


def _rank_records(out: str) -> list:
    return sorted(glob.glob(os.path.join(glob.escape(out), "compose.rank-*.json")))


def ranks_zips(out: str, header: dict) -> dict:
    """The zips the other ranks' records list, of runs with this header: {name: entry}."""
    zips = {}
    for path in _rank_records(out):
        record = read_record(out, int(path.rsplit("-", 1)[1].split(".")[0]))
        if record is not None and all(record.get(field) == value for field, value in header.items()):
            zips.update(record["zips"])
    return zips


def remove_rank_records(out: str) -> None:
    """Once rank 0's compose.json holds what they said."""
    for path in _rank_records(out):
        os.remove(path)


def remove_temporaries(out: str) -> None:
    """Delete the half-written files of an interrupted or failed run."""
    for folder in FOLDERS:
        for name in os.listdir(os.path.join(out, folder)):
            if name.endswith(TEMPORARY):
                os.remove(os.path.join(out, folder, name))


def prepare(out: str) -> dict | None:
    """Make the output folders, delete an interrupted run's temporaries; the record found, if any."""
    for folder in FOLDERS:
        os.makedirs(os.path.join(out, folder), exist_ok=True)
    remove_temporaries(out)
    record = read_record(out)
    if record is not None:
        return record
    zips = [n for n in os.listdir(os.path.join(out, schema.ZIP_DIR)) if schema.ZIP_PATTERN.match(n)]
    if zips:
        raise ConvertError(f"--out {out} already holds {schema.ZIP_DIR}/{zips[0]} and no {RECORD} of compose: "
                           "not a dataset compose made; give a new or empty folder")
    return None


def reusable(out: str, old: dict | None, header: dict) -> dict:
    """The zips an earlier run with this header finished and that are intact: {name: record}."""
    if old is None:
        return {}
    if any(old.get(field) != value for field, value in header.items()):
        print(f"{os.path.join(out, RECORD)} was made with other options or inputs; starting over", file=sys.stderr)
        for folder in FOLDERS:
            for name in os.listdir(os.path.join(out, folder)):
                os.remove(os.path.join(out, folder, name))
        return {}
    done = {}
    for name, entry in {**old["zips"], **ranks_zips(out, header)}.items():
        path = os.path.join(out, schema.ZIP_DIR, os.path.basename(name))
        if isinstance(entry, dict) and os.path.isfile(path) and os.path.getsize(path) == entry.get("bytes") \
                and sha256_of(path) == entry.get("sha256"):
            done[name] = {"bytes": entry["bytes"], "sha256": entry["sha256"]}
    return done
