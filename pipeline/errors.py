"""How the pipeline reports trouble: the one exception type it raises for bad input or
unreadable storage, and warnings said once per process."""

import logging


class PipelineError(RuntimeError):
    """A pattern, URL, shard or option the pipeline cannot use; the message names it."""


_said: set[tuple] = set()


def warn_once(log: logging.Logger, message: str, *args) -> None:
    """log.warning(message, *args), unless this process has said just that already: what is
    true of a shard (no index, a server ignoring Range) is said once, not every epoch."""
    said = (log.name, message, args)
    if said not in _said:
        _said.add(said)
        log.warning(message, *args, stacklevel=2)
