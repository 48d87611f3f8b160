"""Entry point: registers every command. Placeholder until the foundation lands."""

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False)


def main() -> None:
    app()
