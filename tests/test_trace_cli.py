"""`moeinf trace ...` through Typer's CliRunner: simulate (table and JSON) and the library commands."""

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from moeinf.cli.main import app
from moeinf.cli.trace import parse_capacities
from moeinf.runtime.trace import make_trace, write_trace
from moeinf.runtime.trace_library import open_model_library


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def trace_file(tmp_path):
    rng = np.random.default_rng(0)
    reqs = [
        np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(4)]) for _ in range(15)])
        for _ in range(4)
    ]
    return write_trace(make_trace(reqs, num_experts=8), tmp_path / "t.npz")


def test_simulate_json(trace_file, tmp_path):
    lib = write_trace(make_trace([np.zeros((3, 4, 2), int) + [0, 1]], num_experts=8), tmp_path / "lib.npz")
    result = invoke(
        "trace", "simulate", trace_file, "--library", lib, "--capacity", "25%,0.5",
        "--policies", "lru,lfu,trace,oracle", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["tokens"] == 60 and len(out["results"]) == 8
    for r in out["results"]:
        assert {"policy", "capacity", "slots", "fetches_per_token", "demand_misses_per_token"} <= set(r)
        assert r["fetches_per_token"] >= r["demand_misses_per_token"] >= 0
    by = {(r["policy"], r["capacity"]): r for r in out["results"]}
    assert by[("lru", 0.25)]["slots"] == 8 and by[("oracle", 0.5)]["slots"] == 16
    for cap in (0.25, 0.5):  # nothing beats Belady without bypass
        assert by[("lru", cap)]["fetches_per_token"] >= by[("oracle", cap)]["fetches_per_token"]


def test_simulate_several_files_as_one_trace(trace_file, tmp_path):
    """A server's rotated files (or any traces of one shape) replay as one trace, each file's prompt
    tokens left out by its own meta; a file of another shape is refused."""
    from moeinf.runtime.trace import Trace, read_trace

    whole = read_trace(trace_file)  # 4 requests of 15 tokens
    first = whole.select([0, 1])
    prompts = {**first.meta, "prefill_tokens": [2, 3]}  # per request, as run/serve --record-trace write it
    a = write_trace(Trace(first.experts, first.seq_offsets, prompts, first.probs), tmp_path / "a.npz")
    b = write_trace(whole.select([2, 3]), tmp_path / "b.npz")
    joined = invoke("trace", "simulate", a, b, "--capacity", "25%", "--policies", "lru,oracle", "--json")
    assert joined.exit_code == 0, joined.output
    out = json.loads(joined.stdout)
    assert out["tokens"] == 60 - 5 and out["requests"] == 4 and out["trace"] == [str(a), str(b)]
    keep = np.ones(60, dtype=bool)
    keep[[0, 1, 15, 16, 17]] = False  # the prompt tokens of requests 0 and 1
    alone = Trace(whole.experts[keep], np.array([0, 13, 25, 40, 55]), dict(whole.meta))
    single = invoke("trace", "simulate", write_trace(alone, tmp_path / "c.npz"), "--capacity", "25%",
                    "--policies", "lru,oracle", "--json")  # fmt: skip
    assert [r["fetches"] for r in json.loads(single.stdout)["results"]] == [
        r["fetches"] for r in out["results"]
    ]
    other = write_trace(make_trace([np.zeros((3, 2, 2), int) + [0, 1]], num_experts=8), tmp_path / "o.npz")
    bad = invoke("trace", "simulate", a, other)
    assert bad.exit_code != 0 and "different shapes" in bad.stderr


def test_simulate_table_per_layer(trace_file):
    result = invoke("trace", "simulate", trace_file, "--capacity", "50%", "--policies", "lru", "--per-layer")
    assert result.exit_code == 0, result.output
    assert "lru" in result.stdout and "50.0%" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--policies", "nope"], "unknown policy"),
        (["--capacity", "150%"], "capacity"),
        (["--capacity", "abc"], "bad capacity"),
    ],
)
def test_simulate_rejects_bad_options(trace_file, args, message):
    result = invoke("trace", "simulate", trace_file, *args)
    assert result.exit_code == 2 and message in result.stderr


def test_simulate_rejects_a_non_trace(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    result = invoke("trace", "simulate", tmp_path / "x.npz")
    assert result.exit_code == 2 and "not a routing trace" in result.stderr


def test_parse_capacities():
    assert parse_capacities("12.5%, 25%,0.5") == [0.125, 0.25, 0.5]


def test_simulate_does_not_import_torch(trace_file):
    code = (
        "import sys; from typer.testing import CliRunner; from moeinf.cli.main import app; "
        f"r = CliRunner().invoke(app, ['trace', 'simulate', {str(trace_file)!r}, '--json']); "
        "assert r.exit_code == 0, r.output; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_library_commands(checkpoint, tmp_path):
    from moeinf.pull import pull

    stored = pull(str(checkpoint("mixtral")), name="mx")
    assert invoke("trace", "list", "mx").stdout.startswith("no traces")
    lib = open_model_library(stored)
    spec = stored.spec
    for e in range(3):
        eam = np.zeros((spec.num_layers, spec.num_experts))
        eam[:, e] = 5
        eam[:, (e + 1) % spec.num_experts] = 5
        lib.add(eam)
    listed = invoke("trace", "list", "mx", "--json")
    assert listed.exit_code == 0 and len(json.loads(listed.stdout)) == 3
    shown = json.loads(invoke("trace", "show", "mx", "--json").stdout)
    assert shown["entries"] == 3 and shown["requests"] == 3 and len(shown["top_experts"]) == spec.num_layers
    assert "layer" in invoke("trace", "show", "mx").stdout
    out = tmp_path / "exported.npz"
    assert invoke("trace", "export", "mx", "-o", out).exit_code == 0 and out.exists()
    assert "cleared 3" in invoke("trace", "clear", "mx").stdout
    assert len(open_model_library(stored)) == 0
    missing = invoke("trace", "list", "nope")
    assert missing.exit_code != 0 and "nope" in missing.stderr
