"""Terminal output for the CLI: error mapping, byte/time formatting, and `pull`'s progress display.

Only this module and its siblings in cli/ touch rich or typer. Errors from the MoeinfError tree become
one line on stderr and the error's exit code (no traceback). Progress goes to stderr: rich bars, one
per file, when stderr is a terminal (like `ollama pull`); otherwise a few plain lines per file so logs
and pipes stay readable. Command results go to stdout, plain and stable.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import typer

from moeinf.errors import MoeinfError

if TYPE_CHECKING:
    from moeinf.pull import PullEvent


def error(message: str) -> None:
    typer.echo(f"Error: {message}", err=True)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Run a command body: MoeinfError -> one line on stderr + its exit code; Ctrl-C -> exit 130."""
    try:
        yield
    except MoeinfError as exc:
        error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        error("interrupted")
        raise typer.Exit(130) from None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return f"{n:.2f}T"


def human_age(timestamp: float, now: float | None = None) -> str:
    seconds = max(0.0, (now if now is not None else time.time()) - timestamp)
    for size, unit in ((86400 * 365, "year"), (86400 * 30, "month"), (86400 * 7, "week"), (86400, "day")):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    if seconds >= 3600:
        count = int(seconds // 3600)
        return f"{count} hour{'s' if count > 1 else ''} ago"
    if seconds >= 60:
        count = int(seconds // 60)
        return f"{count} minute{'s' if count > 1 else ''} ago"
    return "just now"


def table(rows: list[list[str]]) -> str:
    """Columns padded with spaces (first row is the header): stable text for eyes and `awk` alike."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def byte_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A single rich bar on a terminal (nothing otherwise); yields `advance(nbytes)`."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


_VERBS = {"download": "pulling", "write": "writing"}  # event phase -> verb shown


class PullDisplay:
    """Renders PullEvents: rich bars per (phase, file) on a terminal, plain lines otherwise."""

    def __init__(self, *, rich_output: bool | None = None) -> None:
        self.rich = sys.stderr.isatty() if rich_output is None else rich_output
        self._tasks: dict[tuple[str, str], int] = {}
        self._finished: set[tuple[str, str]] = set()
        self._progress = None
        if self.rich:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )

    def __enter__(self) -> PullDisplay:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, event: PullEvent) -> None:
        if event.kind in ("status", "done"):
            if self._progress is not None:
                self._progress.console.print(event.message)
            else:
                typer.echo(event.message, err=True)
            return
        key = (event.phase or "", event.file or "")
        if key in self._finished:
            return
        if self._progress is not None:
            self._rich_file(key, event)
        else:
            self._plain_file(key, event)

    def _rich_file(self, key: tuple[str, str], event: PullEvent) -> None:
        assert self._progress is not None
        task = self._tasks.get(key)
        if task is None:
            verb = _VERBS.get(key[0], "resharding")
            task = self._progress.add_task(f"{verb} {key[1]}", total=event.total)
            self._tasks[key] = task
        self._progress.update(task, completed=event.done, total=event.total)
        if event.total is not None and event.done >= event.total:
            self._finished.add(key)

    def _plain_file(self, key: tuple[str, str], event: PullEvent) -> None:
        verb = _VERBS.get(key[0], "resharding")
        if key not in self._tasks:
            self._tasks[key] = 0
            size = f" ({human_bytes(event.total)})" if event.total else ""
            typer.echo(f"{verb} {key[1]}{size}", err=True)
        if event.total is not None and event.done >= event.total:
            self._finished.add(key)
            typer.echo(f"{verb} {key[1]}: done", err=True)
