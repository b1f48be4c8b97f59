"""How vitcli stops on SIGINT / SIGTERM, outside the training loop's own save-then-stop handler.

The first signal raises `Stopped` (a KeyboardInterrupt), which the CLI turns into one line and exit code
130 / 143. A second signal ends the process at once with os._exit: nothing half-finished (thread-pool
shutdown, worker clean-up, a finaliser) can be interrupted again and print "Exception ignored" tracebacks.
Files vitcli writes are atomic, so stopping at any moment leaves each of them whole.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Stopped(KeyboardInterrupt):
    """The first SIGINT / SIGTERM; `code` is the exit code (130 / 143)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.code, self.name = EXIT_CODES[signum], signal.Signals(signum).name
        self.detail = ""  # where it stopped, added by the code it interrupted


def exit_now(signum: int) -> None:
    """The second signal: one line, then exit without running any more Python code."""
    try:
        os.write(2, f"error: stopped at once by a second {signal.Signals(signum).name}\n".encode())
    finally:
        os._exit(EXIT_CODES[signum])


_seen = {"count": 0}


def first_signal() -> bool:
    """Count a signal; True for the first one of this command (the training loop's handler shares the count)."""
    _seen["count"] += 1
    return _seen["count"] == 1


def _handler(signum, frame) -> None:
    if not first_signal():
        exit_now(signum)
    raise Stopped(signum)


@contextlib.contextmanager
def stop_handlers():
    """Install the first-raise / second-exit handlers for the duration of a command (main thread only)."""
    old = {}
    _seen["count"] = 0
    for sig in EXIT_CODES:
        try:
            old[sig] = signal.signal(sig, _handler)
        except ValueError:  # not the main thread (some test runners): leave signals alone
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def ignore_in_worker(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: a signal to the whole process group must not kill a worker mid-batch
    ("DataLoader worker killed"); the main process stops cleanly and shuts its workers down."""
    for sig in EXIT_CODES:
        signal.signal(sig, signal.SIG_IGN)
    sys.stderr.flush()
