"""Index a seed-layout dataset without extracting it, and read zip members by their offsets.

Each zip's central directory is read once (by ranged reads where the dataset is remote);
composite, mask and depth are paired by key (never by position). The writers then read members
with two positioned reads on one descriptor per zip and process, which is cheaper than
zipfile's per-member file objects and safe to share between forked workers (no shared file
position).
"""

import os
import posixpath
import struct
import zipfile
import zlib
from typing import NamedTuple

from pipeline import schema
from seedzips.errors import ConvertError
from seedzips.storage import Source, join

# Shard member fed by each zip folder (bg_fg_1 -> bgfg.jpg), following schema.SEED_FOLDERS.
MEMBER_OF_FOLDER = {folder: next(m for m in schema.IMAGE_MEMBERS if m.split(".", 1)[0] == role)
                    for role, folder in schema.SEED_FOLDERS.items()}
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra field length
_READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


class ZipMember(NamedTuple):
    name: str
    header_offset: int
    compress_size: int
    file_size: int
    crc: int
    method: int


class SeedSample(NamedTuple):
    """One complete sample of the seed dataset: where its members are in its zip."""

    key: str
    zip_index: int
    bg_id: int
    members: tuple  # ZipMember per zip folder, in schema.SEED_FOLDERS order


class DatasetIndex(NamedTuple):
    zips: list  # [(name, path, bytes)] in numeric batch order
    bg_sizes: dict  # background id -> bytes of bg/{id}_bg.jpg
    samples: list  # complete SeedSamples, sorted by key
    skipped: list  # [{"key", "zip", "reason"}] sorted by key, zip


def list_zips(source: Source) -> list:
    """[(name, path, bytes)] of the dataset's zipFiles/batch_*.zip in numeric order."""
    if not source.exists():
        raise ConvertError(f"dataset folder not found: {source.url}")
    sizes = source.sizes(schema.ZIP_DIR) or {}
    matches = sorted((int(m.group(1)), n) for n in sizes if (m := schema.ZIP_PATTERN.match(n)))
    if not matches:
        raise ConvertError(f"no {schema.ZIP_DIR}/batch_*.zip files in {source.url}")
    return [(name, join(source.url, schema.ZIP_DIR, name), sizes[name]) for _, name in matches]


def _zip_entries(source: Source, name: str, path: str) -> dict:
    """{key: {folder: ZipMember}} of one zip's image members; a key twice in a folder is an error."""
    try:
        with source.open(path) as f, zipfile.ZipFile(f) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ConvertError(f"unreadable or corrupt zip {path}: {error}") from None
    entries = {}
    for info in infos:
        folder = posixpath.basename(posixpath.dirname(info.filename))
        # Hidden files (macOS '__MACOSX/bg_fg_1/._x.jpg' resource forks) are no images.
        if info.is_dir() or folder not in MEMBER_OF_FOLDER or posixpath.basename(info.filename).startswith("."):
            continue
        if info.compress_type not in _READABLE_METHODS or info.flag_bits & 0x1:
            raise ConvertError(f"{path}: {info.filename} is encrypted or uses an unsupported compression method")
        key = schema.key_of(info.filename)
        by_folder = entries.setdefault(key, {})
        if folder in by_folder:
            raise ConvertError(f"duplicate key {key} in {name}: {by_folder[folder].name} and {info.filename}")
        by_folder[folder] = ZipMember(info.filename, info.header_offset, info.compress_size,
                                      info.file_size, info.CRC, info.compress_type)
    return entries


def index_dataset(source: Source) -> DatasetIndex:
    """Pair every zip's composites, masks and depth maps by key; set incomplete samples aside.

    Reads only the zips' central directories (ranged reads of a remote dataset)."""
    zips = list_zips(source)
    bg_files = source.sizes(schema.BG_DIR)
    if bg_files is None:
        raise ConvertError(f"background folder not found: {join(source.url, schema.BG_DIR)}")
    paired, skipped, zip_of_key = [], [], {}
    for zip_index, (name, path, _) in enumerate(zips):
        for key, by_folder in _zip_entries(source, name, path).items():
            if key in zip_of_key:
                raise ConvertError(f"duplicate key {key} in {zip_of_key[key]} and {name}")
            zip_of_key[key] = name
            try:
                paired.append((key, zip_index, schema.background_id(key), by_folder))
            except ValueError:
                skipped.append({"key": key, "zip": name, "reason": "name not in the {bg}_bg_{k}_fg form"})
    bg_sizes = {bg_id: bg_files[schema.bg_name(bg_id)] for bg_id in {bg_id for _, _, bg_id, _ in paired}
                if schema.bg_name(bg_id) in bg_files}
    samples = []
    for key, zip_index, bg_id, by_folder in paired:
        missing = [folder for folder in schema.SEED_FOLDERS.values() if folder not in by_folder]
        if bg_id not in bg_sizes:
            missing.append(f"{schema.BG_DIR}/{schema.bg_name(bg_id)}")
        if missing:
            skipped.append({"key": key, "zip": zips[zip_index][0], "reason": "missing " + ", ".join(missing)})
        else:
            members = tuple(by_folder[folder] for folder in schema.SEED_FOLDERS.values())
            samples.append(SeedSample(key, zip_index, bg_id, members))
    samples.sort(key=lambda sample: sample.key)
    skipped.sort(key=lambda entry: (entry["key"], entry["zip"]))
    return DatasetIndex(zips, bg_sizes, samples, skipped)


def read_member(fd: int, member: ZipMember, zip_path: str) -> bytes:
    """The uncompressed bytes of one member, checked against its size and CRC."""
    try:
        head = os.pread(fd, _LOCAL_HEADER.size, member.header_offset)
        if len(head) < _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
            raise ConvertError(f"corrupt zip {zip_path}: no local header for {member.name}")
        _, name_length, extra_length = _LOCAL_HEADER.unpack(head)
        start = member.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        raw = os.pread(fd, member.compress_size, start)
    except OSError as error:
        raise ConvertError(f"cannot read {zip_path}: {error.strerror or error}") from None
    try:
        data = zlib.decompress(raw, -15) if member.method == zipfile.ZIP_DEFLATED else raw
    except zlib.error as error:
        raise ConvertError(f"corrupt zip {zip_path}: {member.name}: {error}") from None
    if len(data) != member.file_size or zlib.crc32(data) != member.crc:
        raise ConvertError(f"corrupt zip {zip_path}: {member.name} fails its size or CRC check")
    return data
