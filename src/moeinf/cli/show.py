"""`moeinf show NAME`: one model's architecture, sizes, source and path; `--verify` re-hashes its files."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from moeinf.cli import ui


def show(
    name: Annotated[str, typer.Argument(help="model name, as `moeinf list` shows it")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="re-hash every file against the manifest")] = False,
) -> None:
    """Show details of a model; with --verify, check every file's sha256."""
    with ui.errors():
        from moeinf.errors import CorruptModel
        from moeinf.store import Store

        model = Store().open(name)
        info = model.info()
        problems: list[str] | None = None
        if verify:
            seen: dict[str, int] = {}

            with ui.byte_progress(f"verifying {model.name}", model.size_bytes) as advance:

                def report(rel: str, done: int, size: int) -> None:
                    advance(done - seen.get(rel, 0))
                    seen[rel] = done

                problems = model.verify(report)
            info["verified"] = not problems
            info["problems"] = problems
        if as_json:
            typer.echo(json.dumps(info, indent=2))
        else:
            rows = [
                ["name", info["name"]],
                ["architecture", info["architecture"]],
                [
                    "parameters",
                    f"{ui.human_count(info['params_total'])} total, "
                    f"{ui.human_count(info['params_active'])} active per token",
                ],
                ["layers", f"{info['num_layers']} ({info['num_moe_layers']} MoE)"],
                [
                    "experts",
                    f"{info['num_experts']} routed, top-{info['top_k']}, {info['num_shared_experts']} shared",
                ],
                ["bytes per expert", ui.human_bytes(info["bytes_per_expert"])],
                ["context", f"{info['context_length']} tokens at most (run --num-ctx)"],
                [
                    "KV cache",
                    f"{ui.human_bytes(4 * info['kv_values_per_token'])} per token in fp32 (CPU), "
                    f"{ui.human_bytes(2 * info['kv_values_per_token'])} in bf16 (CUDA)",
                ],
                ["dtype", info["dtype"]],
                ["size", ui.human_bytes(info["size_bytes"])],
                ["source", info["source"]],
                ["path", info["path"]],
            ]
            typer.echo("\n".join(f"{key:<18}{value}" for key, value in rows))
            if problems is not None:
                for line in problems:
                    typer.echo(f"corrupted: {line}", err=True)
                if not problems:
                    typer.echo(f"verified {len(model.manifest.files)} files: OK")
        if problems:
            raise CorruptModel(f"{len(problems)} file(s) of {model.name} failed verification: {problems[0]}")
