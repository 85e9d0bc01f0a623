"""A local disk cache of remote shards and indexes, shared by every worker and rank of a machine.

A file is kept under the sha256 the manifest gives it (`{sha256}-{name}`), so a cached copy is
the manifest's bytes or absent, whichever URL it came from, and a rewritten remote shard gets
a new name instead of a stale hit. The first process to need a file takes an exclusive
`fcntl.flock` on `{file}.lock`, downloads it whole to `{file}.part` (allocated at its full
size, replacing whatever a killed process left there), checks size and sha256 once, and
publishes it with schema.replace_durably; processes needing it meanwhile wait on the lock,
then read the copy. So a file is downloaded once per machine, never written by two
processes, and never read half-written. A process reading a copy holds a shared `flock` on
it for as long as it reads, which is what keeps it from eviction when the folder has a
`limit` (pipeline.cachelimit: the bytes under it never exceed the limit, downloads counted).
A file the manifest does not describe (no sha256 to check) is not cached, and a cache that
cannot be written (disk full) falls back to remote reads: both with one warning; so does a
file that finds no room under the limit (said before the first batch: cachelimit.check_limit).
"""

import contextlib
import fcntl
import hashlib
import logging
import os

from pipeline import cachelimit, schema
from pipeline.cachelimit import ENTRY_LOCK, PART, format_size
from pipeline.errors import PipelineError
from pipeline.streams import open_range

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_uncacheable: set[str] = set()  # URLs this process found it cannot cache: read remotely from then on
_counts = {"hits": 0, "misses": 0}  # this process's, since it started
COUNTS = ("hits", "misses", "evictions")


def counters() -> dict:
    """This process's cache counts (COUNTS) since it started: hits (a copy read), misses (a
    file downloaded, or read remotely) and evictions (copies it removed to make room)."""
    return {**_counts, "evictions": cachelimit.evictions}


def _give_up(url: str, reason: str) -> None:
    """Mark `url` uncacheable for this process, saying why once."""
    if url not in _uncacheable:
        _uncacheable.add(url)
        log.warning("%s: %s", url, reason)


def check_cache_dir(cache_dir: str) -> None:
    """Create cache_dir if needed and remove the downloads killed processes left there;
    PipelineError (one line naming it) when it is not writable."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        probe = os.path.join(cache_dir, f".write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
        cachelimit.remove_stale_parts(cache_dir)
    except OSError as error:
        raise PipelineError(f"cache_dir {cache_dir}: cannot write there ({error.strerror or error})") from None


def cached_name(name: str, expected: dict) -> str:
    return f"{expected['sha256']}-{name}"


def _describes(expected: dict | None) -> bool:
    return bool(expected) and "sha256" in expected and "bytes" in expected


def _hold(path: str, size: int) -> int | None:
    """A descriptor of the copy at `path` holding a shared flock (no process evicts it while
    that is open), or None when there is no whole copy there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    stat = os.fstat(fd)
    if stat.st_nlink == 0 or stat.st_size != size:  # evicted between the open and the lock
        os.close(fd)
        return None
    with contextlib.suppress(OSError):  # a folder shared read-only: the copy is still good to read
        os.utime(path)  # its last use, which eviction goes by
    return fd


@contextlib.contextmanager
def lookup(cache_dir: str, name: str, expected: dict | None):
    """The cached copy of file `name` described by `expected` ({"bytes", "sha256"}), held until
    the with block ends; None when there is none."""
    held = _hold(os.path.join(cache_dir, cached_name(name, expected)), expected["bytes"]) \
        if _describes(expected) else None
    try:
        yield None if held is None else os.path.join(cache_dir, cached_name(name, expected))
    finally:
        if held is not None:
            os.close(held)


def _download(url: str, out, size: int, storage_options, retries: int, retry_wait: float) -> tuple[int, str]:
    """(bytes, sha256) of `url`, its first `size` bytes written to `out` (the room allocated):
    reading stops once it is longer."""
    digest, written = hashlib.sha256(), 0
    with open_range(url, storage_options, retries=retries, retry_wait=retry_wait) as src:
        while written <= size and (chunk := src.read(_CHUNK)):
            out.write(chunk[:max(size - written, 0)])
            digest.update(chunk)
            written += len(chunk)
    return written, digest.hexdigest()


def _publish(cache_dir: str, url: str, final: str, expected: dict, storage_options, limit: int | None,
             retries: int, retry_wait: float) -> int | None:
    """Download `url` to `final` (its entry lock held) and hold it; None when it is not cached."""
    part = final + PART
    size = expected["bytes"]
    try:
        fd, needed = cachelimit.open_part(cache_dir, part, size, limit)
        if fd is None:  # the folder's other files are all in use: do not wait for them
            log.info("%s: read remotely: cache_limit %s has no room for its %s (%s needed now)", url,
                     format_size(limit), format_size(size), format_size(needed))
            return None
        with open(fd, "wb") as out:
            written, sha256 = _download(url, out, size, storage_options, retries, retry_wait)
        if (written, sha256) != (size, expected["sha256"]):
            _give_up(url, f"not cached: {written} bytes with sha256 {sha256[:12]}..., the manifest "
                          f"says {size} bytes, {expected['sha256'][:12]}...")
            return None
        schema.replace_durably(part, final)
        return _hold(final, size)  # before the entry lock is released: no eviction in between
    except OSError as error:  # the cache's disk (full, read-only): reading remotely still works
        _give_up(url, f"not cached: cannot write to {cache_dir} ({error.strerror or error})")
        return None
    finally:
        if os.path.exists(part):
            os.remove(part)


def _obtain(cache_dir: str, url: str, final: str, expected: dict, storage_options, limit: int | None,
            retries: int, retry_wait: float) -> int | None:
    """A held copy of `url` at `final`, downloaded first when no process has yet, or None."""
    if (held := _hold(final, expected["bytes"])) is not None:
        _counts["hits"] += 1
        return held
    if url in _uncacheable:
        _counts["misses"] += 1
        return None
    try:
        lock = os.open(final + ENTRY_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        _give_up(url, f"not cached: cannot write to {cache_dir} ({error.strerror or error})")
        _counts["misses"] += 1
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if (held := _hold(final, expected["bytes"])) is not None:
            _counts["hits"] += 1  # another process published it while this one waited
            return held
        _counts["misses"] += 1
        return _publish(cache_dir, url, final, expected, storage_options, limit, retries, retry_wait)
    finally:
        os.close(lock)  # closing the descriptor releases the lock


@contextlib.contextmanager
def fetch(cache_dir: str, url: str, name: str, expected: dict | None, storage_options: dict | None, *,
          limit: int | None = None, retries: int = 5, retry_wait: float = 1.0):
    """The local path of a verified copy of `url` (file `name`, described by the manifest's
    `expected` {"bytes", "sha256"}) in cache_dir, downloaded first when no process has yet,
    and held (never evicted) until the with block ends; None when it cannot be cached (the
    caller reads it remotely). `limit`: the bytes the folder may hold (pipeline.cachelimit).
    Raises PipelineError when the download itself fails (like any remote read)."""
    held = None
    if not _describes(expected):
        _give_up(url, "not cached: the manifest gives no size and sha256 to check a copy against")
        _counts["misses"] += 1
    else:
        final = os.path.join(cache_dir, cached_name(name, expected))
        held = _obtain(cache_dir, url, final, expected, storage_options, limit, retries, retry_wait)
    try:
        yield None if held is None else final
    finally:
        if held is not None:
            os.close(held)
