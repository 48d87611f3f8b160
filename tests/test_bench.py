"""`moeinf bench`: every figure present, the cache accounting consistent, the baselines behaving as
their names say. Measured runs go in-process here (fast); one test goes through the CLI and the
worker subprocess."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
from typer.testing import CliRunner

from moeinf.bench import worker
from moeinf.bench.create import create
from moeinf.bench.runner import BenchConfig, resolve_policies, run_bench
from moeinf.bench.summary import physical_limit, run_figures
from moeinf.bench.synthetic import parse_shape
from moeinf.bench.workload import BUILTIN_PROMPTS, read_prompts
from moeinf.cli.bench import COLUMNS, table_rows
from moeinf.cli.main import app
from moeinf.errors import BadOption, BenchRunFailed
from moeinf.runtime.trace import make_trace, write_trace
from moeinf.store import Store

L, E, K = 3, 8, 2
POLICIES = ["all-resident", "naive", "lru", "lfu", "trace"]
SUMMARY_FIELDS = {
    "ttft_s",
    "decode_tps",
    "ms_per_token",
    "latency_ms_p10",
    "latency_ms_p50",
    "latency_ms_p90",
    "hit_rate",
    "fetches_per_token",
    "bytes_read_per_token",
    "stall_share",
    "peak_rss_bytes",
    "peak_gpu_bytes",
    "oracle_fetches_per_token",
    "of_limit",
    "slots",
}


@pytest.fixture
def model(checkpoint):
    create("tiny", parse_shape(f"{L}x{E}x{K}", hidden=64, expert_dim=32), tokenizer_dir=checkpoint("mixtral"))
    return "tiny"


def in_process(config: BenchConfig, policy: str) -> dict:
    return worker.run({**asdict(config), "policy": policy, "device": "cpu", "threads": 1})


def bench(model: str, **options) -> dict:
    policies, _ = resolve_policies(options.pop("policies", POLICIES), replay="routing_trace" in options)
    config = BenchConfig(model=model, policies=policies, prompts=list(BUILTIN_PROMPTS[:2]), max_tokens=6)
    for key, value in options.items():
        setattr(config, key, value)
    return run_bench(config, worker=in_process)


def test_bench_json_has_every_figure_and_consistent_accounting(model):
    result = bench(model, ram_mem="25%")
    top = {"model", "shape", "machine", "config", "read_bandwidth", "policies", "limit", "runs", "cold"}
    assert set(result) >= top
    assert set(result["policies"]) == set(POLICIES)
    for policy, summary in result["policies"].items():
        assert SUMMARY_FIELDS <= set(summary), policy
        assert summary["decode_tps"] > 0 and summary["peak_rss_bytes"] > 0
    assert result["limit"]["tokens_per_s"] > 0
    bw = result["read_bandwidth"]
    runs = sum(len(r) for r in result["runs"].values())
    assert bw["bytes_per_s"] > 0 and bw["probes"] == runs == len(bw["probes_bytes_per_s"])  # one per run
    assert min(bw["probes_bytes_per_s"]) <= bw["bytes_per_s"] <= max(bw["probes_bytes_per_s"])
    json.dumps(result)  # --json prints it as is
    assert result["trace_library_entries"] == 0
    assert not (Store().open(model).path / "traces" / "library.npz").exists()  # left as found

    expert_bytes = result["shape"]["expert_bytes"]
    assert expert_bytes == 3 * 64 * 32 * 2
    for policy, (run,) in result["runs"].items():
        for stats in [run["decode"], run["cache"], *run["cache"]["per_layer"].values()]:
            assert stats["hits"] + stats["misses"] == stats["requests"], policy
        if policy != "trace":  # no prefetching: every fetch is a miss
            whole = run["cache"]
            assert whole["prefetch_issued"] == 0
            assert whole["bytes_read"] == whole["misses"] * expert_bytes
            assert run["decode"]["bytes_read"] == run["decode"]["misses"] * expert_bytes
        tokens = sum(p["decode_tokens"] for p in run["prompts"])
        assert tokens == 2 * 5  # max_tokens 6: one token from the prefill, five decode steps
        assert run["decode"]["requests"] == tokens * L * K  # top-k ids are distinct


def test_naive_reads_every_routed_expert_and_all_resident_each_at_most_once(model):
    result = bench(model, policies=["naive", "all-resident"], max_tokens=8, ram_mem="100%")
    naive, resident = result["runs"]["naive"][0], result["runs"]["all-resident"][0]
    for stats in (naive["decode"], naive["cache"]):
        assert stats["hits"] == 0 and stats["misses"] == stats["requests"] > 0
    assert result["policies"]["naive"]["hit_rate"] == 0
    assert resident["slots"] == L * E
    for stats in resident["cache"]["per_layer"].values():
        assert stats["misses"] <= E  # each expert read at most once, then kept
    assert resident["cache"]["bytes_read"] <= L * E * result["shape"]["expert_bytes"]
    # With room for every expert, Belady fetches exactly the first uses, as the cache does.
    assert resident["oracle"]["slots"] == L * E
    assert resident["oracle"]["fetches"] == resident["decode"]["misses"]
    assert resident["oracle"]["fetches_with_prefill"] == resident["cache"]["misses"]
    # Output never depends on the cache: both saw the same routing, so the same demand.
    assert naive["decode"]["requests"] == resident["decode"]["requests"]


def test_replayed_routing_drives_the_cache(model, tmp_path):
    rng = np.random.default_rng(0)
    requests = [np.stack([np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(40)])]
    trace_file = write_trace(make_trace(requests, num_experts=E), tmp_path / "t.npz")
    # A trace using only experts 0 and 1: at 100% the cache reads at most those two per layer.
    fixed = np.tile(np.array([0, 1]), (30, L, 1))
    fixed_file = write_trace(make_trace([fixed], num_experts=E), tmp_path / "f.npz")
    result = bench(model, policies=["all-resident"], routing_trace=str(fixed_file))
    run = result["runs"]["all-resident"][0]
    assert run["decode"]["misses"] <= L * 2 and run["decode"]["requests"] == 10 * L * K
    assert run["oracle"]["fetches"] <= L * 2
    # Replay is deterministic: two runs of a policy see the same fetches.
    a = bench(model, policies=["lru"], routing_trace=str(trace_file))["runs"]["lru"][0]["decode"]
    b = bench(model, policies=["lru"], routing_trace=str(trace_file))["runs"]["lru"][0]["decode"]
    assert (a["misses"], a["requests"]) == (b["misses"], b["requests"])


def test_oracle_runs_under_replay_and_fetches_least(model, tmp_path):
    rng = np.random.default_rng(1)
    requests = [np.stack([np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(60)])]
    trace_file = write_trace(make_trace(requests * 2, num_experts=E), tmp_path / "t.npz")
    policies = ["lru", "lfu", "oracle", "oracle-prefetch"]
    result = bench(model, policies=policies, routing_trace=str(trace_file), max_tokens=12)
    runs = {p: r[0] for p, r in result["runs"].items()}
    oracle = runs["oracle"]
    # Belady's MIN: no demand-fetching policy (no prefetch, no bypass) fetches fewer, prefill included.
    assert oracle["cache"]["misses"] <= min(runs["lru"]["cache"]["misses"], runs["lfu"]["cache"]["misses"])
    assert oracle["cache"]["misses"] < runs["lru"]["cache"]["misses"]  # the budget is tight enough to tell
    assert oracle["cache"]["prefetch_issued"] == 0 and oracle["decode"]["bypassed"] == 0
    assert oracle["decode"]["requests"] == runs["lru"]["decode"]["requests"]  # the same routing
    assert "oracle" in result["policies"]
    ahead = runs["oracle-prefetch"]["decode"]  # the same reads, started before the layers ask
    assert ahead["prefetch_used"] > 0 and ahead["misses"] < oracle["decode"]["misses"]
    config = BenchConfig(model=model, policies=["oracle"], prompts=list(BUILTIN_PROMPTS[:1]), max_tokens=2)
    with pytest.raises(BadOption, match="routing-trace"):
        in_process(config, "oracle")  # the worker refuses it without a future to know


def test_all_resident_is_skipped_when_the_experts_do_not_fit(model):
    """On a model larger than memory (moeinf's case) the all-resident yardstick is refused by the
    cache plan; the bench goes on without it and says why, instead of failing or swapping."""

    def worker_without_room(config: BenchConfig, policy: str) -> dict:
        if policy == "all-resident":
            message = (
                "bench run of all-resident: RAM budget 100% needs 90.0 GiB for 768 experts, but only 30.0 GiB"
            )
            raise BenchRunFailed(message, kind="BudgetTooLarge")
        return in_process(config, policy)

    config = BenchConfig(
        model=model, policies=["all-resident", "lru"], prompts=list(BUILTIN_PROMPTS[:1]), max_tokens=3
    )
    config.repeat = 2
    result = run_bench(config, worker=worker_without_room)
    assert list(result["policies"]) == ["lru"] and len(result["runs"]["lru"]) == 2
    assert any(n.startswith("skipped: bench run of all-resident: RAM budget 100%") for n in result["notes"])
    assert not any("it needs all-resident in --policies" in n for n in result["notes"])  # it was there
    assert result["limit"]["tokens_per_s"] is None
    with pytest.raises(BenchRunFailed, match="disk"):  # any other failure still stops the bench

        def failing(config: BenchConfig, policy: str) -> dict:
            raise BenchRunFailed("bench run of all-resident: disk", kind="OSError")

        run_bench(
            BenchConfig(model=model, policies=["all-resident"], prompts=["x"], max_tokens=3), worker=failing
        )


def test_worker_reports_the_error_class(model, monkeypatch, capsys):
    import io

    config = {"model": model, "policy": "oracle", "prompts": [["p", "x"]], "max_tokens": 2, "device": "cpu"}
    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps(config)))
    assert worker.main() == 1
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["kind"] == "BadOption" and "routing-trace" in out["error"]


def test_physical_limit_is_the_larger_bound():
    summaries = {"all-resident": {"ms_per_token": 10.0, "oracle_fetches_per_token": 4.0}}
    limit = physical_limit(summaries, bandwidth_bytes_s=1e9, expert_bytes=5_000_000)
    assert limit["transfer_ms_per_token"] == pytest.approx(20.0)
    assert limit["ms_per_token"] == pytest.approx(20.0) and limit["tokens_per_s"] == pytest.approx(50.0)
    limit = physical_limit(summaries, bandwidth_bytes_s=1e11, expert_bytes=5_000_000)
    assert limit["ms_per_token"] == pytest.approx(10.0)
    # Without all-resident the compute part is unknown: no limit (a transfer-only bound of 0.2 ms
    # would put every policy at a few percent of it), the transfer part still reported.
    limit = physical_limit(
        {"lru": {"oracle_fetches_per_token": 4.0}}, bandwidth_bytes_s=1e11, expert_bytes=5_000_000
    )
    assert limit["ms_per_token"] is None and limit["tokens_per_s"] is None
    assert limit["transfer_ms_per_token"] == pytest.approx(0.2)


def test_run_figures_per_token_and_percentiles():
    run = {
        "prompts": [
            {"ttft_s": 0.5, "decode_tokens": 2, "decode_s": 0.2, "step_ms": [100.0, 100.0]},
            {"ttft_s": 0.3, "decode_tokens": 2, "decode_s": 0.6, "step_ms": [300.0, 300.0]},
        ],
        "decode": {
            "requests": 16,
            "hits": 12,
            "misses": 4,
            "prefetch_issued": 2,
            "bytes_read": 600,
            "stall_s": 0.4,
        },
        "oracle": {"fetches": 2, "tokens": 4},
        "peak_rss_bytes": 1,
        "load_s": 0.1,
    }
    f = run_figures(run)
    assert f["decode_tps"] == pytest.approx(5.0) and f["ms_per_token"] == pytest.approx(200.0)
    assert f["latency_ms_p50"] == pytest.approx(200.0) and f["ttft_s"] == pytest.approx(0.4)
    assert f["hit_rate"] == 0.75 and f["fetches_per_token"] == 1.5 and f["bytes_read_per_token"] == 150
    assert f["stall_share"] == pytest.approx(0.5) and f["oracle_fetches_per_token"] == 0.5


def test_policies_and_prompts_are_validated(tmp_path):
    assert resolve_policies(["lru", "naive", "lru"])[0] == ["lru", "naive"]
    assert "oracle" in resolve_policies(["lru", "oracle"])[1][0]  # needs replay: skipped, with a note
    assert resolve_policies(["lru", "oracle"], replay=True) == (["lru", "oracle"], [])
    with pytest.raises(BadOption, match="unknown policy"):
        resolve_policies(["fifo"])
    f = tmp_path / "p.jsonl"
    f.write_text('{"name": "a", "prompt": "hello"}\n\nplain line\n')
    assert read_prompts(f) == [("a", "hello"), ("p2", "plain line")]
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(BadOption):
        read_prompts(tmp_path / "empty")


def test_plot_without_matplotlib_says_how_to_install(model):
    try:
        import matplotlib  # noqa: F401

        pytest.skip("matplotlib is installed")
    except ImportError:
        pass
    result = CliRunner().invoke(app, ["bench", model, "--plot", "x.png"])
    assert result.exit_code != 0 and "pip install matplotlib" in result.stderr


def test_bench_cli_runs_workers_in_subprocesses(model):
    result = CliRunner().invoke(app, ["bench", model, "--policies", "lru", "--max-tokens", "3", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    run = out["runs"]["lru"][0]
    assert run["peak_rss_bytes"] > 0 and run["read_mode"] in ("direct", "buffered")
    rows = table_rows(out)
    assert [row[0] for row in rows] == ["lru", "limit"] and all(len(row) == len(COLUMNS) for row in rows)
    assert out["limit"]["tokens_per_s"] is None and out["policies"]["lru"]["of_limit"] is None
    assert any("all-resident" in note for note in out["notes"])


def test_bad_options_fail_before_any_run(model):
    """Flags are checked before the model is probed or a worker starts (none is called here)."""

    def no_worker(config: BenchConfig, policy: str) -> dict:
        raise AssertionError("a worker ran")

    bad = [{"ram_mem": "200%"}, {"gpu_mem": "lots"}, {"repeat": 0}, {"max_tokens": 1}]
    for options in bad:
        config = BenchConfig(model=model, policies=["lru"], prompts=list(BUILTIN_PROMPTS[:1]), max_tokens=3)
        for key, value in options.items():
            setattr(config, key, value)
        with pytest.raises(BadOption):
            run_bench(config, worker=no_worker)
