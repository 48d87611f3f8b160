"""One measured bench run, in its own process: `python -m moeinf.bench.worker < config.json`.

Loads the model with one policy's expert cache, generates every prompt of the workload (greedy,
ignoring EOS, `max_tokens` each) with routing replayed from a trace when one is given, and prints
one JSON line: per-prompt timings and per-token latencies, the expert cache's statistics of the
decode phase and of the whole run, Belady's (the oracle's) decode fetches on the run's own recorded
routing at the budget's slot count, and peak memory. A fresh process per run makes peak RSS and
cold starts honest. On failure it prints `{"error": message}` and exits non-zero.

`all-resident` is the cache with a 100% budget (each expert read at most once, then kept).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np

ALL_RESIDENT = "all-resident"
# Yardsticks under routing replay (runtime/oracle.py ReplayOracle): Belady's MIN, and MIN that also
# reads the experts of the next 2 layer steps ahead (perfect foresight: how far reads can hide).
ORACLES = {"oracle": 0, "oracle-prefetch": 2}


def run(config: dict[str, Any]) -> dict[str, Any]:
    """Measure one (policy, repeat); see the module docstring for the result's content."""
    import torch

    from moeinf.errors import BadOption
    from moeinf.runtime.cache_plan import cache_factory
    from moeinf.runtime.engine import Engine
    from moeinf.runtime.generate import GenerationParams, generate
    from moeinf.runtime.oracle import ReplayOracle
    from moeinf.runtime.routing_hooks import HookChain, RoutingRecorder, RoutingReplay
    from moeinf.runtime.sampling import SamplingParams
    from moeinf.runtime.trace import read_trace

    policy = config["policy"]
    plans: list = []
    trace = read_trace(config["routing_trace"]) if config.get("routing_trace") else None
    oracle = None
    if policy in ORACLES:
        if trace is None:
            raise BadOption(f"{policy} runs only with --routing-trace: the replayed trace is its future")
        oracle = ReplayOracle(trace.experts, trace.num_experts, prefetch_layers=ORACLES[policy])
    if policy == ALL_RESIDENT:
        factory = cache_factory(
            ram_mem="100%", gpu_mem="100%", policy="lru", on_plan=lambda p, c: plans.append(p)
        )
    else:
        factory = cache_factory(
            ram_mem=config.get("ram_mem"),
            gpu_mem=config.get("gpu_mem"),
            policy="oracle" if oracle is not None else policy,
            policy_object=oracle,
            on_plan=lambda p, c: plans.append(p),
        )
    engine = Engine.load(
        config["model"],
        device=config.get("device") or "auto",
        dtype=config.get("dtype"),
        threads=config.get("threads"),
        provider=factory,
    )
    try:
        spec = engine.spec
        assert spec is not None
        L, E, K = len(spec.moe_layers), spec.num_experts, spec.top_k
        recorder = RoutingRecorder(L, E, K)
        max_tokens = int(config["max_tokens"])
        tok = engine.tokenizer
        chat = tok.has_chat_template
        encoded = [
            tok.encode_chat([{"role": "user", "content": text}]) if chat else tok.encode(text)
            for _, text in config["prompts"]
        ]
        replay = None
        hooks: list = [recorder]
        if trace is not None:
            replay = RoutingReplay(trace, num_moe_layers=L, num_experts=E, top_k=K)
            # Decode replays trace request i from its first token; prefill takes the tokens before.
            offsets = trace.seq_offsets
            starts = [int(offsets[i % trace.num_requests]) - len(ids) for i, ids in enumerate(encoded)]
            hooks = [replay, recorder]
            if oracle is not None:  # its future: each prompt's forwards, one trace row per token fed
                fed = [len(ids) + max_tokens - 1 for ids in encoded]
                rows = [np.arange(s, s + n) for s, n in zip(starts, fed, strict=True)]
                oracle.plan(np.concatenate(rows) % trace.num_tokens, spec.moe_layers)
                hooks.insert(1, oracle)
        engine.decoder.set_routing_hook(HookChain(hooks) if len(hooks) > 1 else recorder)
        provider = engine.provider
        params = GenerationParams(
            max_tokens=max_tokens, ignore_eos=True, sampling=SamplingParams(temperature=0.0)
        )
        prompts, recorded = [], []
        decode = _zero_totals()
        for i, (name, _) in enumerate(config["prompts"]):
            engine.reset()
            ids = encoded[i]
            if replay is not None:
                replay.seek(starts[i])
            steps_ms: list[float] = []
            after_prefill = None
            last = None
            for last in generate(engine, ids, params):
                if last.index == 0:
                    after_prefill = _totals(engine)
                else:
                    steps_ms.append(last.timings.step_s * 1000)
            assert last is not None and after_prefill is not None
            _add(decode, _totals(engine), after_prefill)
            routing = recorder.end_request()
            if routing is not None:
                recorded.append((routing, len(ids)))
            prompts.append(
                {
                    "name": name,
                    "prompt_tokens": len(ids),
                    "ttft_s": last.timings.prompt_s,
                    "decode_tokens": last.timings.decode_tokens,
                    "decode_s": last.timings.decode_s,
                    "step_ms": steps_ms,
                }
            )
        result: dict[str, Any] = {
            "policy": policy,
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "threads": engine.threads,
            "load_s": engine.load_s,
            "num_moe_layers": L,
            "num_experts": E,
            "top_k": K,
            "expert_bytes": plans[0].layout.data_bytes if plans else 0,
            "slots": plans[0].slots if plans else 0,
            "plan": plans[0].reasons if plans else [],
            "read_mode": getattr(getattr(provider, "reader", None), "mode", None),
            "prompts": prompts,
            "decode": decode,
            "cache": engine.cache_stats(),
        }
        budget_slots = _budget_slots(engine, config)
        result["oracle"] = _oracle(recorded, E, budget_slots)
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["peak_gpu_bytes"] = (
            torch.cuda.max_memory_allocated(engine.device) if engine.device.type == "cuda" else None
        )
        return result
    finally:
        engine.close()


def _zero_totals() -> dict[str, float]:
    from moeinf.runtime.cache_stats import LayerStats

    return {k: 0 for k in asdict(LayerStats())}


def _totals(engine) -> dict[str, float]:
    """The cache's whole-run totals now (no per-layer detail); zeros without a cache."""
    stats = engine.cache_stats()
    base = _zero_totals()
    return {k: stats.get(k, 0) for k in base}


def _add(acc: dict[str, float], end: dict[str, float], start: dict[str, float]) -> None:
    for k in acc:
        acc[k] += end[k] - start[k]


def _budget_slots(engine, config: dict[str, Any]) -> int:
    """Slots of the compute tier that the bench's budget (--ram-mem / --gpu-mem) buys for this model."""
    from moeinf.runtime.cache_plan import plan_cache
    from moeinf.runtime.slot_pool import torch_dtype

    stored, spec = engine.stored, engine.spec
    itemsize = torch_dtype(spec.dtype).itemsize
    dense = stored.dense_path.stat().st_size * engine.dtype.itemsize // itemsize
    plan = plan_cache(
        spec,
        dense_bytes=dense,
        device=engine.device,
        dtype=engine.dtype,
        ram_mem=config.get("ram_mem"),
        gpu_mem=config.get("gpu_mem"),
        policy="lru",
    )
    return plan.slots


def _oracle(requests: list[tuple[np.ndarray, int]], num_experts: int, slots: int) -> dict[str, Any]:
    """Belady's fetches during decode at `slots` slots (one pool shared by all layers, persisting
    across requests, empty at the start). `requests` are (routing [T, L, K] of prefill + decode, prefill
    length): Belady sees the prefill too (as the real cache enters decode holding prefill's experts),
    and only fetches at decode tokens are counted."""
    from moeinf.bench.simulator import simulate
    from moeinf.runtime.oracle import OraclePolicy
    from moeinf.runtime.trace import make_trace

    requests = [(r, p) for r, p in requests if len(r) > p]
    if not requests:
        return {"slots": slots, "fetches": 0, "tokens": 0, "accesses": 0}
    trace = make_trace([r for r, _ in requests], num_experts=num_experts)
    per_row = trace.num_layers * trace.top_k  # accesses per token: top-k ids are distinct
    decode_row = np.zeros(trace.num_tokens, dtype=bool)
    offsets = trace.seq_offsets
    for i, (_, prefill) in enumerate(requests):
        decode_row[int(offsets[i]) + prefill : int(offsets[i + 1])] = True

    class Counting(OraclePolicy):
        accesses = 0

        def on_access(self, key, hit: bool) -> None:
            super().on_access(key, hit)
            self.accesses += 1

    policy = Counting(trace.experts, num_experts)
    fetches = 0

    def on_fetch(key, prefetch: bool) -> None:
        nonlocal fetches
        fetches += bool(decode_row[(policy.accesses - 1) // per_row])

    capacity = slots / (trace.num_layers * num_experts)
    result = simulate(trace, policy, capacity=capacity, on_fetch=on_fetch)
    return {
        "slots": result.slots,
        "fetches": fetches,
        "fetches_with_prefill": result.fetches,
        "tokens": int(decode_row.sum()),
        "accesses": result.accesses,
    }


def main() -> int:
    from moeinf.errors import MoeinfError

    config = json.loads(sys.stdin.read())
    start = time.perf_counter()
    try:
        result = run(config)
    except MoeinfError as exc:
        print(
            json.dumps({"error": str(exc), "kind": type(exc).__name__, "exit_code": exc.exit_code}),
            flush=True,
        )
        return 1
    result["wall_s"] = time.perf_counter() - start
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
