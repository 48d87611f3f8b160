"""`moeinf serve`: run the HTTP API (ollama's /api/* and OpenAI's /v1/*) on a local port, like `ollama serve`.

Binds to 127.0.0.1 by default and warns on any other address. `--api-key` (or $MOEINF_API_KEY) makes
every request carry `Authorization: Bearer <key>`. FastAPI and uvicorn are an optional extra; without
them the command says how to install them. Heavy imports happen inside the command.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer

from moeinf.cli import ui
from moeinf.errors import BadOption, MissingDependency

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11435  # ollama's 11434 + 1 (moeinf.server.app.DEFAULT_PORT; kept here so --help stays light)


def is_local(host: str) -> bool:
    """Whether binding to `host` keeps the server reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(
    host: Annotated[str, typer.Option(help="Address to bind (non-local exposes the API).")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="TCP port.")] = DEFAULT_PORT,
    model: Annotated[
        str | None, typer.Option("--model", help="Load this stored model at start; the default model.")
    ] = None,
    keep_alive: Annotated[
        str,
        typer.Option("--keep-alive", help="Unload an idle model after (5m, 1h, 0; -1 = never)."),
    ] = "5m",
    ram_mem: Annotated[
        str | None,
        typer.Option("--ram-mem", help="Expert cache budget in RAM (6GiB; 25% of experts)."),
    ] = None,
    gpu_mem: Annotated[
        str | None, typer.Option("--gpu-mem", help="Expert cache budget in GPU memory (CUDA only).")
    ] = None,
    policy: Annotated[
        str | None, typer.Option("--policy", help="Expert cache policy: trace (default), lru, lfu, naive.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all available).")] = None,
    num_ctx: Annotated[
        int | None, typer.Option("--num-ctx", help="Context length to allocate (default 4096).")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' ($MOEINF_API_KEY)."),
    ] = None,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Requests that may wait; beyond, 503 + Retry-After.")
    ] = 16,
    max_body: Annotated[str, typer.Option("--max-body", help="Largest request body accepted.")] = "8MiB",
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn log level.")] = "info",
    record_trace: Annotated[
        str | None,
        typer.Option(
            "--record-trace",
            help="Folder: write each model's routing (every request) to <model>-<start time>.npz in it, "
            "for `moeinf trace simulate`.",
        ),
    ] = None,
) -> None:
    """Serve models over HTTP: ollama's API (/api/*) and OpenAI's (/v1/*), one request at a time."""
    with ui.errors():
        try:
            import uvicorn

            from moeinf.server.app import ServerConfig, create_app
        except ImportError as exc:
            raise MissingDependency(
                f"`moeinf serve` needs FastAPI and uvicorn ({exc.name} is missing): "
                "pip install 'moeinf[serve]'"
            ) from None
        from moeinf import settings
        from moeinf.runtime.budget import parse_size
        from moeinf.server.manager import LoadOptions
        from moeinf.server.options import parse_duration

        if max_queue < 1:
            raise BadOption(f"--max-queue must be >= 1, got {max_queue}")
        body_limit = parse_size(max_body)
        if body_limit.bytes is None:
            raise BadOption(f"--max-body needs a size in bytes (like 8MiB), got {max_body!r}")
        if record_trace is not None:
            record_trace = str(_trace_folder(record_trace))
        load = LoadOptions(
            device=device,
            threads=threads,
            num_ctx=num_ctx,
            ram_mem=ram_mem,
            gpu_mem=gpu_mem,
            policy=policy,
            record_trace=record_trace,
        )
        load.validate()
        if model is not None:
            from moeinf.store import Store

            model = Store().open(model).name  # not in the store: say so now, not at the first request
        config = ServerConfig(
            load=load,
            keep_alive=parse_duration(keep_alive, "--keep-alive"),
            model=model,
            api_key=api_key or settings.api_key(),
            max_queue=max_queue,
            max_body=body_limit.bytes,
        )
        if not is_local(host):
            auth = "with an API key" if config.api_key else "WITHOUT an API key (set --api-key)"
            typer.echo(f"Warning: binding to {host} exposes the API to the network, {auth}", err=True)
        _log_to_stderr(log_level)
        typer.echo(f"moeinf serving on http://{host}:{port} (ollama /api/*, OpenAI /v1/*)", err=True)
        # On Ctrl-C, streams still open get a few seconds to finish before they are cut.
        app = create_app(config)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def _trace_folder(path: str):
    """--record-trace: the folder (created if missing), refused now rather than at the first request."""
    from pathlib import Path

    from moeinf.cli.run import can_write_in

    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise BadOption(
            f"--record-trace {path} is a file; give a folder (each model gets its own trace file)"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadOption(f"--record-trace {path}: cannot create it ({e.strerror})") from None
    if not can_write_in(folder):
        raise BadOption(f"--record-trace {path}: cannot write in it")
    return folder.resolve()


def _log_to_stderr(level: str) -> None:
    """The server's own log lines (model loads, the cache plan, errors) beside uvicorn's, in its format."""
    import logging

    logger = logging.getLogger("moeinf.server")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    value = logging.getLevelName(level.upper())  # uvicorn's "trace" is not a logging level: INFO then
    logger.setLevel(value if isinstance(value, int) else logging.INFO)
