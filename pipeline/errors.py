"""How the pipeline reports trouble: the one exception type it raises for bad input,
unreadable storage or workers it cannot keep alive, the one for a wait given up on a stop
request, and warnings said once per process."""

import logging


class PipelineError(RuntimeError):
    """A pattern, URL, shard or option the pipeline cannot use, or workers that keep dying or
    stall; the message names it."""


class WaitStopped(Exception):
    """A pass gave up waiting for a batch: the process was asked to stop
    (pipeline.passes.stop_waiting_when)."""


_said: set[tuple] = set()


def warn_once(log: logging.Logger, message: str, *args) -> None:
    """log.warning(message, *args), unless this process has said just that already: what is
    true of a shard (no index, a server ignoring Range) is said once, not every epoch."""
    said = (log.name, message, args)
    if said not in _said:
        _said.add(said)
        log.warning(message, *args, stacklevel=2)
