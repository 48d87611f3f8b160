"""`moeinf rm NAME...`: delete models (and unfinished pulls) from the store."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from moeinf.cli import ui


def rm(
    names: Annotated[list[str], typer.Argument(help="model names, as `moeinf list` shows them")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
) -> None:
    """Remove models from the store."""
    with ui.errors():
        from moeinf.names import resolve_name
        from moeinf.store import Store

        store = Store()
        resolved = [resolve_name(n) for n in names]
        if not yes:
            if not sys.stdin.isatty():
                ui.error("refusing to delete without confirmation: pass --yes")
                raise typer.Exit(2)
            if not typer.confirm(f"Delete {', '.join(resolved)}?"):
                raise typer.Exit(1)
        for name in resolved:
            store.remove(name)
            typer.echo(f"deleted {name}")
