"""The expert cache is invisible in the output: for every family, at budgets from one layer's top-k to
all experts, with lru, lfu and trace, with and without (scripted, random) prefetching, greedy tokens
equal transformers' and the last logits are bit-identical to the all-resident run.
"""

from __future__ import annotations

import random

import pytest
import torch

from moeinf.pull import pull
from moeinf.runtime.cache_plan import model_policy
from moeinf.runtime.engine import Engine
from moeinf.runtime.expert_cache import ExpertCache
from moeinf.runtime.expert_key import ExpertKey
from moeinf.runtime.expert_store import ExpertLayout
from moeinf.runtime.generate import GenerationParams, complete
from moeinf.runtime.policy import LfuPolicy, LruPolicy
from moeinf.runtime.trace_library import open_model_library
from tests.fixtures.checkpoints import FAMILIES
from tests.test_run_e2e import PROMPT, hf_greedy, hf_pair

N = 16


def with_random_prefetch(base: type, seed: int, spec):
    """A scripted prefetcher: after each layer, ask for a few random experts of the next MoE layers."""

    class Prefetching(base):
        def __init__(self) -> None:
            super().__init__()
            self.rng = random.Random(seed)

        def plan_prefetch(self, layer: int, expert_ids):
            later = [m for m in spec.moe_layers if m > layer] or list(spec.moe_layers)
            return [
                ExpertKey(self.rng.choice(later), self.rng.randrange(spec.num_experts))
                for _ in range(spec.top_k)
            ]

    return Prefetching()


def run(stored, prompt_ids, slots: int | None, policy, dtype: torch.dtype | None = None):
    spec = stored.manifest.spec
    layout = ExpertLayout(spec.hidden_size, spec.expert_dim, spec.dtype)
    total = spec.num_experts * len(spec.moe_layers)
    caches = []

    def provider(stored_model, device, dtype):
        cache = ExpertCache(
            stored_model.expert_path,
            layout,
            slots=total if slots is None else slots,
            policy=policy,
            device=device,
            dtype=dtype,
            bulk_threshold=spec.top_k,
        )
        caches.append(cache)
        return cache

    engine = Engine.load(stored.name, device="cpu", dtype=dtype, provider=provider)
    try:
        result = complete(engine, prompt_ids, GenerationParams(max_tokens=N, ignore_eos=True))
        sequence = prompt_ids + result.token_ids[:-1]
        engine.reset()
        logits = engine.decoder.forward(torch.tensor(sequence), 0, last_only=True)[0]
        stats = caches[0].stats.total()
        assert stats.hits + stats.misses == stats.requests
        if slots is not None:
            assert len(caches[0].resident()) <= slots
        return result.token_ids, logits
    finally:
        engine.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_is_invisible(family, checkpoint):
    ckpt = checkpoint(family)
    stored = pull(str(ckpt), name=family)
    spec = stored.manifest.spec
    model, tokenizer = hf_pair(ckpt)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    expected = hf_greedy(model, prompt_ids, N)

    tokens, reference_logits = run(stored, prompt_ids, None, LruPolicy())
    assert tokens == expected
    total = spec.num_experts * len(spec.moe_layers)
    budgets = sorted({spec.top_k, max(spec.top_k, total // 4), max(spec.top_k, total // 2)})
    # Each (policy, prefetch) pair at one or two budgets keeps the test fast; test_expert_cache.py
    # covers every combination on the cache alone.
    combos = [(LruPolicy, False), (LfuPolicy, True), (LfuPolicy, False), (LruPolicy, True)]
    for i, slots in enumerate(budgets):
        for base, prefetch in combos[(2 * i) % 4 : (2 * i) % 4 + 2]:
            policy = with_random_prefetch(base, i, spec) if prefetch else base()
            tokens, logits = run(stored, prompt_ids, slots, policy)
            where = f"{family} slots={slots} {base.name} prefetch={prefetch}"
            assert tokens == expected, where
            assert torch.equal(logits, reference_logits), where
    # The trace policy (bypass, prefetch, next-layer router lookahead) with the model's library.
    for slots in budgets[:2]:
        policy = model_policy("trace", stored)
        tokens, logits = run(stored, prompt_ids, slots, policy)
        assert tokens == expected, f"{family} slots={slots} trace"
        assert torch.equal(logits, reference_logits), f"{family} slots={slots} trace"
    assert len(open_model_library(stored)) >= 1  # finished requests went into the library
    # Half activations (CUDA's default) with the router lookahead on: a family that routes in fp32
    # keeps its router weight fp32 (DeepSeek-V3), and the lookahead must route as the block does.
    half, _ = run(stored, prompt_ids, None, LruPolicy(), dtype=torch.bfloat16)
    tokens, _ = run(stored, prompt_ids, budgets[0], model_policy("trace", stored), dtype=torch.bfloat16)
    assert tokens == half, f"{family} bf16 trace"
