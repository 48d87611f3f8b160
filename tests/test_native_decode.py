"""A bf16 checkpoint decoded with fp32 activations straight from raw bf16 cache slots (the native kernels
widen the weights in registers) equals transformers running the same bf16 weights upcast to fp32.

Prefill (more tokens than kernels.MAX_TOKENS) takes the torch path, which upcasts the slot's weights;
each decode step takes the native path when the library is built (asserted then).
"""

from __future__ import annotations

import pytest
import torch

from moeinf import kernels
from moeinf.models.transformer import load_decoder
from moeinf.pull import pull
from moeinf.runtime.expert_cache import ExpertCache
from moeinf.runtime.expert_store import ExpertLayout
from moeinf.runtime.policy import make_policy
from tests.fixtures.checkpoints import build_checkpoint

PROMPT, NEW = 12, 12


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v2", "qwen3_moe"])
def test_bf16_slots_with_fp32_activations_match_transformers_upcast(family, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    path = build_checkpoint(family, tmp_path / family, seed=0, dtype="bfloat16")
    stored = pull(str(path), name=family)
    spec = stored.manifest.spec
    assert spec.dtype == "bfloat16"
    cache = ExpertCache(
        stored.expert_path,
        ExpertLayout(spec.hidden_size, spec.expert_dim, spec.dtype),
        slots=max(spec.top_k, spec.num_experts * len(spec.moe_layers) // 2),  # a 50% budget
        policy=make_policy("lru"),
        device=torch.device("cpu"),
        dtype=torch.bfloat16,  # raw slots: the file image, no fp32 copy
    )
    calls = {"native": 0, "linear": 0, "torch_threads": set()}
    real, real_linear = kernels.try_expert_forward, kernels.try_linear

    def counting(x, gate, up, down):
        y = real(x, gate, up, down)
        calls["native"] += y is not None
        calls["torch_threads"].add((x.shape[0], torch.get_num_threads()))
        return y

    def counting_linear(x, weight, bias=None):
        y = real_linear(x, weight, bias)
        calls["linear"] += y is not None
        return y

    monkeypatch.setattr(kernels, "try_expert_forward", counting)
    monkeypatch.setattr(kernels, "try_linear", counting_linear)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        decoder = load_decoder(stored, cache, device="cpu", dtype=torch.float32, max_seq_len=64)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # bf16 -> fp32
        prompt = torch.arange(3, 3 + PROMPT)
        with torch.no_grad():
            want = model.generate(
                prompt[None], max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW, pad_token_id=0
            )[0]
            want_logits = model(want[None]).logits[0]  # [PROMPT + NEW, V]
        got_logits = [decoder(prompt, 0)[-1]]
        tokens = prompt.tolist()
        for i in range(NEW):
            tokens.append(int(got_logits[-1].argmax()))
            if i < NEW - 1:
                got_logits.append(decoder(torch.tensor(tokens[-1:]), len(tokens) - 1)[-1])
    finally:
        cache.close()
        torch.set_num_threads(threads)
    assert tokens == want.tolist()
    diff = (torch.stack(got_logits) - want_logits[PROMPT - 1 : PROMPT - 1 + NEW]).abs().max().item()
    assert diff < 1e-4
    if kernels.available():
        assert calls["native"] > 0 and calls["linear"] > 0
        # dense projections stay bf16 as stored (the kernels widen them); norms and embeddings fp32
        attn = decoder.layers[0].attn
        assert attn.q_proj.weight.dtype == torch.bfloat16 and decoder.lm_head.weight.dtype == torch.bfloat16
        assert decoder.norm.weight.dtype == torch.float32 and decoder.native_decode
        assert "native kernels" in decoder.describe_decode() and "bfloat16" in decoder.describe_decode()
        # decode steps ran with torch single-threaded (its spinning pool would take our cores)...
        assert (1, 1) in calls["torch_threads"]
        # ...and prefill (12 tokens, torch's BLAS) with the threads it had
        assert 2 in {threads for _, threads in calls["torch_threads"]}
    else:
        assert not decoder.native_decode and decoder.describe_decode().startswith("decode: torch")


def test_decode_threads_lends_torchs_threads_to_the_kernels():
    if not kernels.available():
        pytest.skip("native kernels unavailable")
    from moeinf.kernels import ops

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with kernels.decode_threads():
            assert torch.get_num_threads() == 1 and ops._threads(None) == 3
            x, w = torch.randn(1, 64), torch.randn(40, 64).to(torch.bfloat16)
            assert torch.allclose(kernels.try_linear(x, w), x @ w.float().T, atol=1e-5)
        assert torch.get_num_threads() == 3 and ops._threads(None) == 3
        with pytest.raises(RuntimeError), kernels.decode_threads():
            raise RuntimeError("a failing step")
        assert torch.get_num_threads() == 3  # restored on errors too
    finally:
        torch.set_num_threads(before)


def test_fused_layers_and_expert_at_a_time_give_the_same_bits_at_every_budget(tmp_path, monkeypatch):
    """bf16 on the native path: a layer whose experts are all resident runs as one fused call, others
    expert by expert as transfers land; logits must not change by a bit with the budget."""
    if not kernels.available():
        pytest.skip("native kernels unavailable")
    path = build_checkpoint("mixtral", tmp_path / "mx", seed=1, dtype="bfloat16")
    stored = pull(str(path), name="mx-fused")
    spec = stored.manifest.spec
    calls = {"fused": 0}
    real = kernels.try_moe_forward

    def counting(x, experts, scales):
        calls["fused"] += 1
        return real(x, experts, scales)

    monkeypatch.setattr(kernels, "try_moe_forward", counting)
    total = spec.num_experts * len(spec.moe_layers)
    runs = {}
    for slots in (total, total // 2, spec.top_k):
        cache = ExpertCache(
            stored.expert_path,
            ExpertLayout(spec.hidden_size, spec.expert_dim, spec.dtype),
            slots=slots,
            policy=make_policy("lru"),
            device=torch.device("cpu"),
            dtype=torch.bfloat16,
            bulk_threshold=spec.top_k,
        )
        calls["fused"] = 0
        try:
            decoder = load_decoder(stored, cache, device="cpu", dtype=torch.float32, max_seq_len=64)
            assert all(layer.moe.holding for layer in decoder.layers if layer.is_moe)
            tokens = torch.arange(3, 3 + PROMPT)
            logits = [decoder(tokens, 0)[-1]]
            for i in range(NEW):
                nxt = logits[-1].argmax().view(1)
                logits.append(decoder(nxt, PROMPT + i)[-1])
        finally:
            cache.close()
        runs[slots] = (torch.stack(logits), calls["fused"], cache.stats.total().misses)
    full, fused_full, misses_full = runs[total]
    # everything fits: each decode step's layer is fused unless it met an expert for the first time
    assert NEW * len(spec.moe_layers) - misses_full <= fused_full <= NEW * len(spec.moe_layers)
    for slots, run in runs.items():
        assert torch.equal(run[0], full), slots
    assert runs[spec.top_k][1] < fused_full and runs[spec.top_k][2] > misses_full  # the tight budget mixes
