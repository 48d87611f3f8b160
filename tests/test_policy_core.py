"""The policies' C cores (native/moeinf_policy_core.c) decide exactly as the Python classes.

Both are replayed through the simulator (its Python loop and the core's own) and driven hook by hook
as the cache drives them (per-key accesses, router lookahead, bypass, prefetch); every answer and
every fetch must be the same.
"""

from __future__ import annotations

import numpy as np
import pytest

from moeinf.bench.simulator import make_sim_policy, simulate
from moeinf.runtime import policy_core, trace_policy_native
from moeinf.runtime.expert_key import ExpertKey
from moeinf.runtime.policy import LfuPolicy, LruPolicy, make_policy
from moeinf.runtime.routing_counts import routing_statistics
from moeinf.runtime.trace import make_trace
from moeinf.runtime.trace_library import TraceLibrary
from moeinf.runtime.trace_policy import TracePolicy

Native = trace_policy_native.native_class()
needs_core = pytest.mark.skipif(Native is None, reason=f"no policy cores: {policy_core.core_reason()}")

L, E, K = 6, 16, 2


def sticky_trace(seed: int, requests: int, T: int = 40):
    """Routing with the structure the policy feeds on: reuse of the previous token's experts, a
    layer's choice following the layer before it, and a few hot experts."""
    rng = np.random.default_rng(seed)
    hot = rng.random((L, E)) ** 3 + 0.02
    reqs = []
    for _ in range(requests):
        x = np.zeros((T, L, K), dtype=np.int64)
        for t in range(T):
            for layer in range(L):
                p = hot[layer] / hot[layer].sum()
                row = rng.choice(E, K, replace=False, p=p)
                if t and rng.random() < 0.5:
                    row = x[t - 1, layer]
                elif layer and rng.random() < 0.3:
                    row = (x[t, layer - 1] + 1) % E
                x[t, layer] = row
        reqs.append(x)
    return make_trace(reqs, num_experts=E)


def policies(**options):
    """A Python and a native trace policy with the same options and independent libraries."""
    library_trace = sticky_trace(seed=100, requests=30)  # > 1000 tokens: the cross-token predictor too
    routing = routing_statistics(library_trace)
    assert routing.cross is not None and routing.follow is not None  # every predictor is exercised
    made = []
    for cls in (TracePolicy, Native):
        lib = TraceLibrary.from_trace(library_trace, match_top=3)
        made.append(cls(library=lib, routing=routing, rematch_every=4, **options))
    return made


def replays(tr, runs, capacity, per_layer):
    """(fetch sequence, SimResult) of each (policy, native loop?) in `runs`, replaying `tr`."""
    out = []
    for policy, loop in runs:
        fetches = []
        r = simulate(
            tr,
            policy,
            capacity=capacity,
            per_layer=per_layer,
            native=loop,
            on_fetch=lambda k, p, fetches=fetches: fetches.append((k, p)),
        )
        out.append((fetches, r))
    return out


@needs_core
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("capacity", [0.125, 0.25, 0.5])
def test_simulated_fetches_identical(capacity, per_layer):
    """Python policy in the Python loop, C core in the Python loop, C core in its own replay loop."""
    tr = sticky_trace(seed=1, requests=5)
    eager = {"prefetch_threshold": 0.5, "bypass_margin": 1.0}  # prefetches on this small trace
    py, native = policies(**eager)
    _, native_in_python = policies(**eager)
    runs = replays(tr, ((py, False), (native_in_python, False), (native, True)), capacity, per_layer)
    assert policy_core.replays_natively(native)
    (a, ra) = runs[0]
    assert len(a) > tr.num_tokens  # a busy cache
    if capacity < 0.5:  # every kind of decision was taken (here: 30-222 bypasses, 1-122 prefetches)
        assert ra.bypasses > 0 and ra.prefetches_issued > 0 and ra.demand_misses > ra.bypasses
    fields = ("accesses", "demand_misses", "bypasses", "prefetches_issued", "prefetches_used")
    for b, rb in runs[1:]:
        assert b == a
        assert [getattr(rb, f) for f in fields] == [getattr(ra, f) for f in fields]
        assert (rb.prefetches_wasted, rb.time_ms, rb.slots) == (ra.prefetches_wasted, ra.time_ms, ra.slots)
    assert np.array_equal(py.library.eams, native.library.eams)  # both learnt the same requests


@needs_core
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hooks_identical_as_the_cache_calls_them(seed):
    """Per-key on_access, router lookahead (with wrong guesses too), bypass, victims and prefetch plans,
    over requests whose libraries learn: each answer equal."""
    rng = np.random.default_rng(seed)
    tr = sticky_trace(seed=10 + seed, requests=3, T=25)
    slots = 20
    py, native = policies(lookahead_p=0.9)
    residents: list[set] = [set(), set()]
    for r in range(tr.num_requests):
        for p in (py, native):
            p.on_request_start()
        block = tr.experts[tr.seq_offsets[r] : tr.seq_offsets[r + 1]]
        for t in range(len(block)):
            for layer in range(L):
                keys = [ExpertKey(layer, int(e)) for e in block[t, layer]]
                guess = None
                if layer + 1 < L:  # the early router: right, or (30%) wrong
                    guess = rng.choice(E, K, replace=False) if rng.random() < 0.3 else block[t, layer + 1]
                answers = []
                for p, resident in zip((py, native), residents, strict=True):
                    got = []
                    for k in keys:
                        p.on_access(k, k in resident)
                    for k in keys:
                        if k in resident:
                            continue
                        if len(resident) < slots:
                            resident.add(k)
                            p.on_insert(k)
                            got.append(("free", k))
                        elif p.should_bypass(k):
                            got.append(("bypass", k))
                        else:
                            victim = p.choose_victim(lambda v, keys=keys: v not in keys)
                            resident.discard(victim)
                            p.on_evict(victim)
                            resident.add(k)
                            p.on_insert(k)
                            got.append(("evict", victim))
                    if guess is not None:
                        p.on_router_lookahead(layer + 1, [int(e) for e in guess])
                    plan = p.plan_prefetch(layer, [k.expert for k in keys])
                    for k in plan:
                        if k not in resident and len(resident) < slots:
                            resident.add(k)
                            p.on_insert(k)
                    got.append(("plan", tuple(plan)))
                    answers.append(got)
                assert answers[0] == answers[1], (r, t, layer)
        for p in (py, native):
            p.on_request_end()
        assert np.array_equal(py.request_eam(), native.request_eam())
    assert len(py.library) == len(native.library)
    assert np.array_equal(py.library.eams, native.library.eams)


@needs_core
def test_a_subclass_that_overrides_a_decision_is_replayed_hook_by_hook():
    class Custom(Native):
        def should_bypass(self, key):
            return False

    assert not policy_core.replays_natively(Custom(num_layers=L, num_experts=E, top_k=K))
    assert not policy_core.replays_natively(TracePolicy())


@needs_core
def test_make_policy_picks_the_core_when_the_shape_is_known():
    assert type(make_policy("trace", num_layers=L, num_experts=E, top_k=K)) is Native
    assert type(make_policy("trace")) is TracePolicy  # shape unknown until the first token
    assert type(make_sim_policy("trace", sticky_trace(seed=0, requests=1))) is Native


def test_no_core_when_turned_off(monkeypatch):
    monkeypatch.setenv("MOEINF_NATIVE", "0")
    policy_core.reset()
    try:
        assert trace_policy_native.native_class() is None
        assert "MOEINF_NATIVE=0" in policy_core.core_reason()
        assert type(make_policy("trace", num_layers=L, num_experts=E, top_k=K)) is TracePolicy
        assert type(make_policy("lru", num_layers=L, num_experts=E, top_k=K)) is LruPolicy
        assert type(make_policy("lfu", num_layers=L, num_experts=E, top_k=K)) is LfuPolicy
    finally:
        monkeypatch.delenv("MOEINF_NATIVE")
        policy_core.reset()


@needs_core
def test_keys_outside_the_shape_are_refused():
    p = Native(num_layers=L, num_experts=E, top_k=K)
    with pytest.raises(ValueError, match="outside"):
        p.on_accesses([ExpertKey(L, 0)], ())
    with pytest.raises(TypeError):
        p.on_insert(3)


@needs_core
def test_verbose_names_the_engine():
    native = make_policy("trace", num_layers=L, num_experts=E, top_k=K)
    assert trace_policy_native.describe_engine(native).startswith("trace policy: C core (")
    assert "shape was not given" in trace_policy_native.describe_engine(TracePolicy())


@needs_core
@pytest.mark.parametrize("name", ["lru", "lfu"])
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("capacity", [0.125, 0.25, 0.5])
def test_lru_and_lfu_cores_fetch_as_the_python_classes(name, capacity, per_layer):
    tr = sticky_trace(seed=2, requests=4)
    shape = {"num_layers": L, "num_experts": E, "top_k": K}
    python = {"lru": LruPolicy, "lfu": LfuPolicy}[name]()
    native = make_policy(name, **shape)
    assert type(native).__name__ == f"Native{name.capitalize()}Policy" and native.name == name
    assert policy_core.replays_natively(native)
    runs = [
        (fetches, r.demand_misses, r.time_ms)
        for fetches, r in replays(
            tr, ((python, False), (make_policy(name, **shape), False), (native, True)), capacity, per_layer
        )
    ]
    assert runs[0][1] > tr.num_tokens  # evictions happened
    assert runs[1] == runs[0] and runs[2] == runs[0]


@needs_core
@pytest.mark.parametrize("name", ["lru", "lfu"])
def test_lru_and_lfu_cores_answer_every_hook_as_the_python_classes(name):
    """choose_victim with a Python can_evict, replace, on_access and on_evict of keys never inserted."""
    rng = np.random.default_rng(5)
    python = {"lru": LruPolicy, "lfu": LfuPolicy}[name]()
    native = make_policy(name, num_layers=L, num_experts=E)
    resident: list[set] = [set(), set()]
    for step in range(3000):
        key = ExpertKey(int(rng.integers(L)), int(rng.integers(E)))
        banned = {ExpertKey(int(rng.integers(L)), int(rng.integers(E))) for _ in range(3)}
        answers = []
        for p, res in zip((python, native), resident, strict=True):
            op = step % 7
            if op in (0, 1, 2):
                p.on_access(key, key in res)
                got = None
            elif op == 3:
                p.on_accesses([key, *banned], ())
                got = None
            elif op == 4 and len(res) < 24:
                res.add(key)
                p.on_insert(key)
                got = None
            elif op == 5:
                got = p.choose_victim(lambda k, banned=banned: k not in banned)
            else:
                got = p.replace(key, lambda k, banned=banned: k not in banned) if key not in res else None
                if got is not None:
                    res.discard(got)
                    res.add(key)
            if step % 11 == 0 and res:
                gone = sorted(res)[0]
                res.discard(gone)
                p.on_evict(gone)
            answers.append(got)
        assert answers[0] == answers[1], step
        assert resident[0] == resident[1]
