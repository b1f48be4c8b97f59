"""The one rich Console (stderr for progress and messages, stdout for results), progress bars, tables.

User-supplied text (paths, class names, values) goes through `esc`: rich markup in it prints literally and
control characters (ESC/OSC sequences, newlines, bidi overrides) print as visible escapes, so a file or class
name can neither drive the terminal nor break a line or a table.
On a terminal progress is a live rich bar; anywhere else (a pipe, nohup, CI, a cluster job's log) it is
plain lines every `VITCLI_PROGRESS_SECONDS` (default 10) with elapsed time and ETA.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.markup import escape as _markup_escape

# C0 and C1 controls, DEL, line/paragraph separators and the bidi embedding/override/isolate characters
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def visible(text: object) -> str:
    """Control characters as escapes: 'a\x1b[31mb' -> 'a\\x1b[31mb', a newline -> '\\n'."""
    return CONTROL.sub(lambda m: _NAMED.get(m[0]) or (f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100
                                                       else f"\\u{ord(m[0]):04x}"), str(text))


def esc(text: object) -> str:
    """User text for rich: markup printed literally, control characters escaped."""
    return _markup_escape(visible(text))

console = Console(stderr=True, highlight=False, soft_wrap=True)  # progress, warnings, summaries
out = Console(highlight=False, soft_wrap=True)  # results meant for pipes


def quiet() -> bool:
    """True on ranks other than 0 under torchrun: they print nothing."""
    return int(os.environ.get("RANK", "0")) != 0


def info(msg: str) -> None:
    if not quiet():
        console.print(msg)


_held = 0  # > 0 inside `hold_warnings`


def warn(msg: str) -> None:
    """One warning line; `msg` is plain text (escaped here)."""
    if not quiet() and not _held:
        console.print(f"[yellow]warning[/]: {esc(msg)}", soft_wrap=True)  # one line, however long the path


@contextmanager
def hold_warnings(held: bool = True):
    """Warnings inside are not printed (when `held`): a second scan of the data would repeat what the first said."""
    global _held
    _held += held
    try:
        yield
    finally:
        _held -= held


def error(msg: str) -> None:
    console.print(f"[red]error[/]: {esc(msg)}", soft_wrap=True)


def command_line() -> str:
    """This process's command as the user typed it (`vitcli ...` when run through the entry point or -m)."""
    import shlex
    import sys

    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    if prog in ("vitcli", "__main__.py"):
        return shlex.join(["vitcli", *sys.argv[1:]])
    return shlex.join([os.path.basename(sys.executable), *sys.argv])


def progress_bar(transient: bool = False, extra: bool = False):
    """A rich Progress on a terminal, else a `PlainProgress` with the same methods."""
    if not console.is_terminal:
        return PlainProgress(float(os.environ.get("VITCLI_PROGRESS_SECONDS", "10")))
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    if extra:
        columns.append(TextColumn("{task.fields[stats]}"))
    return Progress(*columns, console=console, transient=transient, disable=quiet())


def clock(seconds: float) -> str:
    """0:01:05 style, as rich's columns print it."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    fields: dict = field(default_factory=dict)
    start: float = field(default_factory=time.monotonic)
    start_completed: float = 0.0
    printed: float = field(default_factory=time.monotonic)


class PlainProgress:
    """Progress as whole lines (`epoch 1/5  120/400 30%  elapsed 0:00:12  eta 0:00:28  loss ...`), one per task
    every `interval` seconds and when a task completes: what a log file or a pipe can show."""

    def __init__(self, interval: float = 10.0):
        self.interval, self.tasks, self._next = interval, {}, 0

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:  # where each unfinished task was when the error or signal came
            now = time.monotonic()
            for t in self.tasks.values():
                if t.total is None or t.completed < t.total:
                    info(esc(self.line(t, now)))
        self.stop()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        self._next += 1
        self.tasks[self._next] = _Task(description, total, completed, fields, start_completed=completed)
        return self._next

    def remove_task(self, task_id: int) -> None:
        self.tasks.pop(task_id, None)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, advance: float = 0, completed: float | None = None, total: float | None = None,
               **fields) -> None:
        t = self.tasks[task_id]
        t.completed = completed if completed is not None else t.completed + advance
        t.total = total if total is not None else t.total  # a time budget refits the number of epochs
        t.fields.update(fields)
        now = time.monotonic()
        done = t.total is not None and t.completed >= t.total
        if now - t.printed >= self.interval or (done and now - t.start >= self.interval):
            t.printed = now
            info(esc(self.line(t, now)))

    @staticmethod
    def line(t: _Task, now: float) -> str:
        elapsed = now - t.start
        rate = (t.completed - t.start_completed) / elapsed if elapsed > 0 else 0.0
        parts = [t.description]
        if t.total:
            parts.append(f"{t.completed:g}/{t.total:g} {100 * t.completed / t.total:.0f}%")
            eta = (t.total - t.completed) / rate if rate > 0 else None
            parts.append(f"elapsed {clock(elapsed)}  eta {clock(eta) if eta is not None else '?'}")
        else:
            parts.append(f"{t.completed:g}  elapsed {clock(elapsed)}")
        if t.fields.get("stats"):
            parts.append(str(t.fields["stats"]))
        return "  ".join(parts)
