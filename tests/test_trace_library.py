"""Trace library: bounded by count and bytes, representative when full, persistent across restarts."""

import numpy as np
import pytest

from moeinf.errors import InvalidTrace
from moeinf.runtime.trace import make_trace
from moeinf.runtime.trace_library import TraceLibrary, normalised_rows

L, E, K = 3, 8, 2


def cluster_eam(center: int, rng, tokens: int = 20) -> np.ndarray:
    """A request whose experts concentrate around `center` in every layer (plus noise)."""
    out = np.zeros((L, E))
    for _ in range(tokens):
        for layer in range(L):
            ids = {(center + int(rng.integers(0, 2))) % E, int(rng.integers(0, E))}
            while len(ids) < K:
                ids.add(int(rng.integers(0, E)))
            for e in ids:
                out[layer, e] += 1
    return out


def test_normalised_rows_weigh_layers_equally():
    a = np.zeros((1, 2, 4))
    a[0, 0, 0] = 100  # a big first layer ...
    a[0, 1, 1] = 1  # ... does not drown the second
    u = normalised_rows(a)[0]
    assert np.isclose(np.linalg.norm(u), 1) and np.isclose(u[0], u[5])


@pytest.mark.parametrize("max_entries, max_bytes", [(5, 1 << 20), (100, 4 * L * E * 4)])
def test_stays_within_count_and_byte_bounds(max_entries, max_bytes):
    rng = np.random.default_rng(0)
    lib = TraceLibrary(L, E, K, max_entries=max_entries, max_bytes=max_bytes, merge_similarity=1.1)
    for i in range(30):
        lib.add(cluster_eam(i % E, rng), save=False)
        assert len(lib) <= min(max_entries, max_bytes // lib.entry_bytes)
        assert lib.nbytes <= max_bytes
    assert lib.requests.sum() == 30  # nothing is lost: merged entries carry their requests
    assert lib.tokens.sum() == 30 * 20


def test_similarities_kept_up_to_date_equal_a_fresh_computation():
    """The cached unit rows and entry-by-entry similarity matrix (updated one entry at a time as
    requests are added, merged into an entry, or merge two entries) equal a recomputation."""
    rng = np.random.default_rng(7)
    lib = TraceLibrary(L, E, K, max_entries=6, merge_similarity=0.995)
    merges = 0
    for _ in range(60):
        before = len(lib)
        lib.add(cluster_eam(int(rng.integers(E)), rng, tokens=int(rng.integers(3, 30))), save=False)
        merges += len(lib) == before
        if lib._unit is not None:
            assert np.array_equal(lib._unit, normalised_rows(lib.eams))
        if lib._gram is not None:
            u = normalised_rows(lib.eams)
            fresh = u @ u.T
            np.fill_diagonal(fresh, -np.inf)
            assert np.allclose(lib._gram, fresh, rtol=0, atol=1e-12)
            assert np.array_equal(lib._gram, lib._gram.T)
    assert lib._gram is not None and merges > 20  # the bound was enforced many times


def test_near_duplicates_merge_and_rare_kinds_survive_a_burst():
    rng = np.random.default_rng(1)
    lib = TraceLibrary(L, E, K, max_entries=3, merge_similarity=0.999)
    lib.add(cluster_eam(0, rng), save=False)
    lib.add(cluster_eam(4, rng), save=False)  # a rare kind of request
    rare = lib.eams[1].copy()
    for _ in range(20):  # a burst of requests like the first
        lib.add(cluster_eam(0, rng), save=False)
    assert len(lib) == 3
    # The rare request keeps its own entry: the burst merges among itself.
    assert any(np.array_equal(e, rare) for e in lib.eams)
    assert lib.requests.max() >= 19
    # An exact duplicate merges into its twin instead of adding an entry.
    twin = lib.eams[0] / lib.requests[0]
    before = lib.requests.copy()
    lib.add(twin, save=False)
    assert len(lib) == 3 and lib.requests.sum() == before.sum() + 1


def test_survives_a_restart(tmp_path):
    rng = np.random.default_rng(2)
    lib = TraceLibrary.open(tmp_path / "traces", L, E, K, max_entries=4)
    for i in range(6):
        lib.add(cluster_eam(i, rng))  # saved after each add
    again = TraceLibrary.open(tmp_path / "traces", L, E, K, max_entries=4)
    assert len(again) == 4
    for name in ("eams", "tokens", "requests", "updated"):
        assert np.array_equal(getattr(again, name), getattr(lib, name))
    # A restart with a smaller bound applies it at load.
    smaller = TraceLibrary.open(tmp_path / "traces", L, E, K, max_entries=2)
    assert len(smaller) == 2 and smaller.requests.sum() == 6
    with pytest.raises(InvalidTrace, match="layers"):
        TraceLibrary.open(tmp_path / "traces", L + 1, E, K)
    lib.clear()
    assert len(TraceLibrary.open(tmp_path / "traces", L, E, K)) == 0


def test_predict_follows_the_most_similar_entries():
    rng = np.random.default_rng(3)
    lib = TraceLibrary(L, E, K, match_top=1)
    for c in (0, 4):
        lib.add(cluster_eam(c, rng), save=False)
    partial = cluster_eam(4, rng, tokens=3)
    rates = lib.predict(partial)
    assert rates.shape == (L, E)
    assert np.argmax(rates[0]) in (4, 5)
    assert np.allclose(rates.sum(axis=1), K, atol=1e-6)  # uses per token per layer
    assert np.allclose(lib.predict(None).sum(axis=1), K)
    assert np.allclose(TraceLibrary(L, E, K).predict(None), K / E)


def test_from_trace_and_export_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    reqs = [rng.integers(0, E, (5, L, 1)) for _ in range(3)]
    reqs = [np.concatenate([r, (r + 1) % E], axis=2) for r in reqs]
    tr = make_trace(reqs, num_experts=E)
    lib = TraceLibrary.from_trace(tr, merge_similarity=1.1)
    assert len(lib) == 3 and lib.tokens.tolist() == [5, 5, 5]
    path = lib.save(tmp_path / "export.npz")
    back = TraceLibrary.load_file(path)
    assert np.array_equal(back.eams, lib.eams) and back.top_k == K
