"""Token-level routing counts: the trace policy's statistics from counts equal those computed from the
trace itself; counts add up request by request, persist with the library, and the expert cache hands
each request's decode routing to them."""

import numpy as np
import pytest

from moeinf.errors import InvalidTrace
from moeinf.runtime.routing_counts import (
    CROSS_DISTANCE,
    CROSS_KEYS,
    CROSS_MIN_TOKENS,
    RoutingCounts,
    cross_distance,
    cross_weights,
    pair_distance,
    routing_statistics,
)
from moeinf.runtime.trace import make_trace, routing_array
from moeinf.runtime.trace_library import TraceLibrary

L, E, K = 5, 6, 2


def random_trace(seed=0, requests=4):
    rng = np.random.default_rng(seed)
    reqs = []
    for _ in range(requests):
        T = int(rng.integers(3, 12))
        # sticky routing: a token reuses its predecessor's experts half of the time
        x = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])
        for t in range(1, T):
            keep = rng.random(L) < 0.5
            x[t, keep] = x[t - 1, keep]
        reqs.append(x)
    return make_trace(reqs, num_experts=E)


def direct_statistics(trace, shrink=20.0, max_distance=3):
    """Reuse and same-token follow probabilities computed straight from the token-level routing, token
    by token (an independent reference for the counts' algebra)."""
    x, E = trace.experts, trace.num_experts
    T, L, _ = x.shape
    last = set((np.asarray(trace.seq_offsets[1:]) - 1).tolist())
    uses, both, base = np.zeros((L, E)), np.zeros((L, E)), np.zeros((L, E))
    pair = {}
    for t in range(T):
        for layer in range(L):
            for e in x[t, layer]:
                uses[layer, e] += 1
                if t not in last:
                    base[layer, e] += 1
                    both[layer, e] += e in x[t + 1, layer]
                for hi in range(layer + 1, min(L, layer + max_distance + 1)):
                    for f in x[t, hi]:
                        pair[layer, hi, e, f] = pair.get((layer, hi, e, f), 0) + 1
    layer_mean = both.sum(1, keepdims=True) / np.maximum(base.sum(1, keepdims=True), 1)
    reuse = (both + shrink * layer_mean) / np.maximum(base + shrink, 1e-12)
    rate = uses / T
    follow = {
        (lo, hi): [
            [(pair.get((lo, hi, e, f), 0) + shrink * rate[hi, f]) / (uses[lo, e] + shrink) for f in range(E)]
            for e in range(E)
        ]
        for lo in range(L)
        for hi in range(lo + 1, min(L, lo + max_distance + 1))
    }
    return reuse, follow


def test_stats_from_counts_equal_a_direct_count_of_the_trace():
    trace = random_trace()
    reuse, follow = direct_statistics(trace, max_distance=3)
    got = routing_statistics(trace, max_distance=3)  # = RoutingCounts.from_trace(...).stats()
    assert np.allclose(got.reuse, reuse)
    assert set(got.follow) == set(follow)
    for key in follow:
        assert np.allclose(got.follow[key], follow[key])


def test_counts_add_up_request_by_request_and_merge():
    trace = random_trace(1)
    whole = RoutingCounts.from_trace(trace)
    parts, other = RoutingCounts(L, E), RoutingCounts(L, E)
    for i in range(trace.num_requests):
        (parts if i % 2 else other).add(trace.experts[trace.request_slice(i)])
    parts.merge(other)
    for key in ("uses", "reuses", "with_next", "pairs"):
        assert np.array_equal(getattr(parts, key), getattr(whole, key)), key
    assert parts.tokens == whole.tokens == trace.num_tokens
    # a request boundary breaks reuse: the concatenation as one request counts more
    glued = RoutingCounts(L, E)
    glued.add(trace.experts)
    assert glued.reuses.sum() >= whole.reuses.sum() and glued.with_next.sum() > whole.with_next.sum()


def test_bad_routing_is_refused():
    counts = RoutingCounts(L, E)
    with pytest.raises(InvalidTrace, match="does not match"):
        counts.add(np.zeros((2, L + 1, K), dtype=np.int64))
    with pytest.raises(InvalidTrace, match="expert 6"):
        counts.add(np.full((2, L, K), E))


def test_pair_counts_stay_bounded_for_wide_models():
    assert pair_distance(24, 32) == 8  # gpt-oss-like: every distance the policy uses
    assert pair_distance(48, 128) == 1  # Qwen3-MoE
    assert pair_distance(61, 256) == 0  # DeepSeek-V3: reuse counts only
    wide = RoutingCounts(61, 256)
    assert wide.pairs.shape == (0, 61, 256, 256) and wide.stats().follow == {}


def test_library_keeps_the_counts_across_save_and_load(tmp_path):
    trace = random_trace(2)
    lib = TraceLibrary(L, E, K, directory=tmp_path)
    assert not lib.routing and lib.routing_stats() is None
    for i in range(trace.num_requests):
        lib.add(trace.eam(i), save=False)
        lib.add_routing(trace.experts[trace.request_slice(i)], save=False)
    lib.save()
    again = TraceLibrary.open(tmp_path, L, E, K)
    assert again.routing.tokens == trace.num_tokens
    assert np.array_equal(again.routing.pairs, lib.routing.pairs)
    assert again.routing_stats(min_tokens=1) is not None and again.routing_stats(min_tokens=10**6) is None
    # a file written before routing counts existed still loads (counting starts from zero)
    with np.load(again.path) as data:
        old = {k: data[k] for k in data.files if not k.startswith("routing_")}
    np.savez(again.path, **old)
    older = TraceLibrary.open(tmp_path, L, E, K)
    assert len(older) == len(lib) and not older.routing
    older.clear()
    assert not older.routing and not older.path.exists()


def test_routing_array_splits_tokens_where_the_layers_restart():
    steps = [(1, [4, 2]), (3, [0, 5]), (1, [4, 1]), (2, [3, 0]), (3, [5, 2])]
    x = routing_array(steps, num_layers=4, top_k=2)
    assert x.shape == (2, 4, 2)
    assert x[0].tolist() == [[-1, -1], [4, 2], [-1, -1], [0, 5]]
    assert x[1].tolist() == [[-1, -1], [4, 1], [3, 0], [5, 2]]


def test_the_cache_hands_each_requests_decode_routing_to_its_sink(tmp_path):
    import torch

    from moeinf.runtime.expert_cache import ExpertCache
    from moeinf.runtime.policy import make_policy
    from tests.test_expert_cache import EXPERTS, LAYERS, make_store

    layout, path_of = make_store(tmp_path)
    cache = ExpertCache(
        path_of, layout, slots=6, policy=make_policy("lru"), device=torch.device("cpu"),
        dtype=torch.float32, bulk_threshold=2,
    )  # fmt: skip
    got = []
    cache.record_routing(got.append, num_layers=LAYERS)
    steps = [[(0, [1, 2]), (1, [3, 4]), (2, [5, 6])], [(0, [1, 7]), (1, [3, 0]), (2, [5, 2])]]
    try:
        cache.start_request()
        for _ in cache.experts(0, list(range(EXPERTS))):  # a prefill: many tokens at once, not logged
            pass
        for token in steps:
            for layer, ids in token:
                for _ in cache.experts(layer, ids):
                    pass
        cache.end_request()
        cache.start_request()
        cache.end_request()  # a request that routed nothing hands nothing over
    finally:
        cache.close()
    assert len(got) == 1
    assert got[0].tolist() == [[ids for _, ids in token] for token in steps]


def test_a_run_with_the_trace_policy_counts_its_decode_routing(checkpoint):
    from typer.testing import CliRunner

    from moeinf.cli.main import app
    from moeinf.pull import pull
    from moeinf.runtime.trace_library import open_model_library

    stored = pull(str(checkpoint("mixtral")), name="mx-routing")
    args = ["run", "mx-routing", "hello", "--raw", "--ignore-eos", "--max-tokens", "6", "--policy", "trace"]
    result = CliRunner().invoke(app, [*args, "--ram-mem", "50%"])
    assert result.exit_code == 0, result.stderr
    lib = open_model_library(stored)
    assert len(lib) == 1 and lib.routing.tokens == 5  # 5 decode steps: the first token is the prefill's
    spec = stored.spec
    assert lib.routing.uses.sum() == 5 * len(spec.moe_layers) * spec.top_k


def test_cross_token_weights_are_the_ridge_fit_of_the_next_tokens_routing():
    # The normal equations assembled from counts equal those of the one-hot features themselves:
    # products over all tokens, products with the next token over tokens that have one.
    trace = random_trace(3, requests=150)
    counts = RoutingCounts.from_trace(trace, max_distance=2)
    assert counts.cross_distance == 2 and counts.cross_tokens == trace.num_tokens
    got = cross_weights(
        counts.tokens, counts.uses, counts.same, counts.pairs, counts.with_prev, counts.next_pairs,
        ridge=3.0, min_tokens=1,
    )  # fmt: skip
    x = trace.experts.astype(np.int64)
    T = len(x)
    onehot = np.zeros((T, L, E))
    np.put_along_axis(onehot, x, 1, axis=2)
    has_next = np.ones(T, dtype=bool)
    has_next[trace.seq_offsets[1:] - 1] = False
    for m in range(L):
        feats = [onehot[:, m - k] if m - k >= 0 else np.zeros((T, E)) for k in range(3)]
        X = np.hstack([*feats, np.ones((T, 1))])
        G = X.T @ X + 3.0 * np.diag([1.0] * (3 * E) + [0.0])
        Y = X[:-1][has_next[:-1]].T @ onehot[1:, m][has_next[:-1]]
        assert np.allclose(got[m], np.linalg.solve(G, Y)), m


def test_cross_token_statistics_from_counts_equal_those_of_the_trace_and_survive_merge_and_save(tmp_path):
    trace = random_trace(4, requests=200)
    assert trace.num_tokens >= CROSS_MIN_TOKENS
    want = routing_statistics(trace, max_distance=3).cross
    parts, other = RoutingCounts(L, E, 3), RoutingCounts(L, E, 3)
    for i in range(trace.num_requests):
        (parts if i % 2 else other).add(trace.experts[trace.request_slice(i)])
    parts.merge(other)
    loaded = RoutingCounts.from_arrays(parts.to_arrays())
    for got in (RoutingCounts.from_trace(trace, max_distance=3).stats().cross, loaded.stats().cross):
        assert got is not None and len(got) == len(want) == L
        for a, b in zip(got, want, strict=True):
            assert a.shape == (4 * E + 1, E) and np.allclose(a, b)
    # few tokens: no cross-token prediction; counts from a file older than them: counting starts over
    # (the library then makes fresh counts, whose predictions come back with new requests)
    assert RoutingCounts.from_trace(random_trace(5)).stats().cross is None
    old = {k: v for k, v in parts.to_arrays().items() if k.removeprefix("routing_") not in CROSS_KEYS}
    assert RoutingCounts.from_arrays(old) is None


def test_cross_token_counts_stay_bounded_for_wide_models():
    assert cross_distance(24, 32, pair_distance(24, 32)) == CROSS_DISTANCE  # gpt-oss-like
    assert cross_distance(48, 128, pair_distance(48, 128)) == -1  # Qwen3-MoE: none
    wide = RoutingCounts(61, 256)
    assert wide.next_pairs.size == wide.same.size == 0 and wide.stats().cross is None


def test_wide_models_get_bounded_statistics():
    """DeepSeek-V3's width (61 layers x 256 experts) gets no pair tables, as at run time: 8 distances
    of [E][E] tables would be ~1 GB of Python floats in the policy."""
    x = np.zeros((4, 61, 8), dtype=np.int16)
    x[:, :, :] = np.arange(8)
    stats = routing_statistics(make_trace([x], num_experts=256))
    assert stats.follow == {} and stats.cross is None
    assert len(stats.reuse) == 61 and len(stats.reuse[0]) == 256
