"""`moeinf run` against transformers beyond the six base families: odd shapes, chat-template prompts,
seeded sampling, stop strings, and errors (helpers shared with test_run_e2e.py)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moeinf.cli.main import app
from tests.fixtures.checkpoints import build_checkpoint
from tests.test_run_e2e import PROMPT, N, hf_greedy, hf_pair, run_json

pytest.importorskip("transformers")


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("qwen2_moe", {"norm_topk_prob": True, "num_experts_per_tok": 3, "num_experts": 7}),
        ("mixtral", {"num_experts_per_tok": 1, "num_local_experts": 5}),
    ],
)
def test_odd_shapes_through_the_cli(family, overrides, tmp_path):
    ckpt = build_checkpoint(family, tmp_path / f"{family}-odd", seed=3, **overrides)
    out = run_json(str(ckpt), PROMPT, "--raw", "--ignore-eos", "--max-tokens", str(N))
    model, tokenizer = hf_pair(ckpt)
    assert out["token_ids"] == hf_greedy(model, tokenizer(PROMPT)["input_ids"], N)


def test_chat_template_prompt_equals_transformers(checkpoint):
    ckpt = checkpoint("qwen3_moe")
    out = run_json(
        str(ckpt), "Hi there, expert", "--ignore-eos", "--max-tokens", "8", "--system", "Be brief."
    )
    model, tokenizer = hf_pair(ckpt)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, expert"}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt_ids = list(prompt_ids["input_ids"] if hasattr(prompt_ids, "keys") else prompt_ids)
    assert out["prompt_token_ids"] == prompt_ids
    assert out["token_ids"] == hf_greedy(model, prompt_ids, 8)


def test_seeded_sampling_is_reproducible_through_the_cli(checkpoint):
    ckpt = str(checkpoint("olmoe"))
    args = (
        ckpt,
        PROMPT,
        "--raw",
        "--ignore-eos",
        "--max-tokens",
        "24",
        "--temperature",
        "1.5",
        "--top-k",
        "100",
    )
    first = run_json(*args, "--seed", "11")
    again = run_json(*args, "--seed", "11")
    other = run_json(*args, "--seed", "12")
    assert first["token_ids"] == again["token_ids"] and first["text"] == again["text"]
    assert other["token_ids"] != first["token_ids"]


def test_stop_string_and_eos_through_the_cli(checkpoint):
    ckpt = str(checkpoint("mixtral"))
    full = run_json(ckpt, PROMPT, "--raw", "--ignore-eos", "--max-tokens", str(N))
    text = full["text"]
    stop = next(
        text[i : i + 2]
        for i in range(3, len(text) - 2)
        if text[i : i + 2].strip() and "\ufffd" not in text[i : i + 2]
    )
    cut = run_json(ckpt, PROMPT, "--raw", "--ignore-eos", "--max-tokens", str(N), "--stop", stop)
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.index(stop)]
    assert cut["token_ids"] == full["token_ids"][: len(cut["token_ids"])]


def test_unknown_model_is_a_one_line_error():
    result = CliRunner().invoke(app, ["run", "no-such-model", "hi"])
    assert result.exit_code != 0
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["run", "x", "hi", "--format", "yaml"])
    assert result.exit_code == 2 and "--format" in result.stderr


def test_record_trace_writes_the_routing_replayed_or_own(checkpoint, tmp_path):
    """--record-trace: one request per answer, every token (prompt and generated); under replay the
    recorded ids are the replayed ones."""
    import numpy as np

    from moeinf.runtime.trace import make_trace, read_trace, write_trace

    ckpt = str(checkpoint("mixtral"))
    own = tmp_path / "own.npz"
    out = run_json(ckpt, PROMPT, "--raw", "--ignore-eos", "--max-tokens", "5", "--record-trace", str(own))
    trace = read_trace(own)
    prompt = len(out["prompt_token_ids"])
    assert trace.num_requests == 1 and trace.meta["prefill_tokens"] == [prompt]
    assert trace.num_tokens == prompt + 4  # the last generated token is never fed back
    for extra, tokens in (([], 4), (["--with-prefill"], prompt + 4)):  # simulate: decode steps by default
        sim = CliRunner().invoke(app, ["trace", "simulate", str(own), "--policies", "lru", "--json", *extra])
        assert sim.exit_code == 0, sim.output
        assert json.loads(sim.stdout)["tokens"] == tokens
    L, K = trace.num_layers, trace.top_k
    rng = np.random.default_rng(0)
    E = trace.num_experts
    forced = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(40)])
    replayed = write_trace(make_trace([forced], num_experts=trace.num_experts), tmp_path / "in.npz")
    again = tmp_path / "again.npz"
    options = ["--raw", "--ignore-eos", "--max-tokens", "5", "--routing-trace", str(replayed)]
    run_json(ckpt, PROMPT, *options, "--record-trace", str(again))
    assert read_trace(again).experts.tolist() == forced[: prompt + 4].tolist()


def test_record_trace_into_a_directory_is_refused(checkpoint, tmp_path):
    ckpt = str(checkpoint("mixtral"))
    result = CliRunner().invoke(app, ["run", ckpt, "hi", "--record-trace", str(tmp_path)])
    assert result.exit_code != 0 and "is a directory" in result.output


def test_budget_beyond_available_ram_is_a_clear_error(checkpoint, monkeypatch):
    """--ram-mem 100% on a model bigger than the RAM available: exit 2 saying what to do, before any
    expert is loaded (the machine is made small: 1 KiB available beside the dense weights)."""
    from moeinf.runtime import cache_plan

    plan_cache = cache_plan.plan_cache

    def on_a_small_machine(spec, *, dense_bytes, **kw):
        monkeypatch.setattr(cache_plan, "available_ram", lambda: dense_bytes + 1024)
        return plan_cache(spec, dense_bytes=dense_bytes, **kw)

    monkeypatch.setattr(cache_plan, "plan_cache", on_a_small_machine)
    result = CliRunner().invoke(app, ["run", str(checkpoint("mixtral")), "hi", "--ram-mem", "100%"])
    assert result.exit_code == 2, result.output
    assert "Error: RAM budget 100% needs" in result.stderr and "lower --ram-mem" in result.stderr
