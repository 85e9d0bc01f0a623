"""Tar headers parsed by hand: a byte stream to (offset, key, suffix, data) per regular file.

`tarfile`'s stream mode costs several times the JPEG decode per sample in Python overhead,
while the shards need only ustar names and sizes (plus GNU long names and pax paths, for tars
written by other tools). Every way a header can be malformed (bad checksum, non-octal
fields, undecodable names, a cut-off stream, an absurd size) is one TarFormatError naming
the byte offset, so the reader can count what it cost and go on.
"""

from pipeline import schema

BLOCK = 512
_SKIP_CHUNK = 1 << 20
# No JPEG or JSON member of a sample comes near this; a larger size is a damaged header that
# happened to pass the checksum, and reading it would exhaust memory before the stream ends.
MAX_MEMBER = 1 << 30


class TarFormatError(ValueError):
    """The stream is not a well-formed tar at some byte (its message says where and why)."""


def read_exactly(stream, size: int, offset: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise TarFormatError(f"cut off at byte {offset + len(data)}, inside a member ({len(data)} of {size} bytes)")
    return data


def _skip(stream, size: int, offset: int) -> None:
    if stream.seekable():  # a local file: a header scan need not read the data
        stream.seek(size, 1)
        return
    while size:
        read_exactly(stream, min(size, _SKIP_CHUNK), offset)
        offset += min(size, _SKIP_CHUNK)
        size -= min(size, _SKIP_CHUNK)


def _number(field_bytes: bytes, name: str) -> int:
    if field_bytes[0] & 0x80:  # GNU base-256 for members of 8 GiB and more
        return int.from_bytes(field_bytes[1:], "big")
    digits = field_bytes.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise ValueError(f"{name} field {digits!r} is not octal") from None


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").splitlines():
        _, _, entry = record.partition(" ")
        key, _, value = entry.partition("=")
        if key == "path":
            return value
    return None


def _parse(header: bytes, named: bool) -> tuple[int, bytes, str | None]:
    """(size, type flag, ustar name unless `named` already) of a header block; ValueError
    (UnicodeDecodeError for a name that is not UTF-8) when it is not a valid one."""
    if _number(header[148:156], "checksum") != sum(header) - sum(header[148:156]) + 8 * 32:
        raise ValueError("bad header checksum")
    size = _number(header[124:136], "size")
    if not 0 <= size <= MAX_MEMBER:
        raise ValueError(f"member size {size} out of range")
    if named:  # the ustar field holds a truncated copy, perhaps cut inside a character
        return size, header[156:157], None
    name = header[:100].split(b"\0", 1)[0].decode()
    if header[257:262] == b"ustar" and header[345] != 0:
        name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
    return size, header[156:157], name


def iter_members(stream, want, offset: int = 0):
    """Yield (offset, key, suffix, data) for the regular files of a tar stream that starts at
    byte `offset` of its shard; offset is where the member's first header block starts (its
    long-name header, if any); data is None unless want(key, suffix), unwanted data is read
    past, never kept. Ends at an end-of-archive block or a clean end of stream; raises
    TarFormatError on damaged data.
    """
    long_name, first = None, None
    while True:
        header = stream.read(BLOCK)
        if not header.strip(b"\0"):
            if header and len(header) != BLOCK:
                raise TarFormatError(f"cut off at byte {offset + len(header)}, inside a header")
            return offset  # end-of-archive block (or a clean end of stream): where it is
        if len(header) != BLOCK:
            raise TarFormatError(f"cut off at byte {offset + len(header)}, inside a header")
        start = offset if first is None else first
        try:
            size, kind, name = _parse(header, long_name is not None)
        except ValueError as error:
            raise TarFormatError(f"bad tar header at byte {offset}: {error}") from None
        offset += BLOCK
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"L", b"x"):  # the next member's full name (GNU long name, pax path)
            data = read_exactly(stream, padded, offset)[:size]
            try:
                long_name = data.rstrip(b"\0").decode() if kind == b"L" else _pax_path(data) or long_name
            except UnicodeDecodeError:
                raise TarFormatError(f"bad tar header at byte {offset - BLOCK}: undecodable long name") from None
            offset, first = offset + padded, start
            continue
        name, long_name, first = long_name or name, None, None
        if kind not in (b"0", b"\0", b"7"):  # directories, links and the like hold no sample data
            _skip(stream, padded, offset)
            offset += padded
            continue
        key, suffix = schema.split_member(name)
        if want(key, suffix):
            data = read_exactly(stream, size, offset)
            _skip(stream, padded - size, offset + size)
        else:
            data = None
            _skip(stream, padded, offset)
        offset += padded
        yield start, key, suffix, data
