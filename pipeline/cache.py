"""A local disk cache of remote shards and indexes, shared by every worker and rank of a machine.

A file is kept under the sha256 the manifest gives it (`{sha256}-{name}`), so a cached copy is
the manifest's bytes or absent, whichever URL it came from, and a rewritten remote shard gets
a new name instead of a stale hit. The first process to need a file takes an exclusive
`fcntl.flock` on `{file}.lock`, downloads it whole to `{file}.part` (allocated at its full
size, replacing whatever a killed process left there), checks size and sha256 once, and
publishes it with schema.replace_durably; processes needing it meanwhile wait on the lock,
then read the copy. So a file is downloaded once per machine, never written by two
processes, and never read half-written. A process reading a copy holds `{file}.lock` shared
for as long as it reads, which is what keeps the copy from eviction when the folder has a
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


def _shared(lock: int, final: str, size: int) -> bool:
    """Hold `final`'s entry `lock` shared (no process evicts the copy while it is held; waits
    for a download or an eviction of it under way) and say whether a whole copy is there."""
    fcntl.flock(lock, fcntl.LOCK_SH)  # released by the kernel if this process dies
    if not _whole(final, size):
        return False
    with contextlib.suppress(OSError):  # a folder shared read-only: the copy is still good to read
        os.utime(final)  # its last use, which eviction goes by
    return True


def _whole(final: str, size: int) -> bool:
    try:
        return os.path.getsize(final) == size
    except OSError:
        return False


@contextlib.contextmanager
def lookup(cache_dir: str, name: str, expected: dict | None):
    """The cached copy of file `name` described by `expected` ({"bytes", "sha256"}), held until
    the with block ends; None when there is none."""
    final = os.path.join(cache_dir, cached_name(name, expected)) if _describes(expected) else None
    held = None
    if final is not None and os.path.exists(final):
        held = os.open(final + ENTRY_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        if not _shared(held, final, expected["bytes"]):
            os.close(held)
            held = None
    try:
        yield None if held is None else final
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
             retries: int, retry_wait: float) -> bool:
    """Download `url` to `final` (its entry lock held exclusively); False when it is not cached."""
    part = final + PART
    size = expected["bytes"]
    try:
        fd, needed = cachelimit.open_part(cache_dir, part, size, limit)
        if fd is None:  # the folder's other files are all in use: do not wait for them
            log.info("%s: read remotely: cache_limit %s has no room for its %s (%s needed now)", url,
                     format_size(limit), format_size(size), format_size(needed))
            return False
        with open(fd, "wb") as out:
            written, sha256 = _download(url, out, size, storage_options, retries, retry_wait)
        if (written, sha256) != (size, expected["sha256"]):
            _give_up(url, f"not cached: {written} bytes with sha256 {sha256[:12]}..., the manifest "
                          f"says {size} bytes, {expected['sha256'][:12]}...")
            return False
        schema.replace_durably(part, final)
        return True
    except OSError as error:  # the cache's disk (full, read-only): reading remotely still works
        _give_up(url, f"not cached: cannot write to {cache_dir} ({error.strerror or error})")
        return False
    finally:
        if os.path.exists(part):
            os.remove(part)


def _obtain(cache_dir: str, url: str, final: str, expected: dict, storage_options, limit: int | None,
            retries: int, retry_wait: float) -> int | None:
    """`final`'s entry lock, held shared over a whole copy of `url` there, downloaded first when
    no process has yet; None when it is read remotely."""
    if url in _uncacheable:
        _counts["misses"] += 1
        return None
    try:
        lock = os.open(final + ENTRY_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        _give_up(url, f"not cached: cannot write to {cache_dir} ({error.strerror or error})")
        _counts["misses"] += 1
        return None
    # flock changes a lock's kind by dropping it first, so a copy published under the exclusive
    # lock may be evicted before the shared one is had: then it is downloaded once more.
    downloaded = False
    try:
        for _ in range(3):
            if _shared(lock, final, expected["bytes"]):
                _counts["hits"] += not downloaded
                return lock
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _whole(final, expected["bytes"]):
                continue  # another process published it in between: read it
            _counts["misses"] += 1
            if not _publish(cache_dir, url, final, expected, storage_options, limit, retries, retry_wait):
                break
            downloaded = True
    except BaseException:
        os.close(lock)
        raise
    os.close(lock)  # closing the descriptor releases the lock
    return None


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
