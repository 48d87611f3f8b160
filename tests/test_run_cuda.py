"""`moeinf run` and the Python API on a CUDA device (skipped without one).

fp32 on the GPU must give transformers' greedy tokens (transformers also on the GPU, fp32); the
default dtype on CUDA is bf16 and must run through the CLI; the expert cache with a GPU tier must give
the same tokens as all-resident experts.
"""

from __future__ import annotations

import pytest
import torch

from moeinf.runtime.engine import Engine
from moeinf.runtime.generate import GenerationParams, complete
from tests.fixtures.checkpoints import FAMILIES
from tests.test_run_e2e import PROMPT, N, hf_greedy, hf_pair, run_json

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_greedy_on_cuda_equals_transformers_on_cuda(family, checkpoint):
    ckpt = checkpoint(family)
    model, tokenizer = hf_pair(ckpt)
    model = model.cuda()
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids], device="cuda"),
            do_sample=False,
            max_new_tokens=N,
            min_new_tokens=N,
            pad_token_id=0,
        )
    expected = out[0, len(prompt_ids) :].tolist()
    engine = Engine.load(str(ckpt), device="cuda", dtype="float32")
    assert engine.device.type == "cuda"
    result = complete(engine, prompt_ids, GenerationParams(max_tokens=N, ignore_eos=True))
    assert result.token_ids == expected
    assert result.token_ids == hf_greedy(model.cpu(), prompt_ids, N)  # and what the CPU gives


def test_cli_defaults_to_bf16_on_cuda(checkpoint):
    ckpt = str(checkpoint("deepseek_v3"))
    out = run_json(ckpt, PROMPT, "--raw", "--ignore-eos", "--max-tokens", "16", device="auto")
    assert len(out["token_ids"]) == 16 and out["stats"]["decode_tps"] > 0
    engine = Engine.load("deepseek_v3", device="auto")
    assert engine.device.type == "cuda" and engine.dtype == torch.bfloat16


def test_expert_cache_on_cuda_gives_the_resident_tokens(checkpoint):
    from moeinf.runtime.cache_plan import cache_factory

    ckpt = str(checkpoint("qwen2_moe"))
    params = GenerationParams(max_tokens=N, ignore_eos=True)
    resident = Engine.load(ckpt, device="cuda", dtype="float32")
    prompt = resident.tokenizer.encode(PROMPT)
    expected = complete(resident, prompt, params).token_ids
    cached = Engine.load(
        "qwen2_moe", device="cuda", dtype="float32", provider=cache_factory(gpu_mem="40%", ram_mem="100%")
    )
    try:
        result = complete(cached, prompt, params)
        assert result.token_ids == expected and result.cache["requests"] > 0
    finally:
        cached.close()
