"""Real faults for the tests to cause: a disk that fills up, bytes damaged in place."""

import resource
import signal


def file_size_limit(limit: int):
    """A subprocess preexec_fn: files of the child may not grow past `limit` bytes, so a write
    beyond it fails with EFBIG as it would with ENOSPC on a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def overwrite(path, offset: int, data: bytes) -> None:
    """Damage real bytes of a file in place (its size, and a tar's structure, left as they were)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
