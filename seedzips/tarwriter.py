"""Deterministic POSIX (ustar) tar shards, written by several processes at once.

Every header is tarfile's own ustar header for a regular file with mtime 0, uid/gid 0, empty
owner names and mode 0o644; only name, size and checksum differ, so the same members give the
same bytes on every run and machine, and GNU tar and webdataset read the result.

Member sizes are known before anything is read (zip central directory, bg file sizes), so the
whole layout of a shard is computed up front and its parts are written at their offsets by
whichever worker is free: the work spreads over all cores even when there are fewer shards
than cores, and the bytes do not depend on the number of workers.
"""

import hashlib
import multiprocessing
import os
import signal
import tarfile

from pipeline import schema
from seedzips.errors import ConvertError
from seedzips.index import MEMBER_OF_FOLDER, read_member

BLOCK = 512
RECORD = tarfile.RECORDSIZE  # archives end padded to a whole record, as tar and tarfile do
_SIZE, _CHKSUM = slice(124, 136), slice(148, 156)  # ustar header fields
# Member suffixes of one sample in write order: the background (self-contained only), then
# SeedSample.members' folders, then the json (self-contained only).
ZIP_SUFFIXES = tuple(MEMBER_OF_FOLDER[folder] for folder in schema.SEED_FOLDERS.values())
assert (schema.BG,) + ZIP_SUFFIXES + (schema.META,) == schema.MEMBERS and ZIP_SUFFIXES == schema.SAMPLE_MEMBERS
_PART_SAMPLES = (64, 1000)  # bounds of one worker task: small enough to balance, large to amortise


def _template() -> bytes:
    info = tarfile.TarInfo("")
    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
    block[_SIZE] = bytes(12)
    block[_CHKSUM] = b" " * 8  # the checksum is computed with its own field as spaces
    return bytes(block)


_TEMPLATE = _template()
_TEMPLATE_SUM = sum(_TEMPLATE)
_ZEROS = bytes(RECORD)


def header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file `name` holding `size` bytes."""
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    size_field = b"%011o\0" % size
    block = bytearray(_TEMPLATE)
    block[: len(encoded)] = encoded
    block[_SIZE] = size_field
    block[_CHKSUM] = b"%06o\0 " % (_TEMPLATE_SUM + sum(encoded) + sum(size_field))
    return bytes(block)


def _span(size: int) -> int:
    return BLOCK + -(-size // BLOCK) * BLOCK


def _append(parts: list, name: str, data: bytes) -> None:
    parts += (header(name, len(data)), data, _ZEROS[: -len(data) % BLOCK])


def _end(size: int) -> int:
    """An archive's size once two zero blocks end it and it is padded to a whole record."""
    return -(-(size + 2 * BLOCK) // RECORD) * RECORD


def archive(members: list) -> tuple[bytes, schema.ShardIndex]:
    """(a whole tar of the (name, bytes) `members`, one per key, in order; its byte index), in memory."""
    parts, offsets, offset = [], [], 0
    for name, data in members:
        offsets.append(offset)
        _append(parts, name, data)
        offset += _span(len(data))
    offsets.append(offset)
    size = _end(offset)
    parts.append(bytes(size - offset))
    return b"".join(parts), schema.ShardIndex([schema.key_of(name) for name, _ in members], offsets, size)


# --- Worker side: each process opens each zip once and pwrites whole parts ----------------
_zip_paths, _bg_dir, _open_zips, _bg_bytes = [], "", {}, {}


def _init_worker(zip_paths: list, bg_dir: str, in_pool: bool) -> None:
    global _zip_paths, _bg_dir
    if in_pool:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to report
    _zip_paths, _bg_dir = zip_paths, bg_dir
    _open_zips.clear()
    _bg_bytes.clear()


def _background(bg_id: int, size: int) -> bytes:
    if bg_id not in _bg_bytes:
        path = os.path.join(_bg_dir, schema.bg_name(bg_id))
        try:
            with open(path, "rb") as f:
                _bg_bytes[bg_id] = f.read()
        except OSError as error:
            raise ConvertError(f"cannot read {path}: {error.strerror or error}") from None
        if len(_bg_bytes[bg_id]) != size:
            raise ConvertError(f"{path} changed size during the conversion")
    return _bg_bytes[bg_id]


def _write_part(numbered_task) -> tuple[int, int]:
    """Write one part's samples at its offset of the shard's file; return (task number, samples)."""
    number, (path, offset, records) = numbered_task
    parts = []
    for sample, bg_size, metadata in records:
        zip_path = _zip_paths[sample.zip_index]
        if zip_path not in _open_zips:
            try:
                _open_zips[zip_path] = os.open(zip_path, os.O_RDONLY)
            except OSError as error:
                raise ConvertError(f"cannot read {zip_path}: {error.strerror or error}") from None
        if bg_size is not None:
            _append(parts, f"{sample.key}.{schema.BG}", _background(sample.bg_id, bg_size))
        for suffix, member in zip(ZIP_SUFFIXES, sample.members):
            _append(parts, f"{sample.key}.{suffix}", read_member(_open_zips[zip_path], member, zip_path))
        if metadata is not None:
            _append(parts, f"{sample.key}.{schema.META}", metadata)
    view = memoryview(b"".join(parts))
    fd = os.open(path, os.O_WRONLY)
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    finally:
        os.close(fd)
    return number, len(records)


def _close_zips() -> None:
    for fd in _open_zips.values():
        os.close(fd)
    _open_zips.clear()


# --- Main side -------------------------------------------------------------------------
class _PrefixHash:
    """sha256 of a shard whose parts finish in any order, hashed as its finished prefix grows,
    so the digest is ready when the last part lands instead of costing a full read then."""

    def __init__(self, path: str, bounds: list):
        self.path, self.bounds, self.finished, self.hashed = path, bounds, set(), 0
        self.digest = hashlib.sha256()

    def part_done(self, part: int) -> bool:
        """Record a finished part; True once the whole file is hashed."""
        self.finished.add(part)
        with open(self.path, "rb") as f:
            while self.hashed in self.finished:
                start, end = self.bounds[self.hashed], self.bounds[self.hashed + 1]
                f.seek(start)
                while start < end:
                    chunk = f.read(min(end - start, 1 << 22))
                    self.digest.update(chunk)
                    start += len(chunk)
                self.hashed += 1
        return self.hashed == len(self.bounds) - 1


def _layout(path: str, records: list, part_samples: int) -> tuple[list, list, schema.ShardIndex]:
    """(part bounds, [(path, offset, records)], the shard's byte index) of one shard cut into
    parts; the last bound is the archive size, the last part's span including the
    end-of-archive blocks."""
    offset, bounds, tasks, offsets = 0, [], [], []
    for start in range(0, len(records), part_samples):
        bounds.append(offset)
        tasks.append((path, offset, records[start:start + part_samples]))
        for sample, bg_size, metadata in tasks[-1][2]:
            offsets.append(offset)
            offset += sum(_span(member.file_size) for member in sample.members)
            offset += (0 if bg_size is None else _span(bg_size)) + (0 if metadata is None else _span(len(metadata)))
    offsets.append(offset)
    bounds.append(_end(offset))
    index = schema.ShardIndex([sample.key for sample, _, _ in records], offsets, bounds[-1])
    return bounds, tasks, index


def write_shards(shards: list, zip_paths: list, bg_dir: str, *, workers: int, on_part, on_shard) -> None:
    """Write each (path, records) of `shards`, records being (SeedSample, bg size, json bytes):
    a sample gets its background member and its json member only where these are not None.

    Calls on_part(samples) as parts finish and on_shard(path, sha256 hex, schema.ShardIndex) once
    a shard's file is complete, in completion order; the index comes from the layout, computed
    before any byte is written, so it costs no re-read. Raises ConvertError (bad input) or OSError (output).
    """
    total = sum(len(records) for _, records in shards)
    part_samples = min(max(-(-total // (workers * 4)), _PART_SAMPLES[0]), _PART_SAMPLES[1])
    tasks, hashes, indexes = [], {}, {}
    for path, records in shards:
        bounds, parts, indexes[path] = _layout(path, records, part_samples)
        with open(path, "wb") as f:
            f.truncate(bounds[-1])
        hashes[path] = _PrefixHash(path, bounds)
        tasks += [(part, task) for part, task in enumerate(parts)]
    if workers == 1 or len(tasks) <= 1:
        _init_worker(zip_paths, bg_dir, False)
        results, pool = map(_write_part, enumerate(task for _, task in tasks)), None
    else:
        context = multiprocessing.get_context("fork")  # starts at once: no re-import in workers
        pool = context.Pool(min(workers, len(tasks)), _init_worker, (zip_paths, bg_dir, True))
        results = pool.imap_unordered(_write_part, enumerate(task for _, task in tasks))
    try:
        for number, samples in results:
            on_part(samples)
            part, (path, _, _) = tasks[number]
            if hashes[path].part_done(part):
                on_shard(path, hashes[path].digest.hexdigest(), indexes[path])
    finally:
        if pool is None:
            _close_zips()
        else:
            pool.terminate()
