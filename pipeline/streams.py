"""Byte ranges of any URL as retrying, sequential streams that fetch no byte past the range.

How a range [start, end) is read, by where it lives:
- local files: seek to start, read to end;
- http(s): one streaming GET with `Range: bytes=start-(end-1)`; a server that ignores Range
  (answers 200) is streamed from byte 0 and skipped to start, with one warning per URL;
- object stores (s3, gs, any async fsspec filesystem): ranged GETs of at most 8 MiB, each
  bounded by the range end, so nothing is read ahead past it;
- anything else fsspec opens (simplecache::, memory://, ...): its own file object, seeked.
A transient failure (see clients.is_transient) reopens the range at the byte reached, with
exponential backoff, at most `retries` times in a row; anything else raises PipelineError
naming the URL.
"""

import io
import logging
import time

import fsspec.asyn

from pipeline.clients import client, is_local, is_transient
from pipeline.errors import PipelineError, warn_once

log = logging.getLogger(__name__)

OBJECT_STORE_CHUNK = 8 << 20  # bytes per ranged GET: a few round trips per shard range, little memory
_READ_CHUNK = 1 << 20


class _Seeking:
    """A local or other seekable file from `start` to its end (the caller stops at its range's)."""

    def __init__(self, file, start: int):
        self.file = file
        self.file.seek(start)

    def read(self, size: int) -> bytes:
        return self.file.read(size)

    def close(self):
        self.file.close()


class _Http:
    """One GET of the range on the filesystem's own aiohttp session (connections are reused)."""

    def __init__(self, fs, url: str, start: int, end: int | None):
        self.fs, self.response = fs, None
        headers = dict(fs.kwargs.get("headers") or {})
        if start or end is not None:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        request = {**fs.kwargs, "headers": headers}

        async def get():
            session = await fs.set_session()
            return await session.get(fs.encode_url(url), **request)

        self.response = fsspec.asyn.sync(fs.loop, get)
        # The range starts at or past the end (a shorter file): an empty range.
        self.done = self.response.status == 416
        try:
            self._check(url, start)
        except BaseException:
            self.close()
            raise

    def _check(self, url: str, start: int) -> None:
        response = self.response
        if response.status == 404:
            raise FileNotFoundError(url)
        if response.status in (401, 403):
            raise PermissionError(f"HTTP {response.status} for {url}")
        if not self.done:
            response.raise_for_status()
        if response.status == 200 and start:
            warn_once(log, "%s: the server ignores Range requests; streaming from byte 0 and skipping to "
                      "each range start", url)
            self._discard(start)
        elif response.status == 206 and start:
            first = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-", 1)[0]
            if first != str(start):
                raise PipelineError(f"{url}: asked for bytes from {start}, the server sent "
                                    f"Content-Range {response.headers.get('Content-Range')!r}")

    def _discard(self, count: int) -> None:
        while count:
            chunk = self.read(min(count, _READ_CHUNK))
            if not chunk:
                return  # the file is shorter than start: the range is empty
            count -= len(chunk)

    def read(self, size: int) -> bytes:
        if self.done:
            return b""
        return fsspec.asyn.sync(self.fs.loop, self.response.content.read, size)

    def close(self):
        if self.response is not None:
            response, self.response = self.response, None
            # A body read to its end goes back to the pool; one left unread must not be.
            finished = response.content.at_eof()
            self.fs.loop.call_soon_threadsafe(response.release if finished else response.close)


class _Chunked:
    """Ranged GETs through an async filesystem's cat_file, each ending at the range end."""

    def __init__(self, fs, path: str, start: int, end: int | None):
        self.fs, self.path, self.position = fs, path, start
        size = fs.size(path)  # also clamps a range past the end of a shorter object (no 416)
        self.end = size if end is None else min(end, size)
        self.chunk = memoryview(b"")

    def read(self, size: int) -> bytes:
        if not self.chunk and self.position < self.end:
            stop = min(self.position + OBJECT_STORE_CHUNK, self.end)
            self.chunk = memoryview(self.fs.cat_file(self.path, start=self.position, end=stop))
            self.position += len(self.chunk)
            if not self.chunk:
                self.end = self.position  # the object shrank since its size was read
        data, self.chunk = self.chunk[:size], self.chunk[size:]
        return bytes(data)

    def close(self):
        self.chunk = memoryview(b"")


def _source(url: str, storage_options: dict | None, start: int, end: int | None):
    if is_local(url):
        return _Seeking(open(url.removeprefix("file://"), "rb"), start)
    fs, path = client(url, storage_options)
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if protocols & {"http", "https"}:
        return _Http(fs, path, start, end)
    if isinstance(fs, fsspec.asyn.AsyncFileSystem):
        return _Chunked(fs, path, start, end)
    return _Seeking(fs.open(path, "rb"), start)


class RetryingStream(io.RawIOBase):
    """Bytes [start, end) of one URL (end None: to its end), read front to back, surviving
    transient failures by reopening at the byte reached (see the module docstring)."""

    def __init__(self, url: str, storage_options: dict | None = None, *, start: int = 0,
                 end: int | None = None, retries: int = 5, retry_wait: float = 1.0):
        super().__init__()
        self.url, self.retries, self.retry_wait = url, retries, retry_wait
        self._options, self._offset, self._end = storage_options, start, end
        self._source = None
        self._with_retries(lambda: None)  # open now, so a bad URL fails here

    def _with_retries(self, action):
        failures = 0
        while True:
            try:
                if self._source is None:
                    self._source = _source(self.url, self._options, self._offset, self._end)
                return action()
            except Exception as error:
                self._close_source()
                if isinstance(error, PipelineError):
                    raise
                reason = f"{type(error).__name__}: {error}".strip().rstrip(":")
                if not is_transient(error):
                    raise PipelineError(f"cannot read {self.url}: {reason}") from error
                failures += 1
                if failures > self.retries:
                    raise PipelineError(f"cannot read {self.url} after {failures} attempts: {reason}") from error
                wait = self.retry_wait * 2 ** (failures - 1)
                log.warning("retrying %s at byte %d in %.1fs (%s)", self.url, self._offset, wait, reason)
                time.sleep(wait)

    def _close_source(self):
        if self._source is not None:
            source, self._source = self._source, None
            try:
                source.close()
            except Exception as error:  # a broken connection may fail to close; it is dropped anyway
                log.debug("closing %s: %s", self.url, error)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        wanted = len(buffer) if self._end is None else min(len(buffer), self._end - self._offset)
        if wanted <= 0:
            return 0
        data = self._with_retries(lambda: self._source.read(wanted))
        buffer[: len(data)] = data
        self._offset += len(data)
        return len(data)

    def close(self):
        self._close_source()
        super().close()


def open_range(url: str, storage_options: dict | None = None, *, start: int = 0, end: int | None = None,
               retries: int = 5, retry_wait: float = 1.0) -> io.BufferedReader:
    """A buffered RetryingStream of bytes [start, end) of url (end None: to its end)."""
    raw = RetryingStream(url, storage_options, start=start, end=end, retries=retries, retry_wait=retry_wait)
    return io.BufferedReader(raw, buffer_size=_READ_CHUNK if end is None else max(1, min(_READ_CHUNK, end - start)))


def read_whole(url: str, storage_options: dict | None = None, *, retries: int = 5,
               retry_wait: float = 1.0) -> bytes | None:
    """A small file's bytes (a manifest, an index), or None when it does not exist.

    fsspec's HTTP reports a refused connection as FileNotFoundError too: that one is
    transient, failed every retry, and raises PipelineError rather than reading as missing.
    """
    try:
        with open_range(url, storage_options, retries=retries, retry_wait=retry_wait) as f:
            return f.read()
    except PipelineError as error:
        if isinstance(error.__cause__, FileNotFoundError) and not is_transient(error.__cause__):
            return None
        raise
