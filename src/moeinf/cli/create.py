"""`moeinf create NAME --shape LxExK`: a random-weight MoE of any shape in the store (for benchmarks).

Routing of random weights is not realistic: drive such a model with a real trace (`moeinf bench
--routing-trace`). The tokenizer is the demo model's.
"""

from __future__ import annotations

from typing import Annotated

import typer

from moeinf.cli import ui


def create(
    name: Annotated[str, typer.Argument(help="store name of the new model")],
    shape: Annotated[str, typer.Option("--shape", help="LAYERSxEXPERTSxTOPK, e.g. 24x32x4")],
    dim: Annotated[int, typer.Option("--dim", help="hidden size (a multiple of 64)")] = 768,
    expert_dim: Annotated[int, typer.Option("--expert-dim", help="expert hidden size")] = 1152,
    dtype: Annotated[str, typer.Option("--dtype", help="weight dtype: bf16, fp16 or fp32")] = "bf16",
    seed: Annotated[int, typer.Option("--seed", help="random seed of the weights")] = 0,
    tokenizer: Annotated[
        str | None,
        typer.Option("--tokenizer", help="folder whose tokenizer to use (default: the demo model's)"),
    ] = None,
) -> None:
    """Create a random-weight Mixtral-style model of the given shape in the store."""
    with ui.errors():
        from pathlib import Path

        from moeinf.bench.create import create as create_model
        from moeinf.bench.synthetic import parse_shape

        parsed = parse_shape(shape, hidden=dim, expert_dim=expert_dim)
        with ui.PullDisplay() as display:
            model = create_model(
                name,
                parsed,
                dtype=dtype,
                seed=seed,
                progress=display,
                tokenizer_dir=Path(tokenizer) if tokenizer else None,
            )
        typer.echo(f"{model.name}\t{ui.human_bytes(model.size_bytes)}\t{model.path}")
