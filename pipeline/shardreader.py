"""Reading shards: a tar stream to samples (consecutive members sharing a key) in a sample range.

The tar headers are parsed here rather than by `tarfile`: its stream mode costs several
times the JPEG decode per sample in Python overhead, while the shards need only ustar
names and sizes (plus GNU long names and pax paths, for tars written by other tools).
"""

from dataclasses import dataclass, field

from pipeline import schema
from pipeline.sources import open_shard

BLOCK = 512


class TarFormatError(ValueError):
    """The stream is not a well-formed tar (bad header checksum, or cut off)."""


@dataclass
class ShardSample:
    """One sample's raw members (suffix -> bytes); `error` is set when the shard broke off."""

    key: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None


def _read_exactly(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise TarFormatError(f"cut off inside a member ({len(data)} of {size} bytes)")
    return data


def _size(field_bytes: bytes) -> int:
    if field_bytes[0] & 0x80:  # GNU base-256 for members of 8 GiB and more
        return int.from_bytes(field_bytes[1:], "big")
    digits = field_bytes.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").splitlines():
        _, _, entry = record.partition(" ")
        key, _, value = entry.partition("=")
        if key == "path":
            return value
    return None


def iter_members(stream, want):
    """Yield (key, suffix, data) for the regular files of a tar stream; data is None unless
    want(key, suffix). Unwanted data is read past, never kept. Raises TarFormatError on a
    damaged stream.
    """
    long_name = None
    while True:
        header = stream.read(BLOCK)
        if not header.strip(b"\0"):
            return  # end-of-archive block (or a clean end of stream)
        if len(header) != BLOCK:
            raise TarFormatError("cut off inside a header")
        if _size(header[148:156]) != sum(header) - sum(header[148:156]) + 8 * 32:
            raise TarFormatError("bad header checksum")
        size, kind = _size(header[124:136]), header[156:157]
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"L", b"x"):  # the next member's full name (GNU long name, pax path)
            data = _read_exactly(stream, padded)[:size]
            long_name = data.rstrip(b"\0").decode() if kind == b"L" else _pax_path(data) or long_name
            continue
        name = long_name or header[:100].split(b"\0", 1)[0].decode()
        if not long_name and header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
        long_name = None
        if kind not in (b"0", b"\0", b"7"):  # directories, links and the like hold no sample data
            _read_exactly(stream, padded)
            continue
        key, suffix = schema.split_member(name)
        data = _read_exactly(stream, size) if want(key, suffix) else None
        _read_exactly(stream, padded - size if data is not None else padded)  # padding, or all of it
        yield key, suffix, data


def read_samples(url: str, start: int, stop: int | None = None, storage_options: dict | None = None, *,
                 wanted=schema.IMAGE_MEMBERS, retries: int = 5, retry_wait: float = 1.0):
    """Yield samples number start..stop-1 of a shard (stop None: to its end), reading only as
    far as needed.

    Members of samples before `start` are streamed past without being kept, members not in
    `wanted` are skipped. A shard that breaks off marks the sample it broke in with `error`
    (or, between samples, ends with a ShardSample carrying only the `error`), and one that ends
    cleanly before `stop` ends with such an error ShardSample too, so the caller can report it
    and go on.
    """
    index, key, current, broken, short = -1, None, None, None, None
    end = float("inf") if stop is None else stop

    def want(member_key, suffix):  # is this member's sample in range, and one we use?
        member_index = index + (member_key != key)
        return start <= member_index < end and suffix in wanted

    with open_shard(url, storage_options, retries=retries, retry_wait=retry_wait) as stream:
        try:
            for member_key, suffix, data in iter_members(stream, want):
                if member_key != key:
                    if current is not None:
                        yield current
                        current = None
                    index, key = index + 1, member_key
                    if index >= end:
                        break
                    if index >= start:
                        current = ShardSample(key, url)
                if current is not None and data is not None:
                    current.members[suffix] = data
            else:
                if stop is not None and index + 1 < stop:
                    short = f"shard holds {index + 1} samples, {stop} expected"
        except TarFormatError as error:
            broken = f"shard ends early: {error}"
    if current is not None:
        current.error = broken  # the sample it broke off in, if it broke
        yield current
    elif broken is not None:
        yield ShardSample(key or "", url, error=broken)
    if short is not None:
        yield ShardSample(key or "", url, error=short)
