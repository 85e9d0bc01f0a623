"""The bound on a cache folder's bytes (LoaderOptions.cache_limit): sizes read and written, the
folder's bytes counted, room made for a download, and the limit checked before the first batch.

Every file under the folder counts, the user's own too, and a download counts at its full size
from its first byte: room for it is made and its `.part` file allocated at that size in one
step, under an exclusive `flock` on the folder's `.pipeline-cache.lock`, so the processes and
ranks sharing the folder never overshoot together. Room comes from evicting the cache's own
files, least recently used first (pipeline.cache touches a copy's mtime each time it is
used): first `.part` files that no download holds any more (left by a killed process), then
copies that no process holds. A file is evicted only under a non-blocking exclusive `flock` on
its entry's `.lock`, which readers hold shared for as long as they read and a download holds
exclusive: so nothing is removed while open or being written, and one unlink removes it whole. The cache's own files are `{sha256}-{name}` (64 hex digits) with a `.lock`
beside them; nothing else is ever deleted. When no room can be made, nothing waits: the file
is read remotely.
"""

import errno
import fcntl
import logging
import os
import re

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

LOCK = ".pipeline-cache.lock"
PART, ENTRY_LOCK = ".part", ".lock"
_OWN = re.compile(r"[0-9a-f]{64}-.+")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
evictions = 0  # files this process evicted (pipeline.cache.counters reads it)
_warned: set[str] = set()  # folders whose limit this process said was too small


def parse_size(text: str) -> int:
    """Bytes in `text`: 50GB, 1.5TB, 500MB, 10KB (decimal), 512MiB, 2GiB (binary), or a plain
    number of bytes; ValueError saying what is accepted otherwise."""
    match = _SIZE.fullmatch(text)
    unit = _UNITS.get(match.group(2).upper()) if match else None
    if unit is None:
        raise ValueError(f"expected a size such as 50GB, 1.5TB, 500MB or 512MiB, got {text!r}")
    return int(float(match.group(1)) * unit)


def format_size(size: int) -> str:
    """`size` bytes in decimal units, four significant digits: 1.536 MB."""
    for name in ("TB", "GB", "MB", "KB"):
        if size >= _UNITS[name]:
            return f"{size / _UNITS[name]:.4g} {name}"
    return f"{size} bytes"


def _files(folder: str):
    """(path, lstat) of every file under `folder`."""
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            try:
                yield path, os.lstat(path)
            except FileNotFoundError:  # evicted or published meanwhile
                continue


def bytes_under(folder: str) -> int:
    """What the files under `folder` hold, in bytes (their sizes)."""
    return sum(stat.st_size for _, stat in _files(folder))


def is_own(folder: str, path: str) -> bool:
    """Whether `path` is a copy or a `.part` the cache made (a name of its own, its `.lock` beside it)."""
    name = os.path.basename(path)
    copy = name.removesuffix(PART)
    return (os.path.dirname(path) == folder and _OWN.fullmatch(copy) is not None and not copy.endswith(ENTRY_LOCK)
            and os.path.exists(os.path.join(folder, copy + ENTRY_LOCK)))


def _evict(path: str) -> bool:
    """Remove the cache's file `path` (a copy or a `.part`) unless a process holds its entry
    lock: shared by readers, exclusive by a download."""
    try:
        entry = os.open(path.removesuffix(PART) + ENTRY_LOCK, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(entry, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
        return True
    except BlockingIOError:
        return False  # being read, downloaded or published
    finally:
        os.close(entry)


def remove_stale_parts(folder: str) -> None:
    """Remove the `.part` files no download holds (a killed process's): never read, never kept."""
    for path, _ in list(_files(folder)):
        if path.endswith(PART) and is_own(folder, path):
            _evict(path)


def _allocate(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise  # a full disk: the caller reads remotely
        os.ftruncate(fd, size)  # a filesystem that cannot allocate: the size still counts in full


def open_part(folder: str, part: str, size: int, limit: int | None) -> tuple[int | None, int]:
    """(a descriptor of `part`, truncated and allocated at `size` bytes, or None when the folder
    cannot make that room under `limit`; the bytes the folder needs for it). The caller holds
    the entry's lock, so a `part` already there is a killed download's, and replaced."""
    if limit is None:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _allocate(fd, size)
        return fd, size
    global evictions
    lock = os.open(os.path.join(folder, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        files = [(path, stat) for path, stat in _files(folder) if path != part]
        used = sum(stat.st_size for _, stat in files)
        # Killed downloads' leftovers first, then copies from the least recently used on.
        candidates = sorted((not path.endswith(PART), stat.st_mtime_ns, path, stat.st_size)
                            for path, stat in files if is_own(folder, path))
        for _, _, path, bytes_held in candidates:
            if used + size <= limit:
                break
            if _evict(path):
                used -= bytes_held
                evictions += not path.endswith(PART)
        if used + size > limit:
            return None, used + size
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _allocate(fd, size)
        except OSError:
            os.close(fd)
            os.unlink(part)
            raise
        return fd, used + size
    finally:
        os.close(lock)  # closing the descriptor releases the lock


def local_ranks(world_size: int) -> tuple[int, int]:
    """(this process's rank on its machine, the ranks there): torchrun's LOCAL_RANK and
    LOCAL_WORLD_SIZE, else (ranks started by hand) every rank counts as one of this machine."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def _backgrounds(shard) -> tuple[str | None, dict | None]:
    """(URL, manifest record) of a shard's backgrounds file, (None, None) when it has none."""
    found = shard.backgrounds
    return (None, None) if found is None else (found.url, found.record)


def check_limit(folder: str, limit: int, shards, *, readers: int, warn: bool) -> None:
    """Before the first batch: PipelineError (one line) when `limit` is below the largest file to
    cache, which could then never be cached; else, when `warn`, one warning if it cannot hold a
    file for each of the `readers` processes of this machine reading at once (each holds one),
    beside the files under the folder that are not the cache's: what does not fit is read
    remotely. Said once per process and folder (train.py's training and validation loaders share one)."""
    sizes = [(record["bytes"], url, kind) for shard in shards
             for kind, url, record in (("shard", shard.url, shard.shard), ("index", shard.url, shard.index),
                                       ("backgrounds file", *_backgrounds(shard)))
             if record and "bytes" in record and "sha256" in record]
    if not sizes:
        return
    largest, url, kind = max(sizes, key=lambda size: size[0])  # the first of the largest
    if limit < largest:
        raise PipelineError(f"cache_limit {format_size(limit)} is below the largest {kind} to cache, {url} "
                            f"({format_size(largest)}): raise it to at least that, or leave it out")
    others = sum(stat.st_size for path, stat in _files(folder) if not is_own(folder, path))
    needed = readers * largest + others
    if warn and limit < needed and folder not in _warned:
        _warned.add(folder)
        log.warning("cache_limit %s cannot hold the %d files read at once on this machine (one per worker "
                    "of each rank) of up to %s each%s: that needs %s; those that do not fit are read remotely",
                    format_size(limit), readers, format_size(largest),
                    f", beside {format_size(others)} of other files in {folder}" if others else "",
                    format_size(needed))
