"""The one rich Console (stderr for progress and messages, stdout for results), progress bars, tables.

User-supplied text (paths, class names) goes through `esc` so rich markup in it prints literally.
"""

from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape as esc  # noqa: F401  (re-exported)

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
