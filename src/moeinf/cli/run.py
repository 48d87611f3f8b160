"""`moeinf run MODEL [PROMPT]`: chat with a model, like `ollama run`.

Interactive REPL when no prompt is given and stdin is a terminal; otherwise one answer and exit. Piped
stdin is read whole and put before PROMPT. Output streams to stdout (plain text when it is not a
terminal), `--verbose` writes ollama's statistics block to stderr, `--format json` writes exactly one
JSON object. A model that is not in the store is pulled first. Torch is imported only when the
command runs (through the engine), so `moeinf --help` stays instant.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Annotated

import typer

from moeinf.cli import ui
from moeinf.errors import BadOption
from moeinf.runtime.policy import DEFAULT_POLICY


def run(
    model: Annotated[str, typer.Argument(help="Model: store name, alias, org/repo or local directory.")],
    prompt: Annotated[
        str | None, typer.Argument(help="Prompt; without it (and with a terminal) starts a chat.")
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show timings and statistics on stderr.")
    ] = False,
    raw: Annotated[bool, typer.Option("--raw", help="No chat template: tokenize the prompt as is.")] = False,
    format: Annotated[str | None, typer.Option("--format", help="Output format: json.")] = None,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy (default: the model's).")] = None,
    top_k: Annotated[
        int | None, typer.Option("--top-k", help="Sample from the k most likely tokens.")
    ] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass.")] = None,
    min_p: Annotated[float | None, typer.Option("--min-p", help="Drop tokens below min_p * p(top).")] = None,
    repeat_penalty: Annotated[
        float | None, typer.Option("--repeat-penalty", help="Penalise tokens already in the context.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed, for reproducible sampling.")] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Stop after this many new tokens.")
    ] = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop before this text (repeatable).")
    ] = None,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Do not stop at end-of-sequence (benchmarks).")
    ] = False,
    system: Annotated[str | None, typer.Option("--system", help="System message (chat template).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all available).")] = None,
    num_ctx: Annotated[
        int | None, typer.Option("--num-ctx", help="Context length to allocate (default 4096).")
    ] = None,
    ram_mem: Annotated[
        str | None,
        typer.Option("--ram-mem", help="RAM for experts: bytes (6GiB, 512MiB) or a share of them (25%)."),
    ] = None,
    gpu_mem: Annotated[
        str | None, typer.Option("--gpu-mem", help="GPU memory for experts (CUDA): bytes or a share (25%).")
    ] = None,
    policy: Annotated[
        str, typer.Option(help="Expert cache policy: trace (learns from past requests), lru, lfu, naive.")
    ] = DEFAULT_POLICY,
    routing_trace: Annotated[
        str | None,
        typer.Option("--routing-trace", help="Replay the router's choices from a trace file (.npz)."),
    ] = None,
    record_trace: Annotated[
        str | None,
        typer.Option(
            "--record-trace",
            help="Write the router's choices of every request to a trace file (.npz, for `trace simulate`).",
        ),
    ] = None,
) -> None:
    """Run a model: chat in a terminal, or answer PROMPT (with piped stdin before it) and exit."""
    with ui.errors(), _quiet_broken_pipe():
        if format not in (None, "json"):
            raise BadOption(f"unknown --format {format!r} (only json)")
        stdin_text = None if sys.stdin.isatty() else sys.stdin.read()
        text = " ".join(t for t in (stdin_text, prompt) if t)  # ollama joins them with a space
        interactive = prompt is None and stdin_text is None and format is None
        if not interactive and not text.strip():
            raise BadOption("no prompt: give PROMPT, pipe text on stdin, or run in a terminal to chat")

        if record_trace is not None:
            _check_writable(record_trace)
        cache = {"ram_mem": ram_mem, "gpu_mem": gpu_mem, "policy": policy}
        engine = _load(model, device=device, threads=threads, num_ctx=num_ctx, cache=cache, verbose=verbose)
        with contextlib.closing(engine):  # the expert cache's worker threads end with the command
            if verbose:
                print(engine.decoder.describe_decode(), file=sys.stderr)
            _routing_hooks(engine, replay=routing_trace, record=record_trace, model=model)
            _chat(
                engine,
                text if not interactive else None,
                format=format,
                verbose=verbose,
                raw=raw,
                system=system,
                overrides={
                    "temperature": temperature,
                    "top_k": top_k,
                    "top_p": top_p,
                    "min_p": min_p,
                    "repeat_penalty": repeat_penalty,
                    "seed": seed,
                },
                max_tokens=max_tokens,
                stop=tuple(stop or ()),
                ignore_eos=ignore_eos,
            )


def _chat(engine, text: str | None, *, format: str | None, verbose: bool, **session_options) -> None:
    """Answer `text` once (text or JSON), or start the REPL when there is no text."""
    session = _session(engine, **session_options)
    if text is None:
        _repl(session, verbose=verbose)
    elif format == "json":
        _answer_json(session, text, verbose=verbose)
    else:
        _answer_text(session, text, verbose=verbose)


@contextlib.contextmanager
def _quiet_broken_pipe() -> Iterator[None]:
    """`moeinf run ... | head`: the reader went away; stop quietly instead of a traceback."""
    try:
        yield
    except BrokenPipeError:
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            # Python flushes stdout again at exit: point it at /dev/null so that flush succeeds.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(0) from None


def _load(model: str, *, device: str, threads: int | None, num_ctx: int | None, cache: dict, verbose: bool):
    from moeinf.runtime.cache_plan import cache_factory, describe
    from moeinf.runtime.engine import Engine

    def on_plan(plan, expert_cache) -> None:
        if verbose:
            for line in describe(plan, expert_cache):
                print(f"cache: {line}", file=sys.stderr)
            if plan.device.type == "cpu":
                from moeinf import kernels

                print(kernels.describe(), file=sys.stderr)  # native or torch decode products, and why

    # A model that is not in the store is pulled first, with pull's progress display on stderr.
    with ui.PullDisplay() as display:
        return Engine.load(
            model,
            device=device,
            threads=threads,
            context_length=num_ctx,
            progress=display,
            provider=cache_factory(**cache, on_plan=on_plan),
        )


def _check_writable(path: str) -> None:
    """--record-trace: fail before loading the model when the file cannot be written."""
    from pathlib import Path

    target = Path(path).expanduser()
    if target.is_dir():
        raise BadOption(f"--record-trace {path} is a directory; give a file name (e.g. routing.npz)")
    folder = target.resolve().parent
    while not folder.exists():  # missing folders are created at the first write
        folder = folder.parent
    if not can_write_in(folder):
        raise BadOption(f"--record-trace {path}: cannot write in {folder}")


def can_write_in(folder) -> bool:
    """Whether a file can be created in `folder`, by creating (and removing) one: permission bits do not
    tell for /proc, read-only mounts or a full quota."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _routing_hooks(engine, *, replay: str | None, record: str | None, model: str) -> None:
    """--routing-trace: the router's choices come from a recorded trace (same layers x experts x top-k);
    --record-trace: the choices made (replayed or the model's own) go to a trace file per request."""
    from moeinf.runtime.routing_hooks import HookChain, RoutingReplay, TraceFileRecorder
    from moeinf.runtime.trace import read_trace

    spec = engine.spec
    shape = {"num_moe_layers": len(spec.moe_layers), "num_experts": spec.num_experts, "top_k": spec.top_k}
    hooks: list = []
    if replay:
        hooks.append(RoutingReplay(read_trace(replay), **shape))
    if record:
        recorder = TraceFileRecorder(record, **shape, model=model, source="moeinf run")
        engine.request_listeners.append(recorder)
        hooks.append(recorder)
    if hooks:
        engine.decoder.set_routing_hook(HookChain(hooks) if len(hooks) > 1 else hooks[0])


def _session(engine, *, raw: bool, system: str | None, overrides: dict, max_tokens, stop, ignore_eos):
    from moeinf.cli.session import ChatSession
    from moeinf.runtime.generate import GenerationParams

    sampling = engine.default_sampling().replace(**{k: v for k, v in overrides.items() if v is not None})
    params = GenerationParams(max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos, sampling=sampling)
    return ChatSession(engine, params, raw=raw, system=system)


def _repl(session, *, verbose: bool) -> None:
    from moeinf.cli.repl import Repl

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # not on every platform
        pass
    Repl(session, verbose=verbose).run()


def _answer_text(session, text: str, *, verbose: bool) -> None:
    from moeinf.cli.session import display_start, format_stats

    start = time.perf_counter()
    started, last, last_shown = session.raw, None, ""
    for last in session.ask(text):
        shown, started = display_start(last.text, started)
        if shown:
            sys.stdout.write(shown)
            sys.stdout.flush()
            last_shown = shown
    if not last_shown.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose and last is not None:
        total = time.perf_counter() - start
        print(format_stats(session.engine.load_s, total, last.timings, last.cache), file=sys.stderr)


def _answer_json(session, text: str, *, verbose: bool) -> None:
    from moeinf.cli.session import format_stats, stats_dict
    from moeinf.runtime.generate import complete

    start = time.perf_counter()
    prompt_ids = session.prompt_ids(text)
    result = complete(session.engine, prompt_ids, session.params)
    total = time.perf_counter() - start
    out = {
        "model": session.engine.name,
        "device": str(session.engine.device),
        "dtype": str(session.engine.dtype).removeprefix("torch."),
        "text": result.text if session.raw else result.text.lstrip(),
        "token_ids": result.token_ids,
        "prompt_token_ids": result.prompt_token_ids,
        "finish_reason": result.finish_reason,
        "stats": stats_dict(session.engine.load_s, total, result.timings, result.cache),
    }
    sys.stdout.write(json.dumps(out, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    if verbose:
        print(format_stats(session.engine.load_s, total, result.timings, result.cache), file=sys.stderr)
