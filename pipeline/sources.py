"""Where shards come from: URL patterns, the manifest beside them, and retrying streams.

Everything goes through fsspec, so local paths, file://, http(s)://, s3://, gs:// and any
other fsspec protocol work alike. Shards are read strictly sequentially: HTTP servers without
Range support work, and an object store is read in large blocks.
"""

import glob
import io
import json
import logging
import os
import posixpath
import tarfile
import time
import urllib.parse

import braceexpand
import fsspec

from pipeline import schema
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

_GLOB_CHARS = "*?["
_OBJECT_STORE_BLOCK = 16 << 20  # one ranged GET per 16 MiB on s3/gcs
_READ_CHUNK = 1 << 20


def _is_local(url: str) -> bool:
    return "://" not in url


def expand_urls(urls, storage_options: dict | None = None) -> list[str]:
    """Shard URLs from a brace pattern, a local or fsspec glob, or a list of either.

    A pattern (or a local path) that matches nothing raises PipelineError naming it.
    storage_options reach the filesystem that lists a remote glob.
    """
    patterns = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    if not patterns:
        raise PipelineError("no shard URLs given")
    found = []
    for pattern in map(os.fspath, patterns):
        matches = []
        for url in braceexpand.braceexpand(pattern):
            if not any(c in url for c in _GLOB_CHARS):
                if _is_local(url) and not os.path.exists(url):
                    raise PipelineError(f"no such shard: {url} (from pattern {pattern!r})")
                matches.append(url)
            elif _is_local(url):
                matches.extend(sorted(glob.glob(url)))
            else:
                try:
                    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
                    matches.extend(fs.unstrip_protocol(p) for p in sorted(fs.glob(path)))
                except Exception as error:  # fsspec backends raise their own client errors
                    raise PipelineError(f"cannot list {url}: {type(error).__name__}: {error}") from error
        if not matches:
            raise PipelineError(f"shard pattern {pattern!r} matches nothing")
        found.extend(matches)
    return found


def shard_basename(url: str) -> str:
    """A shard's file name, without the folder and any query (a presigned URL's signature)."""
    return posixpath.basename(urllib.parse.urlsplit(url).path if not _is_local(url) else url)


def shard_folder(url: str) -> str:
    """The folder a shard URL lives in (or the URL itself when it is not a .tar).

    A query string (`.../batch-1.tar?X-Amz-Signature=...`) belongs to the object, not to the
    folder, and is dropped.
    """
    if _is_local(url):
        return (posixpath.dirname(url) or ".") if url.endswith(".tar") else url.rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if not parts.path.endswith(".tar"):
        return url.rstrip("/")
    folder = posixpath.dirname(parts.path).rstrip("/")
    return urllib.parse.urlunsplit(parts._replace(path=folder, query="", fragment=""))


def read_manifest(url: str, storage_options: dict | None = None) -> dict | None:
    """The manifest.json beside a shard (or inside a folder URL), or None when there is none."""
    manifest_url = f"{shard_folder(url)}/{schema.MANIFEST}"
    try:
        with open_shard(manifest_url, storage_options, retries=2, retry_wait=0.5) as f:
            return json.loads(f.read())
    except PipelineError as error:
        # fsspec's HTTP reports a refused connection as FileNotFoundError too: that one is
        # transient, failed every retry, and must surface rather than read as "no manifest".
        if isinstance(error.__cause__, FileNotFoundError) and not _is_transient(error.__cause__):
            return None
        raise
    except json.JSONDecodeError as error:
        raise PipelineError(f"{manifest_url}: not valid JSON ({error})") from None


def manifest_counts(manifest: dict) -> dict[str, int]:
    """Shard name -> sample count from a manifest (its "shards" map or list)."""
    shards = manifest.get("shards", {})
    if isinstance(shards, dict):
        return {name: int(entry["samples"]) for name, entry in shards.items()}
    return {entry["name"]: int(entry["samples"]) for entry in shards}


def count_local_samples(path: str) -> int:
    """Samples in a local tar, counted from its headers alone (data is seeked over)."""
    count, last = 0, None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _ = schema.split_member(member.name)
                if member.isfile() and key != last:
                    count, last = count + 1, key
    except (OSError, tarfile.TarError) as error:
        raise PipelineError(f"{path}: cannot read tar headers ({error})") from None
    return count


def shard_sizes(urls: list[str], storage_options: dict | None = None,
                explicit=None) -> list[int]:
    """Samples per shard: from `explicit` (list or name -> count), the manifest, or a scan."""
    if explicit is not None:
        if isinstance(explicit, dict):
            missing = [u for u in urls if shard_basename(u) not in explicit]
            if missing:
                raise PipelineError(f"shard_sizes has no entry for {missing[0]}")
            return [int(explicit[shard_basename(u)]) for u in urls]
        if len(explicit) != len(urls):
            raise PipelineError(f"shard_sizes has {len(explicit)} entries for {len(urls)} shards")
        return [int(n) for n in explicit]
    counts_by_folder: dict[str, dict | None] = {}
    sizes = []
    for url in urls:
        folder = shard_folder(url)
        if folder not in counts_by_folder:
            manifest = read_manifest(url, storage_options)
            counts_by_folder[folder] = manifest_counts(manifest) if manifest else None
        counts = counts_by_folder[folder]
        name = shard_basename(url)
        if counts is not None and name in counts:
            sizes.append(counts[name])
        elif _is_local(url) or url.startswith("file://"):
            sizes.append(count_local_samples(url.removeprefix("file://")))
        else:
            raise PipelineError(f"{url}: no sample count for it in {folder}/{schema.MANIFEST}; "
                                "put the converter's manifest beside the shards or pass shard_sizes")
    return sizes


def _is_transient(error: BaseException) -> bool:
    """Worth a retry: connection drops, timeouts, 5xx; not a missing or forbidden object."""
    if isinstance(error, FileNotFoundError) and error.__cause__ is not None:
        # fsspec's HTTP info() reports every failure (refused connection, 503) this way.
        return _is_transient(error.__cause__)
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    try:
        import aiohttp
    except ImportError:  # only the local and object-store paths are in use then
        aiohttp = None
    if aiohttp is not None:
        if isinstance(error, aiohttp.ClientResponseError):
            return error.status >= 500 or error.status in (408, 429)
        if isinstance(error, aiohttp.ClientError):
            return True
    return isinstance(error, (OSError, EOFError))


class RetryingStream(io.RawIOBase):
    """A sequential, read-only view of one URL that survives transient failures.

    On a transient error it reopens the URL (with exponential backoff, at most `retries`
    times in a row) and continues at the byte offset reached: by seeking when the file
    can, else by reading and discarding. Permanent errors raise PipelineError naming the URL.
    """

    def __init__(self, url: str, storage_options: dict | None = None, *,
                 retries: int = 5, retry_wait: float = 1.0, block_size: int = _OBJECT_STORE_BLOCK):
        super().__init__()
        self.url, self.retries, self.retry_wait, self.block_size = url, retries, retry_wait, block_size
        self._options = dict(storage_options or {})
        self._offset = 0
        self._file = None
        self._with_retries(lambda: None)  # open now, so a bad URL fails here

    def _open(self):
        fs, path = fsspec.core.url_to_fs(self.url, skip_instance_cache=True, **self._options)
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        if protocols & {"http", "https"}:
            # block_size=0: one streaming GET, so servers without Range support work.
            file = fs.open(path, "rb", block_size=0)
        elif protocols & {"file", "local"}:
            file = fs.open(path, "rb")
        else:
            file = fs.open(path, "rb", block_size=self.block_size, cache_type="readahead")
        self._file = file
        if self._offset:
            self._resume(file)

    def _resume(self, file):
        try:
            file.seek(self._offset)
            return
        except (ValueError, OSError, NotImplementedError):
            pass
        left = self._offset
        while left:
            chunk = file.read(min(left, _READ_CHUNK))
            if not chunk:
                raise EOFError(f"stream ended at byte {self._offset - left} while resuming")
            left -= len(chunk)

    def _close_file(self):
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # a broken connection may fail to close; it is dropped anyway
                pass
            self._file = None

    def _with_retries(self, action):
        failures = 0
        while True:
            try:
                if self._file is None:
                    self._open()
                return action()
            except Exception as error:
                self._close_file()
                if isinstance(error, PipelineError):
                    raise
                reason = f"{type(error).__name__}: {error}".strip().rstrip(":")
                if not _is_transient(error):
                    raise PipelineError(f"cannot read {self.url}: {reason}") from error
                failures += 1
                if failures > self.retries:
                    raise PipelineError(f"cannot read {self.url} after {failures} attempts: {reason}") from error
                wait = self.retry_wait * 2 ** (failures - 1)
                log.warning("retrying %s at byte %d in %.1fs (%s)", self.url, self._offset, wait, reason)
                time.sleep(wait)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        def read():
            data = self._file.read(len(buffer))
            buffer[: len(data)] = data
            return len(data)

        count = self._with_retries(read)
        self._offset += count
        return count

    def close(self):
        self._close_file()
        super().close()


def open_shard(url: str, storage_options: dict | None = None, *, retries: int = 5,
               retry_wait: float = 1.0, block_size: int = _OBJECT_STORE_BLOCK) -> io.BufferedReader:
    """A buffered, retrying, sequential reader of one shard; `block_size` is the size of each
    ranged read from an object store (small for a peek at a shard's first bytes)."""
    raw = RetryingStream(url, storage_options, retries=retries, retry_wait=retry_wait, block_size=block_size)
    return io.BufferedReader(raw, buffer_size=min(_READ_CHUNK, block_size))
