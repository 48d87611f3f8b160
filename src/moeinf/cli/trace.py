"""`moeinf trace ...`: the policy simulator over routing traces, and each model's trace library.

`simulate` replays a trace file through cache policies (bench.simulator); `list|show|clear|export|
import` manage the library kept in the store. numpy only: no torch on this path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from moeinf.cli import ui

trace_app = typer.Typer(
    name="trace",
    help="Simulate cache policies on routing traces; manage a model's trace library.",
    no_args_is_help=True,
    add_completion=False,
)


def parse_capacities(text: str) -> list[float]:
    """'12.5%,25%,0.5' -> [0.125, 0.25, 0.5]."""
    from moeinf.errors import BadOption

    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = float(part[:-1]) / 100 if part.endswith("%") else float(part)
        except ValueError:
            raise BadOption(f"bad capacity {part!r}: use a percentage (25%) or a fraction (0.25)") from None
        if not 0 < value <= 1:
            raise BadOption(f"capacity {part!r} is not in (0, 100%]")
        out.append(value)
    if not out:
        raise BadOption("give at least one capacity")
    return out


def _load_library_source(path: Path, trace):
    """A fresh in-memory library from a trace file or a saved library file, checked against `trace`."""
    import numpy as np

    from moeinf.errors import InvalidTrace
    from moeinf.runtime.trace import read_trace
    from moeinf.runtime.trace_library import TraceLibrary

    try:
        with np.load(path, allow_pickle=False) as data:
            is_library = "eams" in data.files
    except (OSError, ValueError) as e:
        raise InvalidTrace(f"{path}: cannot read ({e})") from None
    lib = TraceLibrary.load_file(path) if is_library else TraceLibrary.from_trace(read_trace(path))
    if (lib.num_layers, lib.num_experts, lib.top_k) != (trace.num_layers, trace.num_experts, trace.top_k):
        raise InvalidTrace(f"{path}: library shape differs from the trace's (layers, experts, top-k)")
    return lib


@trace_app.command("simulate")
def simulate(
    trace_files: Annotated[
        list[Path],
        typer.Argument(metavar="TRACE.npz...", help="routing trace(s) to replay, one after the other"),
    ],
    library: Annotated[
        Path | None,
        typer.Option("--library", metavar="LIB.npz", help="pre-load the trace library from this file"),
    ] = None,
    capacity: Annotated[str, typer.Option(help="cache sizes, fraction of all experts")] = "12.5%,25%,50%",
    policies: Annotated[str, typer.Option(help="comma-separated policies")] = "lru,lfu,trace,oracle",
    per_layer: Annotated[bool, typer.Option("--per-layer", help="one pool per layer, not shared")] = False,
    compute_ms_per_layer: Annotated[float, typer.Option(help="modelled compute per layer")] = 0.5,
    transfer_ms_per_expert: Annotated[float, typer.Option(help="modelled transfer per expert")] = 14.0,
    requests: Annotated[int | None, typer.Option(help="replay only the first N requests")] = None,
    with_prefill: Annotated[
        bool,
        typer.Option(
            "--with-prefill", help="also replay prompt tokens, token by token (run --record-trace has them)"
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Replay routing traces through cache policies: fetches, misses, wasted prefetches, modelled time.

    A trace from `moeinf run --record-trace` holds the prompt tokens too; they are left out unless
    --with-prefill (the simulator models decode: one token at a time, layer by layer)."""
    with ui.errors():
        from moeinf.bench.simulator import simulate_grid
        from moeinf.errors import BadOption
        from moeinf.runtime.policy import POLICIES
        from moeinf.runtime.trace import concat_traces, read_trace

        caps = parse_capacities(capacity)
        names = [p.strip() for p in policies.split(",") if p.strip()]
        unknown = [n for n in names if n not in POLICIES]
        if unknown or not names:
            raise BadOption(f"unknown policy {unknown!r}; choose from: {', '.join(sorted(POLICIES))}")
        parts = [read_trace(f) for f in trace_files]
        if not with_prefill:  # per file: each knows its requests' prompt tokens
            parts = [t.decode_only() for t in parts]
        trace = concat_traces(parts)
        if requests is not None:
            trace = trace.select(list(range(min(requests, trace.num_requests))))
        source = library

        def options(name: str) -> dict:
            if name == "trace" and source is not None:
                return {"library": _load_library_source(source, trace), "routing": routing}
            return {}

        routing = None
        if source is not None:  # fail early on a bad file; the library's token-level routing statistics
            routing = _load_library_source(source, trace).routing_stats()
        results = simulate_grid(
            trace,
            names,
            caps,
            per_layer=per_layer,
            compute_ms_per_layer=compute_ms_per_layer,
            transfer_ms_per_expert=transfer_ms_per_expert,
            policy_options=options,
        )
        rows = [r.to_dict() for r in results]
        if as_json:
            out = {
                "trace": str(trace_files[0]) if len(trace_files) == 1 else [str(f) for f in trace_files],
                "library": str(library) if library else None,
                "tokens": trace.num_tokens,
                "requests": trace.num_requests,
                "per_layer": per_layer,
                "compute_ms_per_layer": compute_ms_per_layer,
                "transfer_ms_per_expert": transfer_ms_per_expert,
                "results": rows,
            }
            typer.echo(json.dumps(out, indent=2))
            return
        _print_results(rows, trace)


def _print_results(rows: list[dict], trace) -> None:
    from rich.console import Console
    from rich.table import Table

    oracle = {r["capacity"]: r["fetches_per_token"] for r in rows if r["policy"] == "oracle"}
    table = Table(
        title=f"{trace.num_requests} requests, {trace.num_tokens} tokens, "
        f"{trace.num_layers} layers x {trace.num_experts} experts, top-{trace.top_k}"
    )
    for name in (
        "policy",
        "capacity",
        "slots",
        "fetches/tok",
        "x oracle",
        "demand miss/tok",
        "prefetch/tok",
        "wasted/tok",
        "bypass/tok",
        "ms/tok",
        "bound ms/tok",
        "tok/s (sim)",
    ):
        table.add_column(name, justify="left" if name == "policy" else "right")
    for r in rows:
        ref = oracle.get(r["capacity"])
        ratio = f"{r['fetches_per_token'] / ref:.2f}" if ref else "-"
        table.add_row(
            r["policy"],
            f"{r['capacity']:.1%}",
            str(r["slots"]),
            f"{r['fetches_per_token']:.2f}",
            ratio,
            f"{r['demand_misses_per_token']:.2f}",
            f"{r['prefetches_per_token']:.2f}",
            f"{r['wasted_prefetches_per_token']:.2f}",
            f"{r['bypasses_per_token']:.2f}",
            f"{r['time_ms_per_token']:.1f}",
            f"{r['bound_ms_per_token']:.1f}" if r["bound_ms_per_token"] is not None else "-",
            f"{r['tokens_per_s']:.0f}",
        )
    Console(width=200).print(table)


def _library(model: str):
    from moeinf.runtime.trace_library import open_model_library
    from moeinf.store import Store

    return open_model_library(Store().open(model))


@trace_app.command("list")
def list_entries(
    model: Annotated[str, typer.Argument(help="model name")],
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON array")] = False,
) -> None:
    """List the entries of a model's trace library."""
    with ui.errors():
        lib = _library(model)
        entries = lib.summary()
        if as_json:
            typer.echo(json.dumps(entries, indent=2))
            return
        if not entries:
            typer.echo(f"no traces for {model} yet (they are recorded as requests finish)")
            return
        rows = [["ENTRY", "REQUESTS", "TOKENS", "UPDATED"]]
        for e in entries:
            rows.append([str(e["index"]), str(e["requests"]), str(e["tokens"]), ui.human_age(e["updated"])])
        typer.echo(ui.table(rows))


@trace_app.command("show")
def show(
    model: Annotated[str, typer.Argument(help="model name")],
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON object")] = False,
) -> None:
    """Summarise a model's trace library: size, bounds, and each layer's most used experts."""
    with ui.errors():
        lib = _library(model)
        rates = lib.predict(None)  # [L, E] uses per token over the whole library
        top = [
            [(int(e), round(float(rates[layer, e]), 4)) for e in rates[layer].argsort()[::-1][: lib.top_k]]
            for layer in range(lib.num_layers)
        ]
        info = {
            "model": model,
            "path": str(lib.path),
            "entries": len(lib),
            "capacity": lib.capacity,
            "max_entries": lib.max_entries,
            "max_bytes": lib.max_bytes,
            "bytes": lib.nbytes,
            "requests": int(lib.requests.sum()),
            "tokens": int(lib.tokens.sum()),
            "top_experts": top if len(lib) else [],
        }
        if as_json:
            typer.echo(json.dumps(info, indent=2))
            return
        typer.echo(f"trace library of {model}: {info['path']}")
        typer.echo(
            f"  {info['entries']} of {info['capacity']} entries, {ui.human_bytes(info['bytes'])}, "
            f"{info['requests']} requests, {info['tokens']} tokens"
        )
        for layer, experts in enumerate(info["top_experts"]):
            shown = ", ".join(f"{e} ({r:.2f}/tok)" for e, r in experts)
            typer.echo(f"  layer {layer:3d}: {shown}")


@trace_app.command("clear")
def clear(model: Annotated[str, typer.Argument(help="model name")]) -> None:
    """Forget a model's recorded traces."""
    with ui.errors():
        lib = _library(model)
        n = len(lib)
        lib.clear()
        typer.echo(f"cleared {n} trace entries of {model}")


@trace_app.command("export")
def export(
    model: Annotated[str, typer.Argument(help="model name")],
    output: Annotated[Path, typer.Option("--output", "-o", help="file to write")] = Path("library.npz"),
) -> None:
    """Write a model's trace library to a file (usable as `trace simulate --library`)."""
    with ui.errors():
        lib = _library(model)
        path = lib.save(output)
        typer.echo(f"wrote {len(lib)} entries to {path}")


def parse_requests(text: str | None, total: int) -> range:
    """`A:B` (either end optional, Python slice rules) -> the request indices it selects."""
    from moeinf.errors import BadOption

    if text is None:
        return range(total)
    start, sep, stop = text.partition(":")
    try:
        if not sep:
            i = int(start)
            return range(total)[i : i + 1] if i >= 0 else range(total)[i:][:1]
        return range(total)[slice(int(start) if start else None, int(stop) if stop else None)]
    except ValueError:
        raise BadOption(f"--requests must look like 3:100, :50, 7: or 12, got {text!r}") from None


@trace_app.command("import")
def import_trace(
    model: Annotated[str, typer.Argument(help="model name")],
    trace_file: Annotated[Path, typer.Argument(help="trace .npz (moeinf's format)", metavar="TRACE.npz")],
    requests: Annotated[
        str | None, typer.Option("--requests", help="which requests, as a slice: 3:100, :50, 7:")
    ] = None,
) -> None:
    """Add the requests of a trace file to a model's trace library (e.g. routing recorded elsewhere).

    The library keeps its bounds (entries merge or make room as when requests finish). To benchmark
    with replayed routing, import requests that the benchmark does not replay (e.g. --requests 3:).
    """
    with ui.errors():
        import numpy as np

        from moeinf.errors import BadOption, InvalidTrace
        from moeinf.runtime.trace import read_trace
        from moeinf.runtime.trace_library import open_model_library
        from moeinf.store import Store

        trace = read_trace(trace_file)
        stored = Store().open(model)
        spec = stored.spec
        layers = list(spec.moe_layers)  # the trace's layer i is the model's i-th MoE layer
        if (trace.num_layers, trace.num_experts) != (len(layers), spec.num_experts):
            raise InvalidTrace(
                f"{trace_file}: routing of {trace.num_layers} layers x {trace.num_experts} experts does not "
                f"match {model}'s {len(layers)} MoE layers x {spec.num_experts} experts"
            )
        chosen = parse_requests(requests, trace.num_requests)
        if len(chosen) == 0:
            raise BadOption(f"--requests {requests} selects none of the {trace.num_requests} requests")
        part = trace.select(list(chosen)).decode_only()  # as the library counts run-time requests
        experts = np.full((part.num_tokens, spec.num_layers, part.top_k), -1, dtype=np.int16)
        experts[:, layers] = part.experts  # [T, model layers, K]
        lib = open_model_library(stored)
        for i in range(part.num_requests):
            eam = np.zeros((spec.num_layers, spec.num_experts))
            eam[layers] = part.eam(i)
            span = part.request_slice(i)
            lib.add(eam, tokens=span.stop - span.start, save=False)
        lib.routing.add(experts, part.seq_offsets)
        lib.save()
        typer.echo(
            f"imported {part.num_requests} requests ({part.num_tokens} tokens) into {model}'s trace "
            f"library: {len(lib)} entries, {lib.path}"
        )
