"""Filesystem clients: one fsspec instance per process and (protocol chain, options), and the
one rule for which storage errors are worth a retry.

A client is made the first time a process reads from a (protocol, options) pair and reused for
every shard, index, retry and epoch after that: one connection pool per worker, and a
`simplecache::`/`filecache::` URL keeps its cache across shards and epochs. Clients belong to
the process that made them: a forked DataLoader worker makes its own and leaves the parent's
alone (their event loop does not exist in the child, so even closing them would fail), and
each process closes its own when it exits (close_clients).
"""

import argparse
import json
import logging
import multiprocessing.util
import os
import threading

import fsspec
import fsspec.core

log = logging.getLogger(__name__)

_lock = threading.Lock()
_clients: dict[tuple, fsspec.AbstractFileSystem] = {}
_owner = os.getpid()
_inherited: list[dict] = []  # a parent's clients, kept referenced so they are never finalised here
_S3 = ("s3", "s3a")
# botocore's defaults since 1.36 validate the whole-object CRC that boto3 and the AWS CLI now
# attach to every upload, and fail every ranged GET on it (FlexibleChecksumError); the
# checksum is only meant for whole-object reads, and the shards have their sha256 in the manifest.
_S3_CHECKSUMS = {"response_checksum_validation": "AWS_RESPONSE_CHECKSUM_VALIDATION",
                 "request_checksum_calculation": "AWS_REQUEST_CHECKSUM_CALCULATION"}


def storage_option(text: str) -> tuple[str, object]:
    """An argparse type for --storage-option KEY=VALUE (train.py, predict.py, convert_zips.py,
    compose): VALUE is read as JSON when it parses (true, 3, {...}), else kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _chain(url: str) -> tuple[str, str]:
    """(protocol chain, last link): 'simplecache::s3://b/k' -> ('simplecache::s3', 's3://b/k')."""
    links = url.split("::")
    protocols = [link.split("://", 1)[0] if "://" in link else link for link in links[:-1]]
    last = links[-1]
    protocols.append(last.split("://", 1)[0] if "://" in last else "file")
    return "::".join(protocols), last


def _s3_defaults(options: dict) -> dict:
    config = dict(options.get("config_kwargs") or {})
    for name, variable in _S3_CHECKSUMS.items():
        if name not in config and variable not in os.environ:
            config[name] = "when_required"
    return {**options, "config_kwargs": config}


def _with_defaults(chain: str, options: dict) -> dict:
    protocols = chain.split("::")
    if protocols[-1] not in _S3:
        return options
    if len(protocols) == 1:
        return _s3_defaults(options)
    return {**options, protocols[-1]: _s3_defaults(options.get(protocols[-1], {}))}


def client(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(this process's filesystem for url's protocol chain and options, url's path on it)."""
    global _owner
    options = dict(storage_options or {})
    chain, last = _chain(url)
    token = (chain, json.dumps(options, sort_keys=True, default=repr))
    with _lock:
        if os.getpid() != _owner:  # a forked child: start afresh, leave the parent's untouched
            _inherited.append(dict(_clients))
            _clients.clear()
            _owner = os.getpid()
        fs = _clients.get(token)
        if fs is None:
            fs, _ = fsspec.core.url_to_fs(url, skip_instance_cache=True, **_with_defaults(chain, options))
            if not _clients:
                # DataLoader workers end through multiprocessing, which runs these, not atexit.
                multiprocessing.util.Finalize(None, close_clients, exitpriority=10)
            _clients[token] = fs
    return fs, fs._strip_protocol(last)


def close_clients() -> None:
    """Close this process's clients (connection pools, sessions); the next read makes new ones.

    Runs by itself when the process exits (workers included); call it to release connections
    earlier.
    """
    with _lock:
        owned = list(_clients.values()) if os.getpid() == _owner else []
        _clients.clear()
    for fs in owned:
        # s3fs keeps its client in _s3creator, HTTP and gcsfs their aiohttp session in _session;
        # close_session(loop, session) is how each of them closes itself when collected.
        session = getattr(fs, "_s3creator", None) or getattr(fs, "_session", None)
        if session is not None and hasattr(fs, "close_session"):
            try:
                fs.close_session(fs.loop, session)
            except Exception as error:  # a session that fails to close is dropped anyway
                log.debug("closing %s: %s", type(fs).__name__, error)


def is_transient(error: BaseException) -> bool:
    """Worth a retry: connection drops, refusals, timeouts, 5xx, throttling; not a missing or
    forbidden object, nor bad arguments."""
    if isinstance(error, FileNotFoundError) and error.__cause__ is not None:
        # fsspec's HTTP info() reports every failure (refused connection, 503) this way.
        return is_transient(error.__cause__)
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
    try:
        import botocore.exceptions as boto
    except ImportError:
        boto = None
    if boto is not None:
        # EndpointConnectionError, ConnectTimeoutError (ConnectionError); ConnectionClosedError,
        # ReadTimeoutError, ResponseStreamingError (HTTPClientError): none is an OSError.
        if isinstance(error, (boto.ConnectionError, boto.HTTPClientError)):
            return True
        if isinstance(error, boto.ClientError):
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status >= 500 or status in (408, 429)
    return isinstance(error, (OSError, EOFError))
