"""Per-sample byte indexes of shards: build one from a shard's headers, load one for reading.

convert_zips.py writes the index of every shard it makes; this command builds the same index
for shards written by other tools (stock webdataset, GNU tar), so they too can be read by
byte range:

    python -m pipeline.index 'shards/batch-{1..20}.tar'              # writes batch-N.tar.idx beside each
    python -m pipeline.index 's3://bucket/shards/*.tar'               # uploads each index beside its shard
    python -m pipeline.index 'https://host/shards/*.tar' --out idx/   # read-only storage: write them here

The format is in pipeline.schema (one line of JSON: keys, offsets, shard_bytes). Reading a
shard to index it costs one pass over its bytes; the result is the same bytes whoever writes it.
"""

import argparse
import collections
import json
import logging
import os
import sys
import urllib.parse

from pipeline import cache, schema
from pipeline.clients import client, is_local
from pipeline.errors import PipelineError, warn_once
from pipeline.sources import expand_urls, shard_basename
from pipeline.streams import open_range, read_whole
from pipeline.tarstream import TarFormatError, iter_members

log = logging.getLogger(__name__)


def index_url(url: str) -> str:
    """Where a shard's index lives: the shard's URL with the index suffix on its path."""
    if is_local(url):
        return schema.index_name(url)
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=schema.index_name(parts.path)))


class _Counting:
    def __init__(self, stream):
        self.stream, self.count = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data

    def seekable(self) -> bool:
        return False


def build_index(url: str, storage_options: dict | None = None, *, retries: int = 5,
                retry_wait: float = 1.0) -> schema.ShardIndex:
    """Scan a shard's headers (one pass over its bytes) into its byte index.

    Raises PipelineError naming the shard when it cannot be read or is not a valid tar."""
    with open_range(url, storage_options, retries=retries, retry_wait=retry_wait) as raw:
        stream = _Counting(raw)
        try:
            keys, offsets = _sample_starts(stream)
        except TarFormatError as error:
            raise PipelineError(f"{url}: cannot index it: {error}") from None
        while stream.read(1 << 20):  # the end-of-archive blocks and padding count in its size
            pass
    return schema.ShardIndex(keys, offsets, stream.count)


def count_local_samples(path: str) -> int:
    """Samples in a local tar, counted from its headers alone (data is seeked past)."""
    try:
        with open(path.removeprefix("file://"), "rb") as f:
            return len(_sample_starts(f)[0])
    except (OSError, TarFormatError) as error:
        raise PipelineError(f"{path}: cannot read tar headers ({error})") from None


def _sample_starts(stream) -> tuple[list[str], list[int]]:
    """(each sample's key, the byte offset of its first header) from a tar stream's headers,
    data skipped; the offsets end with where the members end. TarFormatError on damage."""
    keys, offsets = [], []
    members = iter_members(stream, lambda key, suffix: False)
    while True:
        try:
            offset, key, _, _ = next(members)
        except StopIteration as finished:
            offsets.append(finished.value)
            return keys, offsets
        if not keys or key != keys[-1]:
            keys.append(key)
            offsets.append(offset)


# Parsed indexes this process keeps (by sha256, least recently used first), so that a worker
# reads each index once rather than once per range per epoch; bounded by their files' bytes
# (a 30,000-sample index: 0.8 MB of JSON, about 3 MB parsed).
_parsed: collections.OrderedDict[str, tuple[int, schema.ShardIndex]] = collections.OrderedDict()
PARSED_INDEX_BYTES = 16 << 20


def _remember(sha256: str, size: int, index: schema.ShardIndex) -> None:
    _parsed[sha256] = (size, index)
    while len(_parsed) > 1 and sum(size for size, _ in _parsed.values()) > PARSED_INDEX_BYTES:
        _parsed.popitem(last=False)


def load_index(url: str, storage_options: dict | None = None, *, expected: dict | None = None,
               cache_dir: str | None = None, cache_limit: int | None = None, retries: int = 5,
               retry_wait: float = 1.0) -> schema.ShardIndex | None:
    """The index beside shard `url`, or None (with a warning saying why) when there is none
    or it does not match `expected` ({"bytes", "sha256"}: the manifest's record of it). One
    this process read already, by that sha256, is not read again."""
    sha256 = (expected or {}).get("sha256")
    if sha256 in _parsed:
        _parsed.move_to_end(sha256)
        return _parsed[sha256][1]
    location = index_url(url)
    data = None
    if cache_dir is not None and not is_local(url):
        with cache.fetch(cache_dir, location, schema.index_name(shard_basename(url)), expected, storage_options,
                         limit=cache_limit, retries=retries, retry_wait=retry_wait) as path:
            if path is not None:
                with open(path, "rb") as f:
                    data = f.read()
    if data is None:
        data = read_whole(location, storage_options, retries=retries, retry_wait=retry_wait)
        if data is None:
            if expected:
                warn_once(log, "%s: listed in the manifest but missing; reading the shard without it", location)
            return None
        if sha256 is not None and schema.file_record(data)["sha256"] != sha256:
            log.warning("%s: not the index the manifest lists (sha256 differs); reading the shard without it",
                        location)
            return None
    index = decoded(location, data)
    if index is not None and sha256 is not None:
        _remember(sha256, len(data), index)
    return index


def decoded(location: str, data: bytes) -> schema.ShardIndex | None:
    """The index file at `location` whose bytes are `data`, or None (with a warning) when it
    cannot be used."""
    try:
        return schema.decode_index(data)
    except ValueError as error:
        log.warning("%s: unusable index (%s); reading the shard without it", location, error)
        return None


def _write(url: str, data: bytes, out: str | None, storage_options: dict | None) -> str:
    if out is not None:
        target = os.path.join(out, schema.index_name(shard_basename(url)))
    elif is_local(url):
        target = index_url(url).removeprefix("file://")
    else:
        target = index_url(url)
        fs, path = client(target, storage_options)
        try:
            fs.pipe_file(path, data)
        except Exception as error:  # each backend has its own errors for a read-only store
            raise PipelineError(f"cannot write {target} ({type(error).__name__}: {error}); "
                                "use --out DIR and upload the index files beside the shards") from None
        return target
    try:
        schema.write_durably(target, data)
    except OSError as error:
        raise PipelineError(f"cannot write {target}: {error.strerror or error}") from None
    return target


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def main(argv=None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.index", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("urls", nargs="+", metavar="URL",
                        help="shards: paths, brace patterns, globs or fsspec URLs")
    parser.add_argument("--out", help="write the indexes into this folder instead of beside the shards")
    parser.add_argument("--storage-options", type=_json_object, default={}, metavar="JSON",
                        help='fsspec options as one JSON object, e.g. \'{"anon": true}\'')
    parser.add_argument("--retries", type=int, default=5, help="retries of a failing read (default 5)")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    try:
        if args.out is not None:
            os.makedirs(args.out, exist_ok=True)
        urls = expand_urls(args.urls, args.storage_options)
        with tqdm(urls, unit="shard", desc="indexing", leave=False, disable=None) as bar:  # no bar off a terminal
            for url in bar:
                index = build_index(url, args.storage_options, retries=args.retries)
                target = _write(url, schema.encode_index(index), args.out, args.storage_options)
                bar.write(f"{target}: {len(index.keys)} samples")
    except PipelineError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"{parser.prog}: error: {args.out}: {error.strerror or error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
