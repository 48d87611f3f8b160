"""`moeinf pull SOURCE`: download (or read) a checkpoint and reshard it into the store."""

from __future__ import annotations

from typing import Annotated

import typer

from moeinf.cli import ui


def pull(
    source: Annotated[
        str, typer.Argument(help="alias (mixtral, olmoe, ...), org/repo[@revision] or a local folder")
    ],
    name: Annotated[str | None, typer.Option("--name", help="store the model under this name")] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="convert weights while resharding: bf16, fp16 or fp32")
    ] = None,
) -> None:
    """Download a model from the Hugging Face hub (or a local folder) into the store."""
    with ui.errors():
        from moeinf.pull import pull as pull_model

        with ui.PullDisplay() as display:
            model = pull_model(source, name=name, progress=display, dtype=dtype)
        typer.echo(f"{model.name}\t{ui.human_bytes(model.size_bytes)}\t{model.path}")
