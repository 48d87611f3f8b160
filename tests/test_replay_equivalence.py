"""Routing replay through the real runtime and through the simulator, with the same policy and slot
count, fetch the very same experts in the very same order (issue 8, section 5)."""

from __future__ import annotations

import numpy as np
import pytest

from moeinf.bench.simulator import simulate
from moeinf.pull import pull
from moeinf.runtime.engine import Engine
from moeinf.runtime.expert_cache import ExpertCache
from moeinf.runtime.expert_store import ExpertLayout
from moeinf.runtime.generate import GenerationParams, complete
from moeinf.runtime.oracle import OraclePolicy, ReplayOracle
from moeinf.runtime.policy import LfuPolicy, LruPolicy
from moeinf.runtime.routing_hooks import HookChain, RoutingReplay
from moeinf.runtime.trace import make_trace

T = 24  # replayed tokens


def recording(base: type, log: list, *args, **kwargs):
    class Recording(base):
        def on_insert(self, key):
            log.append(tuple(key))
            super().on_insert(key)

    return Recording(*args, **kwargs)


def replay_both(checkpoint, slots: int, runtime_policy, simulated_policy, stats: dict | None = None):
    """Replay a random trace of T tokens through the runtime and the simulator at `slots` slots; the
    policy factories take (log, trace) and return a policy that logs its inserts there. Returns both
    logs; `stats` receives the runtime cache's statistics."""
    stored = pull(str(checkpoint("mixtral")), name="mx")
    spec = stored.manifest.spec
    L, E, K = len(spec.moe_layers), spec.num_experts, spec.top_k
    assert spec.moe_layers == tuple(range(L))  # trace layer i is model layer i
    rng = np.random.default_rng(slots)
    experts = np.array([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(T)], np.int16)
    trace = make_trace([experts], num_experts=E)

    runtime: list = []
    layout = ExpertLayout(spec.hidden_size, spec.expert_dim, spec.dtype)
    policy = runtime_policy(runtime, trace)

    def provider(stored_model, device, dtype):
        return ExpertCache(
            stored_model.expert_path,
            layout,
            slots=slots,
            policy=policy,
            device=device,
            dtype=dtype,
            bulk_threshold=K,
        )

    engine = Engine.load("mx", device="cpu", provider=provider)
    try:
        replay = RoutingReplay(trace, num_moe_layers=L, num_experts=E, top_k=K)
        hook = HookChain([replay, policy]) if isinstance(policy, ReplayOracle) else replay
        engine.decoder.set_routing_hook(hook)
        # A one-token prompt, then T - 1 decode steps: T forwards of one token, one trace row each.
        complete(engine, [1], GenerationParams(max_tokens=T, ignore_eos=True))
        if stats is not None:
            stats.update(engine.cache_stats())
    finally:
        engine.close()

    simulated: list = []
    simulate(trace, simulated_policy(simulated, trace), capacity=slots / (L * E))
    assert len(runtime) > slots  # the pool was under pressure: evictions happened
    return runtime, simulated


@pytest.mark.parametrize("base", [LruPolicy, LfuPolicy])
@pytest.mark.parametrize("slots", [2, 5])
def test_runtime_and_simulator_fetch_the_same_experts(checkpoint, base, slots):
    runtime, simulated = replay_both(
        checkpoint, slots, lambda log, _: recording(base, log), lambda log, _: recording(base, log)
    )
    assert runtime == simulated


@pytest.mark.parametrize("slots", [2, 5])
def test_runtime_oracle_under_replay_fetches_as_the_simulators(checkpoint, slots):
    """The runtime's Belady (told the replay's rows) and the simulator's (told the access sequence)."""

    def runtime_oracle(log, trace):
        oracle = recording(ReplayOracle, log, trace.experts, trace.num_experts)
        oracle.plan(np.arange(T))
        return oracle

    def simulated_oracle(log, trace):
        return recording(OraclePolicy, log, trace.experts, trace.num_experts)

    runtime, simulated = replay_both(checkpoint, slots, runtime_oracle, simulated_oracle)
    assert runtime == simulated


def test_runtime_oracle_refuses_a_replay_off_its_plan(checkpoint):
    def off_plan(log, trace):
        oracle = recording(ReplayOracle, log, trace.experts, trace.num_experts)
        oracle.plan(np.arange(1, T + 1) % T)  # one row off
        return oracle

    with pytest.raises(RuntimeError, match="plan does not match"):
        replay_both(
            checkpoint, 2, off_plan, lambda log, t: recording(OraclePolicy, log, t.experts, t.num_experts)
        )


def test_runtime_oracle_prefetch_reads_ahead_what_belady_reads_on_demand(checkpoint):
    """`prefetch_layers`: the experts of the coming layer steps are read before they are asked for."""
    runs = {}
    for ahead in (0, 2):
        runs[ahead] = {}

        def oracle(log, trace, ahead=ahead):
            policy = recording(ReplayOracle, log, trace.experts, trace.num_experts, prefetch_layers=ahead)
            policy.plan(np.arange(T))
            return policy

        simulated = lambda log, t: recording(OraclePolicy, log, t.experts, t.num_experts)  # noqa: E731
        replay_both(checkpoint, 5, oracle, simulated, runs[ahead])
    assert runs[0]["prefetch_issued"] == 0
    assert runs[2]["prefetch_used"] > 0 and runs[2]["misses"] < runs[0]["misses"]
