"""Where shards come from: URL patterns, the manifest beside them, what it says of each shard.

Everything goes through fsspec, so local paths, file://, http(s)://, s3://, gs:// and any
other fsspec protocol work alike (reading bytes: pipeline.streams).
"""

import glob
import json
import os
import posixpath
import urllib.parse

import braceexpand

from pipeline import schema
from pipeline.clients import client
from pipeline.errors import PipelineError
from pipeline.streams import read_whole

_GLOB_CHARS = "*?["


def _is_path(url: str) -> bool:
    """A plain file path, no scheme (file:// included): what os.path and glob take as it is."""
    return "://" not in url


def expand_urls(urls, storage_options: dict | None = None) -> list[str]:
    """Shard URLs from a brace pattern, a local or fsspec glob, or a list of either.

    A pattern (or a local path) that matches nothing raises PipelineError naming it. A glob
    never matches a compact shard set's backgrounds.tar: it is beside the shards, not one of them.
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
                if _is_path(url) and not os.path.exists(url):
                    raise PipelineError(f"no such shard: {url} (from pattern {pattern!r})")
                matches.append(url)
            elif _is_path(url):
                matches.extend(_shards_of(sorted(glob.glob(url))))
            else:
                try:
                    fs, path = client(url, storage_options)
                    matches.extend(_shards_of(fs.unstrip_protocol(p) for p in sorted(fs.glob(path))))
                except Exception as error:  # fsspec backends raise their own client errors
                    raise PipelineError(f"cannot list {url}: {type(error).__name__}: {error}") from error
        if not matches:
            raise PipelineError(f"shard pattern {pattern!r} matches nothing")
        found.extend(matches)
    return found


def _shards_of(matches) -> list[str]:
    return [url for url in matches if shard_basename(url) != schema.BACKGROUNDS]


def shard_basename(url: str) -> str:
    """A shard's file name, without the folder and any query (a presigned URL's signature)."""
    return posixpath.basename(urllib.parse.urlsplit(url).path if not _is_path(url) else url)


def shard_folder(url: str) -> str:
    """The folder a shard URL lives in (or the URL itself when it is not a .tar).

    A query string (`.../batch-1.tar?X-Amz-Signature=...`) belongs to the object, not to the
    folder, and is dropped.
    """
    if _is_path(url):
        return (posixpath.dirname(url) or ".") if url.endswith(".tar") else url.rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if not parts.path.endswith(".tar"):
        return url.rstrip("/")
    folder = posixpath.dirname(parts.path).rstrip("/")
    return urllib.parse.urlunsplit(parts._replace(path=folder, query="", fragment=""))


def read_manifest(url: str, storage_options: dict | None = None, *, retries: int = 2,
                  retry_wait: float = 0.5) -> dict | None:
    """The manifest.json beside a shard (or inside a folder URL), or None when there is none."""
    manifest_url = f"{shard_folder(url)}/{schema.MANIFEST}"
    data = read_whole(manifest_url, storage_options, retries=retries, retry_wait=retry_wait)
    if data is None:
        return None
    try:
        return json.loads(data)
    except json.JSONDecodeError as error:
        raise PipelineError(f"{manifest_url}: not valid JSON ({error})") from None


def shard_entries(manifest: dict) -> dict[str, dict]:
    """Shard name -> its manifest entry (the manifest's "shards" map or list)."""
    shards = manifest.get("shards", {})
    if isinstance(shards, dict):
        return {name: dict(entry, name=name) for name, entry in shards.items()}
    return {entry["name"]: entry for entry in shards}


def read_manifests(urls: list[str], storage_options: dict | None = None, **retrying) -> dict[str, dict | None]:
    """Each shard folder's manifest (None where it has none), read once per folder
    (retrying: read_manifest's retries and retry_wait)."""
    manifests: dict[str, dict | None] = {}
    for url in urls:
        folder = shard_folder(url)
        if folder not in manifests:
            manifests[folder] = read_manifest(url, storage_options, **retrying)
    return manifests


def manifest_entries(urls: list[str], manifests: dict[str, dict | None]) -> list[dict | None]:
    """Each shard's manifest entry (samples, bytes, sha256, index), or None where its folder's
    manifest (from read_manifests) is missing or does not list the shard."""
    by_folder = {folder: shard_entries(manifest) if manifest else {} for folder, manifest in manifests.items()}
    return [by_folder[shard_folder(url)].get(shard_basename(url)) for url in urls]


def explicit_sizes(urls: list[str], explicit) -> list[int]:
    """Sample counts given by the caller: a list in URL order, or shard name -> count."""
    if isinstance(explicit, dict):
        missing = [u for u in urls if shard_basename(u) not in explicit]
        if missing:
            raise PipelineError(f"shard_sizes has no entry for {missing[0]}")
        return [int(explicit[shard_basename(u)]) for u in urls]
    if len(explicit) != len(urls):
        raise PipelineError(f"shard_sizes has {len(explicit)} entries for {len(urls)} shards")
    return [int(n) for n in explicit]
