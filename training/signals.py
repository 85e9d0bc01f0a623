"""SIGTERM and SIGINT (preemption, Ctrl-C) as a request to stop after the current step.

While a StopRequest is active, the first signal only records itself. train.py looks at it
once per step, agreed over all ranks so that every rank stops after the same step, writes
last.pt, ends its DataLoader workers and exits with status 128 + the signal number (143 for
SIGTERM, 130 for SIGINT: the shell's and SLURM's "ended by this signal"). A second signal
exits at once, without saving, with the same status.

One signal often arrives more than once: a terminal's Ctrl-C and SLURM's scancel reach every
process of the job, and torchrun forwards what it receives to its ranks as well. So a repeat
within DUPLICATE_WINDOW seconds of the first counts as the same request.

A step that waits for data (workers stalled, or stopped) is not waited for: the request ends
the loader's wait too (pipeline.passes.stop_waiting_when, checked every second), and train.py
saves last.pt at the last finished step.
"""

import multiprocessing
import os
import signal
import socket
import threading
import time

from pipeline.passes import stop_waiting_when

SIGNALS = (signal.SIGTERM, signal.SIGINT)
DUPLICATE_WINDOW = 2.0  # seconds


def exit_status(signum: int) -> int:
    return 128 + signum


def name(signum: int) -> str:
    return signal.Signals(signum).name


def _say(line: str) -> None:
    # os.write, not print: the main thread may be inside a write to stderr (tqdm draws there),
    # and the buffered writer refuses to be re-entered. The newline first moves off a
    # half-drawn progress bar.
    os.write(2, f"\n{line}\n".encode())


def _ignore(_signum, _frame) -> None:
    """The Python-level handler: the work is the watcher thread's (see StopRequest)."""


class StopRequest:
    """Context manager: while active, SIGTERM and SIGINT set `signum` instead of ending the
    process (see the module docstring); the previous handlers come back on exit.

    The signals are watched by a thread of their own, through the interpreter's wakeup fd:
    a Python-level handler runs only when the main thread gets back to Python, which it may
    never do while it waits inside C++ (a rendezvous, a collective with a dead peer), and a
    second signal must end the process even then.
    """

    def __init__(self, announce: bool = True):
        self.signum = 0
        self.announce = announce
        self._first_at = 0.0

    def __enter__(self) -> "StopRequest":
        self._reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)  # the interpreter's signal handler must never block on it
        self._previous = {sig: signal.signal(sig, _ignore) for sig in SIGNALS}
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="stop-signals", daemon=True)
        self._watcher.start()
        self._previous_check = stop_waiting_when(lambda: self.signum != 0)
        return self

    def __exit__(self, *exc_info) -> None:
        stop_waiting_when(self._previous_check)
        signal.set_wakeup_fd(self._previous_fd)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        # The watcher reads the end of the stream and returns. Shut down, not only closed: the
        # loader's workers, forked from this process, hold copies of the socket.
        self._writer.shutdown(socket.SHUT_RDWR)
        self._writer.close()
        self._watcher.join()
        self._reader.close()

    def _watch(self) -> None:
        # Every signal with a Python handler is written here (the DataLoader's SIGCHLD too).
        while data := self._reader.recv(64):
            for signum in data:
                if signum in SIGNALS:
                    self._handle(signum)

    def _handle(self, signum: int) -> None:
        if not self.signum:
            self.signum, self._first_at = signum, time.monotonic()
            if self.announce:
                _say(f"train.py: {name(signum)}: stopping after the current step to save last.pt "
                     f"(a second signal exits at once, without saving)")
        elif time.monotonic() - self._first_at >= DUPLICATE_WINDOW:
            _say(f"train.py: {name(signum)} again: exiting now without saving")
            # No reaping here: waiting would let the main thread run the DataLoader's SIGCHLD
            # handler, which reports each killed worker with a traceback.
            for child in multiprocessing.active_children():
                child.kill()
            os._exit(exit_status(signum))


def stop_workers() -> None:
    """End this process's DataLoader workers now and reap them (from the main thread).

    They ignore SIGINT and SIGTERM while their pool is open (pipeline.workers), so this takes
    SIGKILL; they hold nothing a checkpoint needs. The DataLoader's SIGCHLD handler would report the kill as a crashed worker
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
