"""Engine.load: pull-if-missing, device/dtype/threads/context choices, EOS ids, and the provider seam."""

from __future__ import annotations

import pytest
import torch

from moeinf.errors import BadOption, ModelNotFound
from moeinf.runtime.engine import Engine, default_threads, eos_token_ids, pick_device, pick_dtype
from moeinf.runtime.generate import GenerationParams, complete, generate
from moeinf.runtime.resident import ResidentProvider
from moeinf.runtime.tokenizer import Tokenizer
from tests.support_tokenizers import write_bytelevel_style


def test_device_and_dtype_choices():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype(None, torch.device("cpu")) == torch.float32
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(BadOption):
        pick_dtype("int3", torch.device("cpu"))
    with pytest.raises(BadOption):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BadOption, match="no CUDA"):
            pick_device("cuda")


def test_default_threads_is_one_per_physical_core():
    import os

    assert 1 <= default_threads() <= len(os.sched_getaffinity(0))


def test_eos_ids_follow_transformers_precedence(tmp_path):
    tok = Tokenizer.from_dir(write_bytelevel_style(tmp_path))
    assert eos_token_ids({"eos_token_id": [5, 7]}, {"eos_token_id": 2}, tok) == {5, 7}
    assert eos_token_ids({}, {"eos_token_id": 2}, tok) == {2}
    assert eos_token_ids({}, {}, tok) == {tok.eos_token_id}


def test_load_pulls_a_missing_model_then_opens_it(checkpoint):
    events = []
    engine = Engine.load(str(checkpoint("olmoe")), device="cpu", progress=events.append)
    assert any(e.kind == "done" for e in events) and engine.name == "olmoe"
    assert engine.spec.family == "olmoe" and engine.load_s > 0
    # The fixture's max_position_embeddings (256) caps the default context of 4096.
    assert engine.context_length == 256 and engine.device.type == "cpu" and engine.dtype == torch.float32
    assert engine.eos_token_ids == {2} and engine.default_sampling().greedy
    events.clear()
    again = Engine.load("olmoe", device="cpu", context_length=64, progress=events.append)
    assert events == [] and again.context_length == 64


def test_unknown_model_is_model_not_found():
    with pytest.raises(ModelNotFound):
        Engine.load("not-pulled-anywhere", device="cpu")


def test_threads_option_sets_torch_threads(checkpoint):
    before = torch.get_num_threads()
    try:
        engine = Engine.load(str(checkpoint("olmoe")), device="cpu", threads=1)
        assert torch.get_num_threads() == 1 and engine.threads == 1
        with pytest.raises(BadOption):
            Engine.load("olmoe", device="cpu", threads=0)
    finally:
        torch.set_num_threads(before)


def test_provider_factory_seam_with_the_expert_cache(checkpoint):
    from moeinf.runtime.cache_plan import cache_factory

    ckpt = str(checkpoint("mixtral"))
    resident = Engine.load(ckpt, device="cpu")
    assert isinstance(resident.provider, ResidentProvider) and resident.cache_stats() == {}
    prompt = resident.tokenizer.encode("Hello world")
    params = GenerationParams(max_tokens=12, ignore_eos=True)
    expected = complete(resident, prompt, params).token_ids

    cached = Engine.load("mixtral", device="cpu", provider=cache_factory(ram_mem="50%"))
    try:
        steps = list(generate(cached, prompt, params))
        assert [s.token_id for s in steps] == expected
        stats = steps[-1].cache
        assert stats["requests"] == stats["hits"] + stats["misses"] > 0
    finally:
        cached.close()


def test_trace_policy_only_records_when_every_expert_fits(checkpoint):
    """At a budget that holds every expert nothing is evicted: `trace` skips its per-layer bookkeeping
    (and the decoder its router lookahead) but still feeds the model's trace library."""
    from moeinf.runtime.cache_plan import cache_factory, describe
    from moeinf.runtime.trace_library import LibraryRecorder, open_model_library
    from moeinf.runtime.trace_policy import TracePolicy
    from moeinf.runtime.trace_policy_native import native_class

    trace_policy = native_class() or TracePolicy  # the C core where it builds
    ckpt = str(checkpoint("mixtral"))
    resident = Engine.load(ckpt, device="cpu")
    prompt = resident.tokenizer.encode("Hello world")
    params = GenerationParams(max_tokens=8, ignore_eos=True)
    expected = complete(resident, prompt, params).token_ids
    plans = []
    for budget, kind in (("100%", LibraryRecorder), ("50%", trace_policy)):
        engine = Engine.load(
            "mixtral",
            device="cpu",
            provider=cache_factory(ram_mem=budget, policy="trace", on_plan=lambda p, c: plans.append(p)),
        )
        try:
            assert type(engine.provider.policy) is kind
            assert engine.provider.wants_lookahead == (kind is trace_policy)
            before = open_model_library(engine.stored).requests.sum()
            assert complete(engine, prompt, params).token_ids == expected
            assert open_model_library(engine.stored).requests.sum() == before + 1  # the request was learnt
        finally:
            engine.close()
    assert any("only records" in line for line in describe(plans[0]))
    assert not any("only records" in line for line in describe(plans[1]))


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])  # GQA keys/values, MLA latent + rope key
def test_kv_cache_size_is_known_before_allocating(family):
    from transformers import AutoConfig

    from moeinf.models.adapters import adapter_for
    from moeinf.runtime import kv_cache
    from tests.fixtures.checkpoints import tiny_config

    config = AutoConfig.for_model(family, **tiny_config(family)).to_dict()
    spec = adapter_for(config).spec(config)
    for dtype in (torch.float32, torch.bfloat16):
        caches = kv_cache.allocate(spec, 48, torch.device("cpu"), dtype)
        assert kv_cache.bytes_for(spec, 48, dtype) == kv_cache.nbytes(caches)


def test_context_whose_kv_cache_does_not_fit_is_refused_before_allocating(checkpoint, monkeypatch):
    """A --num-ctx whose KV cache exceeds the memory left beside the dense weights: a clear error, not
    a zeroed allocation that swaps; the expert budget is planned after the KV cache is taken."""
    from moeinf.errors import KVCacheDoesNotFit
    from moeinf.runtime import cache_plan, kv_cache
    from moeinf.store import Store

    ckpt = str(checkpoint("mixtral"))
    Engine.load(ckpt, device="cpu", context_length=8)  # pulled into the store
    stored = Store().open("mixtral")
    dense = cache_plan.dense_bytes_for(stored, torch.float32)
    kv = kv_cache.bytes_for(stored.manifest.spec, 256, torch.float32)
    monkeypatch.setattr(cache_plan, "available_ram", lambda: dense + kv - 1)
    with pytest.raises(KVCacheDoesNotFit, match="context of 256 tokens needs .* lower --num-ctx"):
        Engine.load("mixtral", device="cpu", dtype="float32", context_length=256)
    monkeypatch.setattr(cache_plan, "available_ram", lambda: dense + kv)
    assert Engine.load("mixtral", device="cpu", dtype="float32", context_length=256).context_length == 256
