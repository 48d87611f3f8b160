"""Entry point: the `moeinf` Typer app; every command is registered here, one module per command.

Command modules import heavy dependencies (torch, the runtime) inside their functions, so
`moeinf --help` and `moeinf list` start without torch.
"""

from __future__ import annotations

from typing import Annotated

import typer

from moeinf import __version__
from moeinf.cli.bench import bench
from moeinf.cli.create import create
from moeinf.cli.list import list_models
from moeinf.cli.pull import pull
from moeinf.cli.rm import rm
from moeinf.cli.run import run
from moeinf.cli.serve import serve
from moeinf.cli.show import show
from moeinf.cli.trace import trace_app

app = typer.Typer(
    name="moeinf",
    help="Run Mixture-of-Experts language models on small machines with a budgeted expert cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("pull")(pull)
app.command("list")(list_models)
app.command("ls", hidden=True)(list_models)
app.command("show")(show)
app.command("rm")(rm)
app.command("run")(run)
app.command("serve")(serve)
app.command("bench")(bench)
app.command("create")(create)
app.add_typer(trace_app, name="trace")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moeinf {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Run Mixture-of-Experts language models on small machines with a budgeted expert cache."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
