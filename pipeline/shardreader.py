"""Reading shards: a sample range of a shard to samples (consecutive members sharing a key).

With the shard's byte index, exactly the bytes of the range are fetched (pipeline.streams),
each sample is parsed within its own bytes, and damaged tar data costs only the sample it is
in: reading goes on at the next sample's offset. Without an index the shard streams from its
first byte, and damage there loses the rest of the range: every lost sample is still
reported, numbered, since its key cannot be known. Malformed tar data never raises here;
only storage that cannot be read does (PipelineError).
"""

import contextlib
import dataclasses
import io
import logging
from dataclasses import dataclass, field

from pipeline import backgrounds, cache, heartbeat, schema
from pipeline.backgrounds import Backgrounds
from pipeline.clients import is_local
from pipeline.errors import PipelineError, warn_once
from pipeline.index import count_local_samples, decoded, index_url, load_index
from pipeline.sources import (explicit_sizes, manifest_entries, read_manifest, read_manifests, shard_basename,
                              shard_folder)
from pipeline.streams import open_range, read_whole
from pipeline.tarstream import BLOCK, TarFormatError, iter_members

log = logging.getLogger(__name__)

@dataclass
class ShardSample:
    """One sample's raw members (suffix -> bytes); `error` says why it is lost, when it is
    (its key is then "#N", the sample's number in the shard, where no index names it)."""

    key: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class ShardInfo:
    """What a reader knows of a shard before reading it: its sample count, its manifest
    record ({"bytes", "sha256"}, or None), its index's ({"bytes", "sha256"}; None: no
    index, read it front to back) and the backgrounds of its set (pipeline.backgrounds: None
    for a set whose samples carry their own)."""

    url: str
    samples: int
    shard: dict | None
    index: dict | None
    backgrounds: Backgrounds | None = None


def _indexed(url, source, index, start, stop, storage_options, want, retries, retry_wait):
    count = len(index.keys)
    last = min(stop, count)
    if start < last:
        begin, end = index.offsets[start], index.offsets[last]
        with open_range(source, storage_options, start=begin, end=end, retries=retries,
                        retry_wait=retry_wait) as stream:
            for number in range(start, last):
                key, offset = index.keys[number], index.offsets[number]
                sample = ShardSample(key, url)
                # The sample's bytes in one read, parsed in memory: a tenth of the cost of
                # parsing its headers through the stream, and the next sample starts right after.
                size = index.offsets[number + 1] - offset
                heartbeat.reading_sample(number, offset, offset + size)
                data = stream.read(size)
                try:
                    if len(data) != size:
                        raise TarFormatError(f"cut off at byte {offset + len(data)}")
                    for member_offset, member_key, suffix, member in iter_members(io.BytesIO(data), want, offset):
                        if member_key != key:
                            raise TarFormatError(f"member {member_key}.{suffix} at byte {member_offset} "
                                                 f"is not part of sample {key} (index and shard disagree)")
                        if member is not None:
                            sample.members[suffix] = member
                except TarFormatError as error:
                    sample.error = f"damaged tar data: {error}"
                yield sample
    for number in range(max(start, count), stop):
        yield ShardSample(f"#{number}", url, error=f"shard holds {count} samples (by its index), {stop} expected")


def _streamed(url, source, start, stop, storage_options, wanted, own, retries, retry_wait):
    number, key, current = -1, None, None
    end = float("inf") if stop is None else stop

    def want(member_key, suffix):  # is this member's sample in range, and one we use?
        return start <= number + (member_key != key) < end and suffix in wanted

    with open_range(source, storage_options, retries=retries, retry_wait=retry_wait) as stream:
        try:
            for _, member_key, suffix, data in iter_members(stream, want):
                if member_key != key:
                    if current is not None:
                        yield current
                        current = None
                    number, key = number + 1, member_key
                    if number >= end:
                        return
                    if number >= start:
                        current = ShardSample(key, url)
                if current is not None and data is not None:
                    current.members[suffix] = data
        except TarFormatError as error:
            damage = f"damaged tar data: {error}"
            if current is not None:
                if not set(own) <= set(current.members):
                    current.error = damage  # the damage is inside this sample
                yield current
            rest = "(the shard has no index to resume from)"
            first = max(number + 1, start)
            if stop is None:
                yield ShardSample(f"#{first}", url, error=f"{damage}; the rest of the shard is lost {rest}")
            for lost in range(first, stop or 0):
                yield ShardSample(f"#{lost}", url, error=f"{damage}; lost with the rest of the shard {rest}")
            return
    if current is not None:
        yield current
    for lost in range(max(number + 1, start), stop or 0):
        yield ShardSample(f"#{lost}", url, error=f"shard holds {number + 1} samples, {stop} expected")


def read_samples(url: str, start: int, stop: int | None = None, storage_options: dict | None = None, *,
                 wanted=schema.IMAGE_MEMBERS, retries: int = 5, retry_wait: float = 1.0,
                 info: ShardInfo | None = None, cache_dir: str | None = None, cache_limit: int | None = None,
                 backgrounds: Backgrounds | None = None):
    """Yield samples number start..stop-1 of a shard (stop None: to its end), one ShardSample
    each, reading only their bytes where the shard has an index (see the module docstring).

    Only members in `wanted` are kept. A sample the data cannot give (damaged or cut-off tar
    data, a shard with fewer samples than `stop`) is yielded with `error` set, one per lost
    sample, so the caller can count and report each. A sample without bg.jpg takes it from the
    backgrounds of its shard set (pipeline.backgrounds), or is yielded with `error` naming the
    background. `info` (from prepare_shards) is what the main process learnt of the shard;
    without it, the index beside the shard is read here, and the backgrounds too unless given
    (`backgrounds`, from backgrounds_beside).
    With `cache_dir`, a remote shard is read from a verified local copy (pipeline.cache),
    held until the last sample is read (or the generator closed), under `cache_limit` bytes.
    """
    reading = dict(cache_dir=cache_dir, cache_limit=cache_limit, retries=retries, retry_wait=retry_wait)
    found = None
    if schema.BG in wanted:
        found = info.backgrounds if info is not None else backgrounds or backgrounds_beside(url, storage_options,
                                                                                             **reading)
    # A compact sample's own members: what must be there for it to be whole.
    own = wanted if found is None else tuple(name for name in wanted if name != schema.BG)
    for sample in _own_samples(url, start, stop, storage_options, wanted, own, info, **reading):
        if found is not None and sample.error is None and schema.BG not in sample.members:
            found.fill(sample)
        yield sample


def backgrounds_beside(url: str, storage_options: dict | None = None, *, retries: int = 5, retry_wait: float = 1.0,
                       **reading) -> Backgrounds | None:
    """The backgrounds of a shard read without prepare_shards, found as it finds them: None for a
    self-contained set; PipelineError naming the file when a compact set's is missing
    (reading: cache_dir, cache_limit)."""
    reading.update(retries=retries, retry_wait=retry_wait)
    manifest = read_manifest(url, storage_options, retries=retries, retry_wait=retry_wait)
    described = manifest_entries([url], {shard_folder(url): manifest})[0] is not None
    return backgrounds.beside(shard_folder(url), manifest, described, storage_options, **reading)


def _own_samples(url, start, stop, storage_options, wanted, own, info, *, cache_dir, cache_limit, retries,
                 retry_wait):
    """read_samples without the backgrounds: the members `wanted` the shard holds, a sample
    cut by damage being whole when it has those in `own`."""
    index = None
    if info is None or info.index is not None:
        index = load_index(url, storage_options, expected=info.index if info else None, cache_dir=cache_dir,
                           cache_limit=cache_limit, retries=retries, retry_wait=retry_wait)
    copy = contextlib.nullcontext()
    if cache_dir is not None and not is_local(url):
        copy = cache.fetch(cache_dir, url, shard_basename(url), info.shard if info else None, storage_options,
                           limit=cache_limit, retries=retries, retry_wait=retry_wait)
    with copy as source:
        source = source or url
        if index is None:
            yield from _streamed(url, source, start, stop, storage_options, wanted, own, retries, retry_wait)
        else:
            yield from _indexed(url, source, index, start, len(index.keys) if stop is None else stop,
                                storage_options, lambda key, suffix: suffix in wanted, retries, retry_wait)


def _discover(url: str, storage_options, retries: int, retry_wait: float) -> tuple[dict | None, schema.ShardIndex | None]:
    """(its record, for the workers to check it against; the index itself) of the index beside
    a shard the manifest does not describe, or (None, None) with one warning per process naming
    the shard."""
    location = index_url(url)
    data = read_whole(location, storage_options, retries=retries, retry_wait=retry_wait)
    if data is None:
        warn_once(log, "%s has no index beside it: every worker reading part of it streams it from its "
                  "first byte (python -m pipeline.index makes one)", url)
        return None, None
    return schema.file_record(data), decoded(location, data)


def prepare_shards(urls: list[str], storage_options: dict | None = None, explicit=None, *,
                   retries: int = 5, retry_wait: float = 1.0, cache_dir: str | None = None,
                   cache_limit: int | None = None) -> list[ShardInfo]:
    """What the workers need to know of each shard, found out once, in the main process.

    Sample counts come from `explicit` (list, or name -> count), else the manifest beside the
    shards, else the shard's index, else (local files) a header scan. Shards the manifest does
    not describe are looked up for an index beside them (one warning for each that has none).
    Each compact shard set's backgrounds are loaded (pipeline.backgrounds: through cache_dir,
    under cache_limit), and for shards no manifest describes, those beside them if any.
    Then the first shard is probed (its first 512 bytes, or its cached copy) and cache_dir
    checked, so a wrong URL, missing credentials, an unwritable cache or a compact set without
    its backgrounds fail here, naming it.
    """
    manifests = read_manifests(urls, storage_options, retries=retries, retry_wait=retry_wait)
    entries = manifest_entries(urls, manifests)
    counts = explicit_sizes(urls, explicit) if explicit is not None else [None] * len(urls)
    shards = []
    for url, entry, count in zip(urls, entries, counts):
        index, found = (entry or {}).get("index"), None
        if index is None:
            index, found = _discover(url, storage_options, retries, retry_wait)
        if count is None and entry is not None:
            count = int(entry["samples"])
        if count is None and found is not None:
            count = len(found.keys)
        if count is None and is_local(url):
            count = count_local_samples(url)
        if count is None:
            raise PipelineError(f"{url}: no sample count for it in the {schema.MANIFEST} beside it nor an "
                                "index; put the converter's manifest beside the shards or pass shard_sizes")
        shards.append(ShardInfo(url=url, samples=count, shard=entry, index=index))
    if cache_dir is not None:
        cache.check_cache_dir(cache_dir)
    by_folder = {}
    for folder, manifest in manifests.items():
        described = all(entry is not None for url, entry in zip(urls, entries) if shard_folder(url) == folder)
        by_folder[folder] = backgrounds.beside(folder, manifest, described, storage_options, cache_dir=cache_dir,
                                               cache_limit=cache_limit, retries=retries, retry_wait=retry_wait)
    shards = [dataclasses.replace(shard, backgrounds=by_folder[shard_folder(shard.url)]) for shard in shards]
    _probe(shards[0], storage_options, retries, retry_wait, cache_dir)
    return shards


def _probe(shard: ShardInfo, storage_options, retries: int, retry_wait: float, cache_dir: str | None) -> None:
    copy = contextlib.nullcontext()
    if cache_dir is not None and not is_local(shard.url):
        copy = cache.lookup(cache_dir, shard_basename(shard.url), shard.shard)
    with copy as source, open_range(source or shard.url, storage_options, end=BLOCK, retries=retries,
                                    retry_wait=retry_wait) as probe:
        if len(probe.read(BLOCK)) < BLOCK:
            raise PipelineError(f"{shard.url}: too short to be a tar shard")
