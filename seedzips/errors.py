"""The write side's one exception type."""


class ConvertError(Exception):
    """A user-facing, one-line problem with the converter's input or output (no traceback wanted)."""
