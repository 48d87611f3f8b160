"""The decoder through the store: pull a tiny checkpoint, load_decoder + ResidentProvider, compare to
transformers; experts are read lazily, once each; routing hooks see and may replace the choices;
bf16 compute stays close to fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeinf.errors import ContextTooLong
from moeinf.models.transformer import load_decoder
from moeinf.pull import pull
from moeinf.runtime.resident import ResidentProvider
from moeinf.runtime.routing_hooks import RoutingRecorder, RoutingReplay
from moeinf.runtime.trace import make_trace


@pytest.fixture(params=["qwen2_moe", "deepseek_v3"])
def pulled(request, checkpoint):
    from transformers import AutoModelForCausalLM

    path = checkpoint(request.param)
    stored = pull(str(path), name=request.param)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return stored, model


def test_load_decoder_from_the_store_matches_transformers(pulled):
    stored, model = pulled
    provider = ResidentProvider(stored, "cpu", torch.float32)
    decoder = load_decoder(stored, provider, device="cpu", dtype=torch.float32, max_seq_len=32)
    assert provider.reads == 0  # nothing read "just to start"
    prompt = torch.arange(3, 19)
    got = decoder(prompt, 0)
    with torch.no_grad():
        want = model(prompt[None]).logits[0]
    assert (got - want).abs().max().item() < 1e-4
    spec = stored.spec
    used = {
        (layer.moe.layer, e)
        for layer in decoder.layers
        if layer.is_moe
        for e in layer.moe.last_ids.flatten().tolist()
    }
    assert provider.reads == len(used) < len(spec.moe_layers) * spec.num_experts + 1
    decoder(prompt[:1], 16)  # experts already read are not read again
    assert provider.reads <= len(used) + len(spec.moe_layers) * spec.top_k
    with pytest.raises(ContextTooLong):
        load_decoder(
            stored, provider, device="cpu", dtype=torch.float32, max_seq_len=spec.max_position_embeddings + 1
        )


def test_bf16_compute_stays_close_to_fp32(pulled):
    stored, _ = pulled
    prompt = torch.arange(3, 11)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        decoder = load_decoder(
            stored, ResidentProvider(stored, "cpu", dtype), device="cpu", dtype=dtype, max_seq_len=16
        )
        out[dtype] = decoder(prompt, 0, last_only=True)
    assert out[torch.bfloat16].dtype == torch.float32 and out[torch.bfloat16].shape == (
        1,
        stored.spec.vocab_size,
    )
    assert (out[torch.bfloat16] - out[torch.float32]).abs().max().item() < 0.1 * out[
        torch.float32
    ].abs().max().item()


def test_routing_hooks_record_and_replace_choices(pulled):
    stored, _ = pulled
    spec = stored.spec
    decoder = load_decoder(
        stored,
        ResidentProvider(stored, "cpu", torch.float32),
        device="cpu",
        dtype=torch.float32,
        max_seq_len=16,
    )
    recorder = RoutingRecorder(len(spec.moe_layers), spec.num_experts, spec.top_k)
    decoder.set_routing_hook(recorder)
    decoder(torch.arange(3, 8), 0)
    decoder(torch.tensor([9]), 5)
    routing = recorder.end_request()
    assert routing.shape == (6, len(spec.moe_layers), spec.top_k)
    moe_blocks = [layer.moe for layer in decoder.layers if layer.is_moe]
    for i, block in enumerate(moe_blocks):  # the last row is the decode step's choice in each layer
        assert sorted(routing[5, i].tolist()) == sorted(block.last_ids[0].tolist())
    forced = np.zeros((6, len(spec.moe_layers), spec.top_k), np.int16)
    forced[..., :] = np.arange(spec.top_k)
    replay = RoutingReplay(
        make_trace([forced], num_experts=spec.num_experts),
        num_moe_layers=len(spec.moe_layers),
        num_experts=spec.num_experts,
        top_k=spec.top_k,
    )
    decoder.set_routing_hook(replay)
    decoder.reset()
    decoder(torch.arange(3, 8), 0)
    for layer in decoder.layers:
        if layer.is_moe:
            assert layer.moe.last_ids.tolist() == [list(range(spec.top_k))] * 5
