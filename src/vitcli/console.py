"""The one rich Console (stderr for progress and messages, stdout for results), progress bars, tables.

User-supplied text (paths, class names, values) goes through `esc`: rich markup in it prints literally and
control characters (ESC/OSC sequences, newlines, bidi overrides) print as visible escapes, so a file or class
name can neither drive the terminal nor break a line or a table.
"""

from __future__ import annotations

import os
import re

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


def warn(msg: str) -> None:
    """One warning line; `msg` is plain text (escaped here)."""
    if not quiet():
        console.print(f"[yellow]warning[/]: {esc(msg)}", soft_wrap=True)  # one line, however long the path


def error(msg: str) -> None:
    console.print(f"[red]error[/]: {esc(msg)}", soft_wrap=True)


def progress_bar(transient: bool = False, extra: bool = False):
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
