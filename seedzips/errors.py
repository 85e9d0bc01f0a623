"""The write side's one exception type, and how its commands report it."""

import sys


class ConvertError(Exception):
    """A user-facing, one-line problem with the converter's input or output (no traceback wanted)."""


def run_command(work, *, error_status: int) -> int:
    """A write-side command's exit status: 0 once `work()` is done; a ConvertError is its one
    `error:` line and `error_status`; Ctrl-C says how to go on (every write is resumable), 130."""
    try:
        work()
    except ConvertError as error:
        print(f"error: {error}", file=sys.stderr)
        return error_status
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
