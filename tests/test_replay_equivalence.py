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
from moeinf.runtime.policy import LfuPolicy, LruPolicy
from moeinf.runtime.routing_hooks import RoutingReplay
from moeinf.runtime.trace import make_trace

T = 24  # replayed tokens


def recording(base: type, log: list):
    class Recording(base):
        def on_insert(self, key):
            log.append(tuple(key))
            super().on_insert(key)

    return Recording()


@pytest.mark.parametrize("base", [LruPolicy, LfuPolicy])
@pytest.mark.parametrize("slots", [2, 5])
def test_runtime_and_simulator_fetch_the_same_experts(checkpoint, base, slots):
    stored = pull(str(checkpoint("mixtral")), name="mx")
    spec = stored.manifest.spec
    L, E, K = len(spec.moe_layers), spec.num_experts, spec.top_k
    assert spec.moe_layers == tuple(range(L))  # trace layer i is model layer i
    rng = np.random.default_rng(slots)
    experts = np.array([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(T)], np.int16)
    trace = make_trace([experts], num_experts=E)

    runtime: list = []
    layout = ExpertLayout(spec.hidden_size, spec.expert_dim, spec.dtype)

    def provider(stored_model, device, dtype):
        return ExpertCache(
            stored_model.expert_path,
            layout,
            slots=slots,
            policy=recording(base, runtime),
            device=device,
            dtype=dtype,
            bulk_threshold=K,
        )

    engine = Engine.load("mx", device="cpu", provider=provider)
    try:
        engine.decoder.set_routing_hook(RoutingReplay(trace, num_moe_layers=L, num_experts=E, top_k=K))
        # A one-token prompt, then T - 1 decode steps: T forwards of one token, one trace row each.
        complete(engine, [1], GenerationParams(max_tokens=T, ignore_eos=True))
    finally:
        engine.close()

    simulated: list = []
    simulate(trace, recording(base, simulated), capacity=slots / (L * E))
    assert len(runtime) > slots  # the pool was under pressure: evictions happened
    assert runtime == simulated
