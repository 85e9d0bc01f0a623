"""Deterministic POSIX (ustar) tar blocks, built without tarfile's per-member overhead.

Every header is tarfile's own ustar header for a regular file with mtime 0, uid/gid 0, empty
owner names and mode 0o644; only the name, size and checksum differ. So the same members give
the same bytes on every run and machine, and GNU tar and webdataset read the result.
"""

import tarfile

BLOCK = 512
RECORD = tarfile.RECORDSIZE  # archives end padded to a whole record, as tar and tarfile do
_NAME, _SIZE, _CHKSUM = slice(0, 100), slice(124, 136), slice(148, 156)


def _template() -> bytes:
    info = tarfile.TarInfo("")
    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
    block[_SIZE] = bytes(12)
    block[_CHKSUM] = b" " * 8  # the checksum is computed with its own field as spaces
    return bytes(block)


_TEMPLATE = _template()
_TEMPLATE_SUM = sum(_TEMPLATE)
_ZEROS = bytes(RECORD)


def header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file `name` holding `size` bytes."""
    encoded = name.encode()
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name}")
    size_field = b"%011o\0" % size
    block = bytearray(_TEMPLATE)
    block[: len(encoded)] = encoded
    block[_SIZE] = size_field
    block[_CHKSUM] = b"%06o\0 " % (_TEMPLATE_SUM + sum(encoded) + sum(size_field))
    return bytes(block)


def member_span(size: int) -> int:
    """Bytes one member of `size` bytes takes in the archive: header plus padded data."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def append_member(parts: list, name: str, data: bytes) -> None:
    """Append the header, data and padding of one member to `parts` (to be joined)."""
    parts += (header(name, len(data)), data, _ZEROS[: -len(data) % BLOCK])


def archive_size(members_bytes: int) -> int:
    """Total archive size: members, two zero blocks, padded to a whole record."""
    return -(-(members_bytes + 2 * BLOCK) // RECORD) * RECORD
