"""`moeinf list`: the models in the store, as a table or (--json) a JSON array."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from moeinf.cli import ui


def list_models(
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON array, one object per model")] = False,
) -> None:
    """List the models in the store."""
    with ui.errors():
        from moeinf.store import Store

        models = Store().list()
        if as_json:
            typer.echo(json.dumps([m.info() for m in models], indent=2))
            return
        rows = [["NAME", "SIZE", "LAYERS x EXPERTS (TOP-K)", "MODIFIED"]]
        for model in models:
            spec = model.spec
            shape = f"{spec.num_layers} x {spec.num_experts} ({spec.top_k})"
            rows.append([model.name, ui.human_bytes(model.size_bytes), shape, ui.human_age(model.modified)])
        typer.echo(ui.table(rows))
