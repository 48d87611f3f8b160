"""The trace policy: never evicts the running layer, values layer distance and reuse, learns a library."""

import numpy as np
import pytest

from moeinf.bench.simulator import simulate
from moeinf.runtime.expert_key import ExpertKey as K
from moeinf.runtime.oracle import OraclePolicy
from moeinf.runtime.policy import POLICIES, LruPolicy, make_policy
from moeinf.runtime.routing_counts import routing_statistics
from moeinf.runtime.trace import make_trace
from moeinf.runtime.trace_library import TraceLibrary
from moeinf.runtime.trace_policy import TracePolicy


def step(policy, layer, experts, insert=True):
    """One layer call as the cache makes it: accesses, inserts of misses, the prefetch plan."""
    for e in experts:
        policy.on_access(K(layer, e), hit=False)
    if insert:
        for e in experts:
            policy.on_insert(K(layer, e))
    return policy.plan_prefetch(layer, experts)


def test_registered_and_made_by_name():
    assert "trace" in POLICIES
    assert make_policy("trace").name == "trace"
    lib = TraceLibrary(2, 4, 1)
    assert make_policy("trace", library=lib).library is lib


def test_never_evicts_the_running_layer():
    p = TracePolicy(num_layers=2, num_experts=4, top_k=2, bypass=False, prefetch=0)
    step(p, 0, [0, 1])
    step(p, 1, [0, 1])
    for e in (0, 1):
        p.on_access(K(0, e), hit=True)  # token 2, layer 0 running with its experts resident
    running = {K(0, 0), K(0, 1)}
    victim = p.choose_victim(lambda k: k not in running)
    assert victim is not None and victim not in running
    assert p.choose_victim(lambda k: False) is None


def test_prefers_the_layer_that_runs_later():
    # Two experts with the same history: the one whose layer runs next is kept.
    p = TracePolicy(num_layers=4, num_experts=4, top_k=1, bypass=False, prefetch=0)
    for layer in range(4):
        step(p, layer, [0])
    p.on_access(K(0, 0), hit=True)  # token 2 has run layer 0; layer 1 is next, layer 3 furthest
    assert p.choose_victim(lambda k: k != K(0, 0)) == K(3, 0)


def test_prefers_experts_that_are_reused():
    p = TracePolicy(num_layers=1, num_experts=8, top_k=2, bypass=False, prefetch=0)
    step(p, 0, [0, 1])
    for _ in range(5):  # expert 0 is used every token, expert 1 never again
        p.on_access(K(0, 0), hit=True)
        p.on_access(K(0, 2 + _ % 2), hit=False)
        if _ < 2:
            p.on_insert(K(0, 2 + _ % 2))
        p.plan_prefetch(0, [0, 2 + _ % 2])
    running = {K(0, 0), K(0, 3)}
    assert p.choose_victim(lambda k: k not in running) == K(0, 1)


def test_bypasses_a_one_off_when_residents_are_hot():
    p = TracePolicy(num_layers=1, num_experts=16, top_k=2, prefetch=0, prior_weight=0.0)
    for _ in range(20):  # experts 0..3 alternate pairs every token: all hot
        ids = [0, 1] if _ % 2 == 0 else [2, 3]
        for e in ids:
            p.on_access(K(0, e), hit=_ >= 2)
            if _ < 2:
                p.on_insert(K(0, e))
        p.plan_prefetch(0, ids)
    p.on_access(K(0, 0), hit=True)
    p.on_access(K(0, 9), hit=False)  # first ever use of expert 9: a one-off
    assert p.should_bypass(K(0, 9))
    assert not TracePolicy(bypass=False).should_bypass(K(0, 9))


def cyclic_trace(tokens=60, L=4, E=8, K=2, seed=0):
    """Each layer keeps a small working set that drifts slowly: reuse with a sweep over layers."""
    rng = np.random.default_rng(seed)
    sets = [list(rng.choice(E, 3, replace=False)) for _ in range(L)]
    x = np.zeros((tokens, L, K), dtype=np.int64)
    for t in range(tokens):
        for layer in range(L):
            if rng.random() < 0.1:
                sets[layer][rng.integers(0, 3)] = int(rng.integers(0, E))
            ids = list(dict.fromkeys(rng.permutation(sets[layer]).tolist()))
            while len(ids) < K:
                ids.append(int(rng.integers(0, E)))
                ids = list(dict.fromkeys(ids))
            x[t, layer] = ids[:K]
    return x


def test_does_not_thrash_where_lru_does():
    # Every token routes each layer to the same two experts: 12 experts in a cycle, 6 slots. LRU
    # always evicts the expert needed soonest and misses everything; expected time to next use keeps
    # a stable subset resident, as Belady does.
    x = np.tile(np.array([[[2 * i % 8, (2 * i + 1) % 8] for i in range(6)]]), (40, 1, 1))  # [40, 6, 2]
    tr = make_trace([x[:20], x[20:]], num_experts=8)
    lru = simulate(tr, LruPolicy(), capacity=0.125)
    oracle = simulate(tr, OraclePolicy(tr.experts, 8), capacity=0.125)
    trace = simulate(tr, TracePolicy(), capacity=0.125)  # raises if a victim were running
    assert lru.demand_misses == lru.accesses
    assert trace.fetches < 0.8 * lru.fetches
    assert trace.fetches <= 1.5 * oracle.fetches


def test_learns_requests_into_the_library():
    tr = make_trace([cyclic_trace(tokens=10, seed=s) for s in range(3)], num_experts=8)
    lib = TraceLibrary(4, 8, 2, merge_similarity=1.1)
    policy = TracePolicy(library=lib)
    simulate(tr, policy, capacity=0.5)
    assert len(lib) == 3
    assert np.array_equal(lib.eams[0], tr.eam(0))
    frozen = TraceLibrary(4, 8, 2)
    simulate(tr, TracePolicy(library=frozen, learn=False), capacity=0.5)
    assert len(frozen) == 0


@pytest.mark.parametrize("capacity", [0.25])
def test_prefetch_plan_names_only_missing_next_layer_experts(capacity):
    tr = make_trace([cyclic_trace(tokens=30, seed=7)], num_experts=8)
    plans = []

    class Spy(TracePolicy):
        def plan_prefetch(self, layer, expert_ids):
            plan = super().plan_prefetch(layer, expert_ids)
            plans.append((layer, plan, set(self._resident)))
            return plan

    simulate(tr, Spy(prefetch=2, prefetch_threshold=0.3), capacity=capacity)
    assert any(plan for _, plan, _ in plans)
    for layer, plan, resident in plans:
        assert len(plan) <= 2
        assert all(k.layer == layer + 1 and k not in resident for k in plan)


def lookahead_setup():
    shape = {"num_layers": 3, "num_experts": 8, "top_k": 1}
    p = TracePolicy(**shape, bypass=False, prefetch=2, lookahead_p=0.99, streak_lag=0)
    step(p, 0, [0])
    step(p, 1, [3])
    step(p, 2, [0])
    for t in range(5):  # layer 1 moves on to expert 4; expert 3 stays resident, unused
        step(p, 0, [0], insert=False)
        step(p, 1, [4], insert=t == 0)
        step(p, 2, [0], insert=False)
    p.on_access(K(0, 0), hit=True)  # the next token runs layer 0
    return p


def test_router_lookahead_protects_predicted_experts():
    def not_running(k):
        return k != K(0, 0)

    assert lookahead_setup().choose_victim(not_running) == K(1, 3)  # cold: the victim
    p = lookahead_setup()
    p.on_router_lookahead(1, [3])  # layer 1's router, applied early, predicts expert 3
    assert p.choose_victim(not_running) not in (K(1, 3), None)


def test_router_lookahead_feeds_the_prefetch_plan():
    assert lookahead_setup().plan_prefetch(0, [0]) == []
    p = lookahead_setup()
    p.on_router_lookahead(1, [5])
    assert p.plan_prefetch(0, [0]) == [K(1, 5)]


def test_routing_statistics_counts_reuse_and_cross_layer_follow():
    # 2 layers x 4 experts, top-1; one request of 4 tokens.
    x = np.array([[[0], [1]], [[0], [1]], [[2], [3]], [[0], [3]]])
    stats = routing_statistics(make_trace([x], num_experts=4), shrink=0.0)
    assert stats.reuse[0][0] == pytest.approx(
        1 / 2
    )  # used at tokens 0, 1, 3: again next at 0 only (3 is last)
    assert stats.reuse[1][3] == pytest.approx(1.0)  # tokens 2 -> 3
    assert stats.follow[0, 1][0] == pytest.approx([0, 2 / 3, 0, 1 / 3])  # after expert 0 at layer 0
    assert stats.follow[0, 1][2] == pytest.approx([0, 0, 0, 1])


def test_own_reuse_keeps_the_expert_that_is_reused():
    # Expert 0 follows itself, expert 1 never does: with the same history, expert 1 goes first
    # (without statistics the tie goes to expert 0, the smaller key).
    x = np.array([[[0, 1]], [[0, 2]], [[0, 1]], [[0, 2]]])
    stats = routing_statistics(make_trace([x], num_experts=4), shrink=0.0)
    victims = []
    for routing in (None, stats):
        p = TracePolicy(num_layers=1, num_experts=4, top_k=2, bypass=False, prefetch=0, routing=routing)
        step(p, 0, [0, 1])
        step(p, 0, [2, 3])
        victims.append(p.choose_victim(lambda k: k.expert < 2))
    assert victims == [K(0, 0), K(0, 1)]


def test_follow_check_keeps_the_expert_this_tokens_routing_predicts():
    # Layer 0 expert 0 is always followed by expert 1 at layer 2, never by expert 2.
    x = np.array([[[0], [0], [1]], [[3], [0], [2]]] * 3)
    stats = routing_statistics(make_trace([x], num_experts=4), shrink=0.0)
    victims = []
    for routing in (None, stats):
        p = TracePolicy(num_layers=3, num_experts=4, top_k=1, bypass=False, prefetch=0, routing=routing)
        for layer, e in ((0, 3), (1, 0), (2, 3)):
            step(p, layer, [e])
        p.on_insert(K(2, 1))  # two experts of layer 2 never used: the same ET
        p.on_insert(K(2, 2))
        p.on_access(K(0, 0), hit=True)  # the next token's layer 0 routes to expert 0
        victims.append(p.choose_victim(lambda k: k != K(0, 0)))
    assert victims == [K(2, 1), K(2, 2)]


def alternating_routing(tokens=1200, seed=0):
    """3 layers x 4 experts, top-1, one request: layer 1 of the next token routes to 2 + the expert of
    this token's layer 0 (random 0 or 1); layers 0 and 2 are random."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, tokens)
    x = np.stack([a, np.concatenate([[2], 2 + a[:-1]]), rng.integers(0, 4, tokens)], axis=1)
    return routing_statistics(make_trace([x[:, :, None]], num_experts=4))


@pytest.mark.parametrize("a", [0, 1])
def test_cross_token_prediction_keeps_the_expert_the_next_token_will_use(a):
    stats = alternating_routing()
    assert stats.cross is not None and len(stats.cross) == 3
    victims = []
    for cross in (False, True):
        p = TracePolicy(
            num_layers=3, num_experts=4, top_k=1, bypass=False, prefetch=0, routing=stats, cross=cross
        )
        for layer, e in ((0, 1 - a), (1, 2), (2, 0), (0, a), (1, 3), (2, 1)):
            step(p, layer, [e])
        # Layer 1 ran in this token with expert 3 (2 at the token before); this token's layer 0 chose
        # a, so the next token's layer 1 uses 2 + a. Recency alone keeps expert 3.
        victims.append(p.choose_victim(lambda k: k[0] == 1))
    assert victims == [K(1, 2), K(1, 3 - a)]


def test_cross_token_prediction_holds_for_the_layers_passed_in_this_token_only():
    stats = alternating_routing()
    p = TracePolicy(num_layers=3, num_experts=4, top_k=1, bypass=False, prefetch=0, routing=stats)
    for layer, e in ((0, 0), (1, 3), (2, 1)):
        step(p, layer, [e])
    assert p._p_next(K(1, 2)) > 0.8 and p._p_next(K(1, 3)) < 0.2  # layer 0 chose 0: 2 at the next token
    assert 0.3 < p._p_next(K(0, 0)) < 0.7 and p._p_next(K(0, 3)) < 0.05  # random 0 or 1, never 3
    step(p, 0, [1])  # the next token: layer 1 is ahead again, the prediction made for it is spent
    assert p._p_next(K(1, 2)) < 0.5
