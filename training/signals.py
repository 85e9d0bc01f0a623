"""SIGTERM and SIGINT (preemption, Ctrl-C) as a request to stop after the current step.

While a StopRequest is active, the first signal only records itself. train.py looks at it
once per step, agreed over all ranks so that every rank stops after the same step, writes
last.pt, ends its DataLoader workers and exits with status 128 + the signal number (143 for
SIGTERM, 130 for SIGINT: the shell's and SLURM's "ended by this signal"). A second signal
exits at once, without saving, with the same status.

One signal often arrives more than once: a terminal's Ctrl-C and SLURM's scancel reach every
process of the job, and torchrun forwards what it receives to its ranks as well. So a repeat
within DUPLICATE_WINDOW seconds of the first counts as the same request.
"""

import multiprocessing
import os
import signal
import time

SIGNALS = (signal.SIGTERM, signal.SIGINT)
DUPLICATE_WINDOW = 2.0  # seconds


def exit_status(signum: int) -> int:
    return 128 + signum


def name(signum: int) -> str:
    return signal.Signals(signum).name


def _say(line: str) -> None:
    # os.write, not print: a handler may interrupt the main thread inside a write to stderr
    # (tqdm draws there), and the buffered writer refuses to be re-entered. The newline first
    # moves off a half-drawn progress bar.
    os.write(2, f"\n{line}\n".encode())


class StopRequest:
    """Context manager: while active, SIGTERM and SIGINT set `signum` instead of ending the
    process (see the module docstring); the previous handlers come back on exit."""

    def __init__(self, announce: bool = True):
        self.signum = 0
        self.announce = announce
        self._first_at = 0.0
        self._pid = os.getpid()
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame) -> None:
        if os.getpid() != self._pid:
            return  # a DataLoader worker between its fork and its own SIG_IGN: not its call
        if not self.signum:
            self.signum, self._first_at = signum, time.monotonic()
            if self.announce:
                _say(f"train.py: {name(signum)}: stopping after the current step to save last.pt "
                     f"(a second signal exits at once, without saving)")
        elif time.monotonic() - self._first_at >= DUPLICATE_WINDOW:
            _say(f"train.py: {name(signum)} again: exiting now without saving")
            stop_workers()
            os._exit(exit_status(signum))


def stop_workers() -> None:
    """End this process's DataLoader workers now and reap them.

    They ignore SIGINT and SIGTERM (pipeline.loader), so this takes SIGKILL; they hold nothing a
    checkpoint needs. The DataLoader's SIGCHLD handler would report the kill as a crashed worker
    (an exception in the main thread), so SIGCHLD stays at its default until they are reaped.
    """
    children = multiprocessing.active_children()
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for child in children:
            child.kill()
        for child in children:
            child.join()
    finally:
        if previous is not None:
            signal.signal(signal.SIGCHLD, previous)
