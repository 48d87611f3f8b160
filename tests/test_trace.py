"""Trace file format: round trip, validation, expert activation matrices, the shared real trace."""

from pathlib import Path

import numpy as np
import pytest

from moeinf.errors import InvalidTrace
from moeinf.runtime.trace import Trace, eam, make_trace, read_trace, write_trace

SHARED = Path("/work/shared/traces/gpt-oss-20b.decode.dev.npz")


def random_requests(seed=0, n=3, L=3, E=6, K=2, missing_layer=None):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = 4 + i
        x = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(T)])
        if missing_layer is not None:
            x[:, missing_layer, :] = -1
        out.append(x)
    return out


def test_round_trip_with_and_without_probs(tmp_path):
    reqs = random_requests()
    probs = [np.random.default_rng(1).random(r.shape).astype(np.float32) for r in reqs]
    for p in (None, probs):
        tr = make_trace(reqs, num_experts=6, probs=p, model="tiny", sequences=[{"i": i} for i in range(3)])
        path = write_trace(tr, tmp_path / "t.npz")
        back = read_trace(path)
        assert np.array_equal(back.experts, tr.experts)
        assert np.array_equal(back.seq_offsets, [0, 4, 9, 15])
        assert back.meta == tr.meta
        assert (back.num_layers, back.num_experts, back.top_k, back.num_requests) == (3, 6, 2, 3)
        if p is None:
            assert back.probs is None
        else:
            assert np.allclose(back.probs, tr.probs, atol=1e-3)  # stored as float16


def test_eam_counts_tokens_per_expert_and_skips_missing_layers():
    reqs = random_requests(missing_layer=1)
    tr = make_trace(reqs, num_experts=6)
    for i, r in enumerate(reqs):
        naive = np.zeros((3, 6), dtype=np.int64)
        for t in range(len(r)):
            for layer in range(3):
                for e in r[t, layer]:
                    if e >= 0:
                        naive[layer, e] += 1
        assert np.array_equal(tr.eam(i), naive)
        assert tr.eam(i)[1].sum() == 0
    assert eam(tr.experts, 6).sum() == sum(x.sum() for x in (tr.eam(i) for i in range(3)))


def test_select_keeps_requests_and_meta_sequences():
    tr = make_trace(random_requests(), num_experts=6, sequences=["a", "b", "c"])
    sub = tr.select([2, 0])
    assert sub.num_requests == 2 and sub.meta["sequences"] == ["c", "a"]
    assert np.array_equal(sub.experts[:6], tr.experts[9:15])
    assert np.array_equal(sub.eam(1), tr.eam(0))


def test_decode_only_drops_each_requests_prompt_tokens():
    """Requests of 4, 5, 6 tokens whose first 2, 5, 1 are the prompt (run --record-trace's meta)."""
    reqs = random_requests()
    probs = [np.full(r.shape, i, np.float32) for i, r in enumerate(reqs)]
    tr = make_trace(reqs, num_experts=6, probs=probs, prefill_tokens=[2, 5, 1], sequences=["a", "b", "c"])
    assert tr.select([2, 0]).meta["prefill_tokens"] == [1, 2]
    dec = tr.decode_only()
    assert dec.num_requests == 2 and dec.seq_offsets.tolist() == [0, 2, 7]  # the second had no answer
    assert np.array_equal(dec.experts[:2], reqs[0][2:]) and np.array_equal(dec.experts[2:], reqs[2][1:])
    assert dec.probs[:2].max() == 0 and dec.probs[2:].min() == 2 and "prefill_tokens" not in dec.meta
    assert dec.meta["sequences"] == ["a", "c"]
    plain = make_trace(reqs, num_experts=6)
    assert plain.decode_only() is plain  # nothing says which tokens are prompt: all stay


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(meta={"num_layers": 3, "top_k": 2}), "num_experts"),
        (lambda a: a.update(experts=a["experts"][:, :2]), r"\[T, 3, 2\]"),
        (lambda a: a["experts"].__setitem__((0, 0, 0), 6), "expert ids"),
        (lambda a: a["experts"].__setitem__((0, 0, 0), -2), "expert ids"),
        (lambda a: a.update(seq_offsets=np.array([0, 5, 3, 15])), "seq_offsets"),
        (lambda a: a.update(seq_offsets=np.array([0, 14])), "seq_offsets"),
        (lambda a: a.update(probs=np.zeros((15, 3, 1))), "probs"),
        (lambda a: a["experts"].__setitem__((0, 0), [1, 1]), "twice"),
    ],
)
def test_validation_rejects_inconsistent_traces(change, message):
    tr = make_trace(random_requests(), num_experts=6)
    args = {"experts": tr.experts.copy(), "seq_offsets": tr.seq_offsets, "meta": dict(tr.meta), "probs": None}
    change(args)
    with pytest.raises(InvalidTrace, match=message):
        Trace(**args)


def test_read_rejects_non_trace_files(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(InvalidTrace, match="missing"):
        read_trace(tmp_path / "x.npz")
    (tmp_path / "y.npz").write_bytes(b"not a zip")
    with pytest.raises(InvalidTrace, match="not a routing trace") as err:
        read_trace(tmp_path / "y.npz")
    assert "pickle" not in str(err.value)  # numpy's guess at a file it cannot place
    with pytest.raises(InvalidTrace, match="cannot read"):
        read_trace(tmp_path / "missing.npz")


@pytest.mark.skipif(not SHARED.exists(), reason="shared gpt-oss trace not present")
def test_shared_gpt_oss_trace_reads():
    tr = read_trace(SHARED)
    assert (tr.num_layers, tr.num_experts, tr.top_k) == (24, 32, 4)
    assert tr.num_requests == 526 and tr.num_tokens == 160644
    m = tr.eam(0)
    assert np.array_equal(m.sum(axis=1), np.full(24, 4 * (tr.seq_offsets[1] - tr.seq_offsets[0])))


def test_recorder_builds_the_trace_it_was_fed(tmp_path):
    """The runtime's recorder (routing_hooks.RoutingRecorder) writes traces in this format."""
    import torch

    from moeinf.runtime.routing_hooks import RoutingRecorder

    reqs = random_requests()
    rec = RoutingRecorder(num_moe_layers=3, num_experts=6, top_k=2)
    for r in reqs:
        for token in r:  # one decode step: every MoE layer routes one token
            for layer in range(3):
                rec.on_route(layer, torch.tensor([[0.75, 0.25]]), torch.from_numpy(token[layer][None]))
        rec.end_request()
    tr = rec.trace(model="tiny")
    expected = make_trace(reqs, num_experts=6, model="tiny")
    assert np.array_equal(tr.experts, expected.experts)
    assert np.array_equal(tr.seq_offsets, expected.seq_offsets)
    assert np.allclose(tr.probs, [0.75, 0.25])
    back = read_trace(write_trace(tr, tmp_path / "rec.npz"))
    assert back.meta["model"] == "tiny" and np.array_equal(back.eam(2), expected.eam(2))
    with pytest.raises(InvalidTrace, match="at least one request"):
        RoutingRecorder(3, 6, 2).trace()
