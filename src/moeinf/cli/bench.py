"""`moeinf bench MODEL`: measure decode speed per expert-cache policy, side by side, against the
physical limit. Each (policy, repeat) runs in a fresh process (bench/runner.py); this module parses
options and renders the result: a rich table (plain when stdout is not a terminal), `--json` one
object with every figure, `--plot` a PNG of per-token latency.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from moeinf.cli import ui


def bench(
    model: Annotated[str, typer.Argument(help="Model: store name or alias (pulled first if missing).")],
    policies: Annotated[
        str,
        typer.Option(
            "--policies",
            help="Comma-separated: all-resident,naive,lru,lfu,trace; with --routing-trace also oracle "
            "(Belady's MIN) and oracle-prefetch (MIN reading 2 layer steps ahead: perfect foresight).",
        ),
    ] = "all-resident,naive,lru,lfu,trace",
    ram_mem: Annotated[
        str | None, typer.Option("--ram-mem", help="RAM budget for experts: 25% (of the experts) or 6GiB.")
    ] = "25%",
    gpu_mem: Annotated[str | None, typer.Option("--gpu-mem", help="GPU budget for experts (CUDA).")] = None,
    prompts: Annotated[
        str | None, typer.Option("--prompts", help="Prompts file: one per line, or JSON lines with 'prompt'.")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens generated per prompt.")] = 64,
    repeat: Annotated[int, typer.Option("--repeat", help="Runs per policy (medians reported).")] = 1,
    routing_trace: Annotated[
        str | None, typer.Option("--routing-trace", help="Replay routing from this trace (.npz).")
    ] = None,
    cold: Annotated[
        bool, typer.Option("--cold", help="Drop the page cache before each run (root), else direct I/O.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object with every figure.")] = False,
    plot: Annotated[
        str | None, typer.Option("--plot", help="Write a PNG of per-token latency (needs matplotlib).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str | None, typer.Option(help="Compute dtype (default: the engine's).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: physical cores).")] = None,
) -> None:
    """Benchmark expert-cache policies on MODEL: speed, hit rate, bytes read, and the physical limit."""
    with ui.errors():
        from moeinf.bench.runner import BenchConfig, resolve_policies, run_bench
        from moeinf.bench.workload import BUILTIN_PROMPTS, read_prompts

        if plot is not None:
            _check_plot_dependency()
        chosen, notes = resolve_policies(policies.split(","), replay=routing_trace is not None)
        config = BenchConfig(
            model=model,
            policies=chosen,
            prompts=read_prompts(prompts) if prompts else list(BUILTIN_PROMPTS),
            ram_mem=ram_mem,
            gpu_mem=gpu_mem,
            max_tokens=max_tokens,
            repeat=repeat,
            routing_trace=routing_trace,
            cold=cold,
            device=device,
            dtype=dtype,
            threads=threads,
            notes=notes,
        )
        with ui.PullDisplay() as display:
            result = run_bench(config, progress=lambda m: typer.echo(m, err=True), pull_progress=display)
        if plot is not None:
            from moeinf.bench.plot import write_plot

            typer.echo(f"wrote {write_plot(result, plot)}", err=True)
        if as_json:
            typer.echo(json.dumps(result))
        else:
            _render(result)


def _check_plot_dependency() -> None:
    """Fail before the (long) measurement, not after it."""
    import importlib.util

    from moeinf.errors import MissingDependency

    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependency("--plot needs matplotlib, which is not installed: pip install matplotlib")


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = (
    "policy",
    "slots",
    "TTFT s",
    "tok/s",
    "ms/tok p50 (p10-p90)",
    "hit rate",
    "fetch/tok",
    "MB read/tok",
    "stall",
    "x limit",
    "peak RSS",
)


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    """The table's cells, one row per policy and one for the physical limit."""
    rows = []
    for policy, s in result["policies"].items():
        rows.append(
            [
                policy,
                str(s["slots"]),
                _fmt(s["ttft_s"], ".2f"),
                _fmt(s["decode_tps"], ".2f"),
                f"{s['latency_ms_p50']:.0f} ({s['latency_ms_p10']:.0f}-{s['latency_ms_p90']:.0f})",
                _fmt(s["hit_rate"], ".1%"),
                _fmt(s["fetches_per_token"], ".1f"),
                _fmt(s["bytes_read_per_token"] / 1e6, ".1f"),
                _fmt(s["stall_share"], ".0%"),
                _fmt(s["of_limit"], ".2f"),
                ui.human_bytes(s["peak_rss_bytes"])
                + (f" / GPU {ui.human_bytes(s['peak_gpu_bytes'])}" if s.get("peak_gpu_bytes") else ""),
            ]
        )
    lim = result["limit"]
    oracle = lim["oracle_fetches_per_token"]
    rows.append(
        [
            "limit",
            "",
            "",
            _fmt(lim["tokens_per_s"], ".2f"),
            _fmt(lim["ms_per_token"], ".0f"),
            "",
            _fmt(oracle, ".1f") + " (oracle)" if oracle is not None else "-",
            _fmt(oracle * result["shape"]["expert_bytes"] / 1e6 if oracle is not None else None, ".1f"),
            "",
            "1.00" if lim["tokens_per_s"] else "-",
            "",
        ]
    )
    return rows


def _render(result: dict[str, Any]) -> None:
    rows = table_rows(result)
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"moeinf bench {result['model']}")
        for i, name in enumerate(COLUMNS):
            table.add_column(name, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    else:
        typer.echo(ui.table([list(COLUMNS), *rows]))
    for line in _footer(result):
        typer.echo(line)


def _footer(result: dict[str, Any]) -> list[str]:
    bw, lim, cfg, shape = result["read_bandwidth"], result["limit"], result["config"], result["shape"]
    m = result["machine"]
    lines = [
        f"model {result['model']}: {shape['moe_layers']} MoE layers x {shape['experts']} experts, "
        f"top-{shape['top_k']}, {ui.human_bytes(shape['expert_bytes'])} per expert ({shape['dtype']})",
        f"budget: RAM {cfg['ram_mem'] or 'default'}"
        + (f", GPU {cfg['gpu_mem']}" if cfg.get("gpu_mem") else "")
        + f"; {len(cfg['prompts'])} prompts x {cfg['max_tokens']} tokens, {cfg['repeat']} repeat(s), "
        + (f"routing replayed from {cfg['routing_trace']}" if cfg.get("routing_trace") else "own routing"),
        f"store read bandwidth: {bw['bytes_per_s'] / 1e9:.2f} GB/s (median of {bw.get('probes', 1)} probes, "
        f"{min(bw.get('probes_bytes_per_s', [bw['bytes_per_s']])) / 1e9:.2f}-"
        f"{max(bw.get('probes_bytes_per_s', [bw['bytes_per_s']])) / 1e9:.2f}; {bw['mode']} I/O, "
        f"{bw['threads']} threads, {bw['files']} experts each); cold: "
        + (
            ("page cache dropped" if result["cold"]["page_cache_dropped"] else "direct I/O only")
            if result["cold"]["requested"]
            else "no"
        ),
        "limit: max(all-resident "
        + _fmt(lim["compute_ms_per_token"], ".0f")
        + " ms, oracle "
        + _fmt(lim["oracle_fetches_per_token"], ".1f")
        + " fetches x expert / bandwidth = "
        + _fmt(lim["transfer_ms_per_token"], ".0f")
        + " ms) per token",
        f"machine: {m.get('cpu')}, {m.get('cpus_available')} CPUs, "
        f"{ui.human_bytes(m.get('ram_bytes') or 0)} RAM" + (f", {m['gpu']}" if m.get("gpu") else ""),
    ]
    lines += [f"note: {n}" for n in result["notes"]]
    return lines
