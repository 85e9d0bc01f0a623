"""The backgrounds of a compact shard set (pipeline.schema.COMPACT): its backgrounds.tar, read
whole, checked and parsed once per process that asks, and given to each sample that lacks one.

A compact sample carries no `bg.jpg`: its key names its background (schema.background_key_of)
in the backgrounds.tar beside its shard. prepare_shards loads each set's file once in the main
process of a rank and hands it to the workers inside the ShardInfo (forked: no copy per worker,
and a restarted worker has it too), so the backgrounds are fetched once per rank, never per
worker or per range.

Damage costs only the backgrounds it is in. Each member is parsed within its own bytes (the
file's index gives them), and when the file is not the one the manifest lists (or no manifest
lists one) every background is decoded once, so that a damaged JPEG is found here and each
sample needing it is reported as "background 11_bg: ..." rather than as a damaged sample.
"""

import contextlib
import io
import logging
from dataclasses import dataclass, field

import simplejpeg

from pipeline import cache, schema
from pipeline.clients import is_local
from pipeline.errors import PipelineError
from pipeline.index import load_index
from pipeline.streams import read_whole
from pipeline.tarstream import TarFormatError, iter_members

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backgrounds:
    """A set's backgrounds by key (JPEG bytes), those that cannot be used with the reason, and
    why any other is absent (`lost`: damage that hid the rest of an unindexed file)."""

    url: str
    record: dict | None  # the manifest's {"bytes", "sha256", "index"}, or None
    images: dict[str, bytes] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)
    lost: str | None = None

    def fill(self, sample) -> None:
        """Give `sample` (a ShardSample without bg.jpg) its background, or its error."""
        try:
            key = schema.background_key_of(sample.key)
        except ValueError as error:
            sample.error = f"no background: {error}"
            return
        if key in self.images:
            sample.members[schema.BG] = self.images[key]
        elif key in self.damaged:
            sample.error = f"background {key}: {self.damaged[key]}"
        else:
            sample.error = f"background {key}: not in {self.url}" + (f" ({self.lost})" if self.lost else "")


def backgrounds_url(folder: str) -> str:
    return f"{folder}/{schema.BACKGROUNDS}"


def record_of(manifest: dict | None, folder: str) -> tuple[bool, dict | None]:
    """(whether the manifest says the set is compact, its backgrounds record) for a folder's
    manifest; PipelineError when it says compact but lists no backgrounds."""
    if not manifest:
        return False, None
    record = manifest.get("backgrounds")
    compact = record is not None or manifest.get("options", {}).get("format") == schema.COMPACT
    if compact and not (isinstance(record, dict) and "bytes" in record and "sha256" in record):
        raise PipelineError(f"{folder}/{schema.MANIFEST}: a compact shard set whose manifest gives no "
                            f"size and sha256 of its {schema.BACKGROUNDS}")
    return compact, record


def load(folder: str, record: dict | None, storage_options: dict | None = None, *, required: bool,
         cache_dir: str | None = None, cache_limit: int | None = None, retries: int = 5,
         retry_wait: float = 1.0) -> Backgrounds | None:
    """The backgrounds.tar in `folder`, described by the manifest's `record` (or None), parsed;
    None when it is not there and not `required`. PipelineError (one line naming the URL) when
    a required one is missing or cannot be read."""
    url = backgrounds_url(folder)
    data = _read(url, record, storage_options, cache_dir, cache_limit, retries, retry_wait)
    if data is None:
        if required:
            raise PipelineError(f"{url}: missing: the manifest beside the shards lists it as the backgrounds "
                                "of their compact samples (copy it beside them, or convert with --self-contained)")
        return None
    exact = record is not None and schema.file_record(data) == {k: record[k] for k in ("bytes", "sha256")}
    if record is not None and not exact:
        log.warning("%s: not the file the manifest lists (%d bytes, sha256 %s...); each background is checked "
                    "and the samples of those that are damaged are skipped", url, len(data),
                    schema.file_record(data)["sha256"][:12])
    index = load_index(url, storage_options, expected=(record or {}).get("index"), cache_dir=cache_dir,
                       cache_limit=cache_limit, retries=retries, retry_wait=retry_wait)
    if index is not None and index.shard_bytes != len(data):
        log.warning("%s: its index is of a file of %d bytes, not %d; parsing the file front to back", url,
                    index.shard_bytes, len(data))
        index = None
    backgrounds = _parsed(url, record, data, index)
    if not exact:
        _check_images(backgrounds)
    return backgrounds


def _read(url, record, storage_options, cache_dir, cache_limit, retries, retry_wait) -> bytes | None:
    copy = contextlib.nullcontext()
    if cache_dir is not None and record is not None and not is_local(url):
        copy = cache.fetch(cache_dir, url, schema.BACKGROUNDS, record, storage_options, limit=cache_limit,
                           retries=retries, retry_wait=retry_wait)
    try:
        with copy as path:
            if path is not None:
                with open(path, "rb") as f:
                    return f.read()
    except PipelineError as error:  # the download of a missing file: say so as for a direct read
        if not isinstance(error.__cause__, FileNotFoundError):
            raise
        return None
    return read_whole(url, storage_options, retries=retries, retry_wait=retry_wait)


def _members(data: bytes, offset: int = 0):
    """(key, suffix, bytes) of each member of tar bytes that start at byte `offset` of the file."""
    for _, key, suffix, member in iter_members(io.BytesIO(data), lambda key, suffix: True, offset):
        yield key, suffix, member


def _parsed(url: str, record: dict | None, data: bytes, index) -> Backgrounds:
    backgrounds = Backgrounds(url, record)
    if index is None:
        try:
            for key, suffix, member in _members(data):
                if suffix == schema.BG:
                    backgrounds.images[key] = member
        except TarFormatError as error:
            return Backgrounds(url, record, backgrounds.images,
                               lost=f"damaged tar data: {error}; the rest of the file is lost (it has no index)")
        return backgrounds
    for number, key in enumerate(index.keys):
        start, end = index.offsets[number], index.offsets[number + 1]
        try:
            for member_key, suffix, member in _members(data[start:end], start):
                if member_key != key:
                    raise TarFormatError(f"member {member_key}.{suffix} is not part of {key} "
                                         "(index and file disagree)")
                if suffix == schema.BG:
                    backgrounds.images[key] = member
            if key not in backgrounds.images:
                backgrounds.damaged[key] = f"no member {key}.{schema.BG} in {url}"
        except TarFormatError as error:
            backgrounds.images.pop(key, None)
            backgrounds.damaged[key] = f"damaged tar data in {url}: {error}"
    return backgrounds


def _check_images(backgrounds: Backgrounds) -> None:
    """Move the backgrounds that do not decode (strictly: libjpeg's warnings too) to `damaged`."""
    for key, image in list(backgrounds.images.items()):
        try:
            simplejpeg.decode_jpeg(image, "RGB")
        except ValueError as error:
            del backgrounds.images[key]
            backgrounds.damaged[key] = f"does not decode ({str(error).splitlines()[0]}) in {backgrounds.url}"


def beside(folder: str, manifest: dict | None, described: bool, storage_options: dict | None = None,
           **reading) -> Backgrounds | None:
    """The backgrounds for the shards in `folder`, by what its `manifest` says (None: it has
    none), `described`: whether it lists every shard read there. A compact set's must be
    there; for shards no manifest describes, one found there is used (one probe per folder);
    a self-contained set has none (reading: load's keyword arguments)."""
    compact, record = record_of(manifest, folder)
    if described and not compact:
        return None
    return load(folder, record, storage_options, required=compact, **reading)
