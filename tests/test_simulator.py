"""Policy simulator: hook order as the cache, accounting identities, persistence, per-layer pools, time."""

from pathlib import Path

import numpy as np
import pytest

from moeinf.bench.simulator import make_sim_policy, simulate, simulate_grid, slots_for
from moeinf.errors import BadOption
from moeinf.runtime.expert_key import ExpertKey
from moeinf.runtime.policy import LruPolicy
from moeinf.runtime.trace import make_trace, read_trace
from moeinf.runtime.trace_library import TraceLibrary


def random_trace(seed=0, requests=3, T=12, L=4, E=8, K=2):
    rng = np.random.default_rng(seed)
    reqs = [
        np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])
        for _ in range(requests)
    ]
    return make_trace(reqs, num_experts=E)


class NextLayerPrefetcher(LruPolicy):
    """LRU that prefetches experts 0 and 1 of the next layer: a known plan for the accounting."""

    name = "lru+pf"

    def plan_prefetch(self, layer, expert_ids):
        return [ExpertKey(layer + 1, 0), ExpertKey(layer + 1, 1)] if layer + 1 < 4 else []


class Recorder(LruPolicy):
    """LRU that records the hook calls the simulator makes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def on_access(self, key, hit):
        self.calls.append(("access", key, hit))
        super().on_access(key, hit)

    def choose_victim(self, can_evict):
        victim = super().choose_victim(can_evict)
        self.calls.append(("victim", victim))
        return victim

    def plan_prefetch(self, layer, expert_ids):
        self.calls.append(("plan", layer, list(expert_ids)))
        return []


def test_hook_order_matches_the_cache():
    tr = make_trace([np.array([[[0, 1]], [[2, 0]]])], num_experts=4)  # one layer, top-2, 2 slots
    rec = Recorder()
    simulate(tr, rec, capacity=0.5)
    K = ExpertKey
    assert rec.calls == [
        ("access", K(0, 0), False),
        ("access", K(0, 1), False),
        ("plan", 0, [0, 1]),
        ("access", K(0, 2), False),  # all accesses of a layer come before any eviction
        ("access", K(0, 0), True),
        ("victim", K(0, 1)),  # K(0, 0) is running: not evictable although older
        ("plan", 0, [2, 0]),
    ]


@pytest.mark.parametrize("name", ["lru", "lfu", "trace", "oracle"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_accounting_identities(name, per_layer):
    tr = random_trace()
    result = simulate(tr, make_sim_policy(name, tr), capacity=0.5, per_layer=per_layer)
    d = result.to_dict()
    assert result.accesses == tr.num_tokens * 4 * 2
    assert d["fetches"] == result.demand_misses + result.prefetches_issued
    assert result.prefetches_used + result.prefetches_wasted == result.prefetches_issued
    assert result.bypasses <= result.demand_misses
    assert 0 <= d["hit_rate"] <= 1
    # Every demand miss is a compulsory or capacity miss: at least one per distinct expert.
    assert result.demand_misses >= len(set(map(tuple, np.argwhere(tr.eam(0) > 0))))


def test_prefetch_accounting():
    tr = random_trace(seed=1)
    result = simulate(tr, NextLayerPrefetcher(), capacity=0.5)
    assert result.prefetches_issued > 0 and result.prefetches_used > 0 and result.prefetches_wasted > 0
    assert result.prefetches_used + result.prefetches_wasted == result.prefetches_issued
    fetched = []
    again = simulate(tr, NextLayerPrefetcher(), capacity=0.5, on_fetch=lambda k, pf: fetched.append(pf))
    assert len(fetched) == again.fetches and sum(fetched) == again.prefetches_issued


def test_cache_persists_across_requests():
    x = random_trace(requests=1).experts
    tr = make_trace([x, x], num_experts=8)
    result = simulate(tr, LruPolicy(), capacity=1.0)
    distinct = int((tr.eam(0) > 0).sum())
    assert result.demand_misses == distinct  # the second request hits everything


def test_per_layer_pools_never_evict_another_layer():
    tr = random_trace(seed=2)
    evictions = []

    class Spy(LruPolicy):
        def choose_victim(self, can_evict):
            victim = super().choose_victim(can_evict)
            evictions.append((self.layer, victim))
            return victim

        def on_access(self, key, hit):
            self.layer = key.layer
            super().on_access(key, hit)

    simulate(tr, Spy(), capacity=0.25, per_layer=True)
    assert evictions and all(layer == victim.layer for layer, victim in evictions)


def test_bad_policy_that_evicts_a_running_expert_is_caught():
    class Bad(LruPolicy):
        def choose_victim(self, can_evict):
            return next(reversed(self._order))  # the running expert just used: ignores can_evict

    tr = make_trace([np.array([[[0, 1]], [[2, 0]]])], num_experts=4)
    with pytest.raises(RuntimeError, match="not evictable"):
        simulate(tr, Bad(), capacity=0.5)


def test_time_model_demand_only():
    tr = make_trace([np.array([[[0, 1], [2, 3]]] * 2)], num_experts=4)  # T=2, L=2, K=2
    result = simulate(tr, LruPolicy(), capacity=1.0, compute_ms_per_layer=1.0, transfer_ms_per_expert=10.0)
    # Token 1: each layer waits for two transfers (20 ms) then computes (1 ms); token 2 hits everything.
    assert result.time_ms == pytest.approx(2 * 21 + 2 * 1)


def test_time_model_overlaps_prefetch_with_compute():
    x = np.array([[[0, 1], [0, 1], [0, 1], [0, 1]]])  # T=1, L=4, K=2: prefetch of experts 0,1 is perfect
    tr = make_trace([x], num_experts=4)
    demand = simulate(tr, LruPolicy(), capacity=1.0, compute_ms_per_layer=30.0, transfer_ms_per_expert=10.0)
    ahead = simulate(
        tr, NextLayerPrefetcher(), capacity=1.0, compute_ms_per_layer=30.0, transfer_ms_per_expert=10.0
    )
    assert demand.time_ms == pytest.approx(4 * (20 + 30))
    assert ahead.prefetches_used == 6 and ahead.prefetches_wasted == 0
    assert ahead.time_ms == pytest.approx(20 + 4 * 30)  # later layers' transfers hide under compute


def test_grid_fills_the_bound_and_slots():
    tr = random_trace()
    results = simulate_grid(
        tr, ["lru", "oracle"], [0.25, 0.5], compute_ms_per_layer=0.5, transfer_ms_per_expert=14
    )
    assert [(r.policy, r.capacity, r.slots) for r in results] == [
        ("lru", 0.25, 8),
        ("oracle", 0.25, 8),
        ("lru", 0.5, 16),
        ("oracle", 0.5, 16),
    ]
    oracle = results[1]
    assert oracle.bound_ms_per_token == pytest.approx(max(4 * 0.5, oracle.per_token(oracle.fetches) * 14))
    assert results[0].fetches >= oracle.fetches


def test_slots_for():
    assert slots_for(0.25, 24, 32, 4, per_layer=False) == 192
    assert slots_for(0.25, 24, 32, 4, per_layer=True) == 24 * 8
    with pytest.raises(BadOption, match="top_k"):
        slots_for(0.05, 24, 32, 4, per_layer=True)
    with pytest.raises(BadOption, match="capacity"):
        slots_for(1.5, 24, 32, 4, per_layer=False)


SHARED = Path("/work/shared/traces/gpt-oss-20b.decode.dev.npz")


@pytest.mark.skipif(not SHARED.exists(), reason="shared gpt-oss trace not present")
def test_shared_trace_orders_policies():
    tr = read_trace(SHARED).select([0, 1, 2])
    lib = TraceLibrary.from_trace(read_trace(SHARED).select(list(range(100, 160))))
    fetches = {
        name: simulate(tr, make_sim_policy(name, tr, **opts), capacity=0.25).fetches
        for name, opts in (("lru", {}), ("trace", {"library": lib}), ("oracle", {}))
    }
    assert fetches["oracle"] < fetches["trace"] < fetches["lru"]


@pytest.mark.parametrize("name", ["lru", "lfu", "trace", "oracle"])
@pytest.mark.parametrize("capacity", [0.25, 0.5])
def test_batched_accesses_equal_per_key_calls(name, capacity):
    # The simulator's fast paths (on_accesses once per layer call, replace once per eviction) must
    # decide exactly as the separate calls the cache makes: a subclass that overrides on_access and
    # choose_victim forces those.
    tr = random_trace(seed=3, requests=4, T=30, L=4, E=8, K=2)
    fast = make_sim_policy(name, tr)

    class PerKey(type(fast)):
        def on_access(self, key, hit):
            super().on_access(key, hit)

        def choose_victim(self, can_evict):
            return super().choose_victim(can_evict)

    shape = {"num_layers": tr.num_layers, "num_experts": tr.num_experts, "top_k": tr.top_k}
    slow = (
        PerKey(tr.experts, tr.num_experts)
        if name == "oracle"
        else PerKey(**(shape if name != "oracle" else {}))
    )
    got, want = [], []
    a = simulate(tr, fast, capacity=capacity, on_fetch=lambda k, pf: got.append((k, pf)))
    b = simulate(tr, slow, capacity=capacity, on_fetch=lambda k, pf: want.append((k, pf)))
    assert len(got) > 8 * 4 // 2  # evictions happened
    assert got == want and (a.bypasses, a.time_ms) == (b.bypasses, b.time_ms)
