"""A local disk cache of remote shards and indexes, shared by every worker and rank of a machine.

A file is kept under the sha256 the manifest gives it (`{sha256}-{name}`), so a cached copy is
the manifest's bytes or absent, whichever URL it came from, and a rewritten remote shard gets
a new name instead of a stale hit. The first process to need a file takes an exclusive
`fcntl.flock` on `{file}.lock`, downloads it whole to `{file}.part` (truncating whatever a
killed process left there), checks size and sha256 once, and publishes it with
schema.replace_durably; processes needing it meanwhile wait on the lock, then read the copy.
So a file is downloaded once per machine, never written by two processes, and never read
half-written. A file the manifest does not describe (no sha256 to check) is not cached, and
a cache that cannot be written (disk full) falls back to remote reads: both with one warning.
"""

import fcntl
import hashlib
import logging
import os

from pipeline import schema
from pipeline.errors import PipelineError
from pipeline.streams import open_range

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_uncacheable: set[str] = set()  # URLs this process found it cannot cache: read remotely from then on


def _give_up(url: str, reason: str) -> None:
    """Mark `url` uncacheable for this process, saying why once."""
    if url not in _uncacheable:
        _uncacheable.add(url)
        log.warning("%s: %s", url, reason)


def check_cache_dir(cache_dir: str) -> None:
    """Create cache_dir if needed; PipelineError (one line naming it) when it is not writable."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        probe = os.path.join(cache_dir, f".write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as error:
        raise PipelineError(f"cache_dir {cache_dir}: cannot write there ({error.strerror or error})") from None


def cached_name(name: str, expected: dict) -> str:
    return f"{expected['sha256']}-{name}"


def lookup(cache_dir: str, name: str, expected: dict | None) -> str | None:
    """The cached copy of file `name` described by `expected` ({"bytes", "sha256"}), or None."""
    if not expected or "sha256" not in expected or "bytes" not in expected:
        return None
    path = os.path.join(cache_dir, cached_name(name, expected))
    try:
        return path if os.path.getsize(path) == expected["bytes"] else None
    except OSError:
        return None


def _download(url: str, part: str, storage_options, retries: int, retry_wait: float) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with open(part, "wb") as out, open_range(url, storage_options, retries=retries, retry_wait=retry_wait) as src:
        while chunk := src.read(_CHUNK):
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def fetch(cache_dir: str, url: str, name: str, expected: dict | None, storage_options: dict | None, *,
          retries: int = 5, retry_wait: float = 1.0) -> str | None:
    """The local path of a verified copy of `url` (file `name`, described by the manifest's
    `expected` {"bytes", "sha256"}) in cache_dir, downloaded first when no process has yet;
    None when it cannot be cached (the caller reads it remotely). Raises PipelineError when
    the download itself fails (like any remote read)."""
    if not expected or "sha256" not in expected or "bytes" not in expected:
        _give_up(url, "not cached: the manifest gives no size and sha256 to check a copy against")
        return None
    if (hit := lookup(cache_dir, name, expected)) is not None:
        return hit
    if url in _uncacheable:
        return None
    final = os.path.join(cache_dir, cached_name(name, expected))
    part = final + ".part"
    try:
        lock = os.open(final + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        _give_up(url, f"not cached: cannot write to {cache_dir} ({error.strerror or error})")
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        if (hit := lookup(cache_dir, name, expected)) is not None:
            return hit  # another process published it while this one waited
        try:
            size, sha256 = _download(url, part, storage_options, retries, retry_wait)
            if (size, sha256) != (expected["bytes"], expected["sha256"]):
                _give_up(url, f"not cached: {size} bytes with sha256 {sha256[:12]}..., the manifest "
                                f"says {expected['bytes']} bytes, {expected['sha256'][:12]}...")
                return None
            schema.replace_durably(part, final)
            return final
        except OSError as error:  # the cache's disk (full, read-only): reading remotely still works
            _give_up(url, f"not cached: cannot write to {cache_dir} ({error.strerror or error})")
            return None
        finally:
            if os.path.exists(part):
                os.remove(part)
    finally:
        os.close(lock)  # closing the descriptor releases the lock
