"""Routing recorder and replay, without a decoder: what goes in comes out, shapes are checked."""

import numpy as np
import pytest
import torch

from moeinf.errors import InvalidTrace
from moeinf.runtime.routing_hooks import HookChain, RoutingRecorder, RoutingReplay, TraceFileRecorder
from moeinf.runtime.trace import make_trace, read_trace


def forward(hook, ids_per_layer):
    """Play one decoder forward: ids_per_layer [L] of [T, K]; returns what the hook made of them."""
    out = []
    for layer, ids in enumerate(ids_per_layer):
        weights = torch.full(ids.shape, 0.5)
        out.append(hook.on_route(layer, weights, ids))
    return out


def test_recorder_builds_requests_and_eam():
    rec = RoutingRecorder(num_moe_layers=2, num_experts=4, top_k=2)
    forward(rec, [torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1, 2], [1, 3]])])  # prefill of 2 tokens
    forward(rec, [torch.tensor([[0, 3]]), torch.tensor([[2, 3]])])  # one decode step
    eam = rec.current_eam()
    assert eam.tolist() == [[2, 1, 1, 2], [0, 2, 2, 2]]
    routing = rec.end_request()
    assert routing.shape == (3, 2, 2)
    assert rec.end_request() is None  # nothing routed since
    trace = rec.trace(model="x")
    assert trace.num_requests == 1 and trace.meta["model"] == "x"
    assert trace.probs is not None and trace.probs.shape == (3, 2, 2)


def test_replay_forces_the_trace_and_wraps():
    experts = np.array([[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[3, 2], [1, 0]]], dtype=np.int16)  # [3, 2, 2]
    trace = make_trace([experts], num_experts=4)
    replay = RoutingReplay(trace, num_moe_layers=2, num_experts=4, top_k=2)
    got = forward(replay, [torch.zeros(2, 2, dtype=torch.long)] * 2)  # a 2-token forward
    assert got[0][1].tolist() == [[0, 1], [1, 2]] and got[1][1].tolist() == [[2, 3], [3, 0]]
    assert torch.allclose(got[0][0], torch.full((2, 2), 0.5))  # no probs recorded: 1/K
    got = forward(replay, [torch.zeros(2, 2, dtype=torch.long)] * 2)  # wraps around
    assert got[0][1].tolist() == [[3, 2], [0, 1]]


def test_chain_records_what_replay_forced():
    experts = np.array([[[0, 1]], [[2, 3]]], dtype=np.int16)
    replay = RoutingReplay(make_trace([experts], num_experts=4), num_moe_layers=1, num_experts=4, top_k=2)
    rec = RoutingRecorder(1, 4, 2)
    chain = HookChain([replay, rec])
    forward(chain, [torch.tensor([[3, 2]])])
    forward(chain, [torch.tensor([[3, 2]])])
    assert rec.end_request().tolist() == experts.tolist()


def test_replay_shape_mismatch_is_clear():
    trace = make_trace([np.tile(np.array([0, 1], np.int16), (2, 3, 1))], num_experts=4)
    with pytest.raises(InvalidTrace, match="3 layers x 4 experts, top-2; this model has 2 MoE layers"):
        RoutingReplay(trace, num_moe_layers=2, num_experts=4, top_k=2)


def test_replay_says_it_replaces_routing():
    experts = np.array([[[0, 1]]], dtype=np.int16)
    replay = RoutingReplay(make_trace([experts], num_experts=4), num_moe_layers=1, num_experts=4, top_k=2)
    rec = RoutingRecorder(1, 4, 2)
    assert replay.replaces_routing and not rec.replaces_routing
    assert HookChain([replay, rec]).replaces_routing and not HookChain([rec]).replaces_routing


def test_trace_file_recorder_writes_every_finished_request(tmp_path):
    path = tmp_path / "sub" / "routing.npz"
    rec = TraceFileRecorder(path, num_moe_layers=2, num_experts=4, top_k=2, model="m")
    rec.start_request()
    forward(rec, [torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1, 2], [1, 3]])])  # prefill of 2 tokens
    forward(rec, [torch.tensor([[0, 3]]), torch.tensor([[2, 3]])])  # one decode step
    assert not path.exists()  # written when the request ends
    rec.end_request()
    first = read_trace(path)
    assert first.num_requests == 1 and first.meta["prefill_tokens"] == [2] and first.meta["model"] == "m"
    rec.start_request()
    forward(rec, [torch.tensor([[3, 2]]), torch.tensor([[0, 1]])])
    rec.end_request()
    both = read_trace(path)  # rewritten with both requests
    assert both.seq_offsets.tolist() == [0, 3, 4] and both.meta["prefill_tokens"] == [2, 1]
    assert both.experts[3].tolist() == [[3, 2], [0, 1]] and both.probs is not None


def test_trace_file_recorder_takes_the_prompt_length_from_generation(tmp_path):
    """A long prompt is prefilled in chunks (several forwards): `prompt_done` gives the whole prompt."""
    path = tmp_path / "routing.npz"
    rec = TraceFileRecorder(path, num_moe_layers=1, num_experts=4, top_k=2)
    rec.start_request()
    forward(rec, [torch.tensor([[0, 1], [2, 3]])])  # prefill chunk 1
    forward(rec, [torch.tensor([[1, 2]])])  # prefill chunk 2
    rec.prompt_done(3)
    forward(rec, [torch.tensor([[0, 3]])])  # decode
    rec.end_request()
    trace = read_trace(path)
    assert trace.meta["prefill_tokens"] == [3] and trace.decode_only().num_tokens == 1


def test_engine_tells_the_recorder_a_chunked_prompt_whole(checkpoint, tmp_path):
    from moeinf.runtime.engine import Engine
    from moeinf.runtime.generate import GenerationParams, generate

    engine = Engine.load(str(checkpoint("mixtral")), device="cpu")
    spec = engine.spec
    shape = {"num_moe_layers": len(spec.moe_layers), "num_experts": spec.num_experts, "top_k": spec.top_k}
    rec = TraceFileRecorder(tmp_path / "r.npz", **shape)
    engine.request_listeners.append(rec)
    engine.decoder.set_routing_hook(rec)
    engine.decoder.prefill_chunk = 4  # a 10-token prompt runs as 4 + 4 + 2
    params = GenerationParams(max_tokens=5, ignore_eos=True)
    steps = list(generate(engine, list(range(3, 13)), params))
    trace = read_trace(tmp_path / "r.npz")
    assert len(steps) == 5 and trace.meta["prefill_tokens"] == [10]
    assert trace.decode_only().num_tokens == 4  # the last answer token is never run


def test_trace_file_recorder_hands_a_failed_write_to_on_error(tmp_path):
    """`moeinf run` fails on a trace it cannot write; a server logs it and keeps answering."""
    from moeinf.errors import MoeinfError

    (tmp_path / "file").write_text("x")
    path = tmp_path / "file" / "r.npz"  # its folder is a file: the write fails
    errors = []
    for on_error in (errors.append, None):
        rec = TraceFileRecorder(path, num_moe_layers=1, num_experts=4, top_k=2, on_error=on_error)
        rec.start_request()
        forward(rec, [torch.tensor([[0, 1]])])
        if on_error is None:
            with pytest.raises(MoeinfError, match="cannot write the routing trace"):
                rec.end_request()
        else:
            assert rec.end_request() is not None and "cannot write" in str(errors[0])


def test_trace_file_recorder_rotates_at_its_size_bound(tmp_path):
    """A server's recorder leaves a file complete at `rotate_bytes` and goes on in <stem>-2.npz, -3...:
    what it keeps in memory and rewrites per request stays bounded."""
    one_token = 1 * 2 * 6  # layers x top-k x (int16 id + float32 weight)
    rec = TraceFileRecorder(
        tmp_path / "m.npz", num_moe_layers=1, num_experts=4, top_k=2, rotate_bytes=3 * one_token
    )
    for _ in range(3):  # requests of 2 tokens: the first file is full after two of them
        rec.start_request()
        forward(rec, [torch.tensor([[0, 1], [2, 3]])])
        rec.end_request()
    assert read_trace(tmp_path / "m.npz").num_requests == 2
    assert read_trace(tmp_path / "m-2.npz").num_requests == 1 and len(rec.requests) == 1
