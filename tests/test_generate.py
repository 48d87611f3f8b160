"""The generation loop: stopping, streaming text, timings, KV-cache reuse, sampling plumbing.

The model here is `PrefixHashDecoderDouble`, a TEST DOUBLE for the loop's logic only: its logits at a
position are a pseudo-random function of all tokens up to it, read from a KV cache it keeps like the
real decoder, so a wrong position or a wrongly reused cache changes the output. The exactness of the
real decoder under `generate` is tested end to end in test_run_e2e.py.
"""

from __future__ import annotations

import pytest

from moeinf.errors import BadOption, ContextTooLong
from moeinf.runtime.generate import GenerationParams, complete, generate
from moeinf.runtime.sampling import SamplingParams
from moeinf.runtime.tokenizer import Tokenizer
from tests.support_generation import PrefixHashDecoderDouble, make_engine
from tests.support_tokenizers import write_bytelevel_style


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(write_bytelevel_style(tmp_path_factory.mktemp("tok")))


def reference_greedy(tokenizer: Tokenizer, prompt: list[int], n: int) -> list[int]:
    double = PrefixHashDecoderDouble(tokenizer.vocab_size, 10_000)
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(double._logits(seq).argmax()))
    return seq[len(prompt) :]


def test_greedy_steps_tokens_text_and_length(tokenizer):
    engine = make_engine(tokenizer, eos=[])
    prompt = tokenizer.encode("The quick brown fox")
    steps = list(generate(engine, prompt, GenerationParams(max_tokens=12)))
    assert [s.index for s in steps] == list(range(12))
    assert [s.token_id for s in steps] == reference_greedy(tokenizer, prompt, 12)
    assert [s.finish_reason for s in steps] == [None] * 11 + ["length"]
    ids = [s.token_id for s in steps]
    assert "".join(s.text for s in steps) == tokenizer.decode(ids)
    # One prefill of the whole prompt, then one token per decode step.
    calls = engine.decoder.calls
    assert calls[0] == (prompt, 0) and all(len(t) == 1 for t, _ in calls[1:]) and len(calls) == 12
    assert [pos for _, pos in calls[1:]] == list(range(len(prompt), len(prompt) + 11))


def test_timings(tokenizer):
    engine = make_engine(tokenizer, eos=[])
    prompt = tokenizer.encode("hello")
    steps = list(generate(engine, prompt, GenerationParams(max_tokens=5)))
    last = steps[-1].timings
    assert last.prompt_tokens == len(prompt) and last.prompt_cached == 0 and last.generated == 5
    assert last.prompt_s > 0 and last.decode_s > 0 and last.decode_tokens == 4
    assert [s.timings.generated for s in steps] == [1, 2, 3, 4, 5]
    assert steps[0].timings.decode_s == 0 and steps[2].timings.decode_s <= last.decode_s
    assert set(last.to_dict()) >= {"prompt_tokens", "prompt_tps", "decode_tps", "generated"}


def test_eos_stops_unless_ignored(tokenizer):
    eos = tokenizer.eos_token_id
    prompt = tokenizer.encode("hi")
    answer = [*tokenizer.encode(" 混", add_special_tokens=False)[:-1], eos]  # EOS cuts a character short
    script = {len(prompt) + i: t for i, t in enumerate(answer)}
    steps = list(generate(make_engine(tokenizer, script=script), prompt, GenerationParams(max_tokens=10)))
    assert len(steps) == len(answer) and steps[-1].token_id == eos and steps[-1].finish_reason == "eos"
    assert "".join(s.text for s in steps) == " \ufffd"  # the incomplete character is flushed, not lost
    steps = list(
        generate(
            make_engine(tokenizer, script=script), prompt, GenerationParams(max_tokens=10, ignore_eos=True)
        )
    )
    assert len(steps) == 10 and steps[len(answer) - 1].token_id == eos and steps[-1].finish_reason == "length"


def test_any_of_several_eos_ids_stops(tokenizer):
    other = tokenizer.token_id("<|endoftext|>")
    prompt = tokenizer.encode("hi")
    engine = make_engine(tokenizer, script={len(prompt) + 1: other}, eos=[tokenizer.eos_token_id, other])
    steps = list(generate(engine, prompt, GenerationParams(max_tokens=10)))
    assert len(steps) == 2 and steps[-1].finish_reason == "eos"


def test_stop_string_split_over_tokens_truncates_text(tokenizer):
    prompt = tokenizer.encode("Q:")
    answer = tokenizer.encode(" Hello 🤖 world END of it", add_special_tokens=False)
    script = {len(prompt) + i: t for i, t in enumerate(answer)}
    engine = make_engine(tokenizer, script=script)
    result = complete(engine, prompt, GenerationParams(max_tokens=50, stop=("END", "never")))
    assert result.finish_reason == "stop" and result.text == " Hello 🤖 world "
    # The token completing "END" is the last one generated; nothing after it.
    assert tokenizer.decode(result.token_ids).startswith(" Hello 🤖 world E")
    assert len(result.token_ids) < len(answer)


def test_text_held_for_a_possible_stop_is_released_at_the_end(tokenizer):
    prompt = tokenizer.encode("Q:")
    answer = tokenizer.encode(" ab EN", add_special_tokens=False)
    engine = make_engine(tokenizer, script={len(prompt) + i: t for i, t in enumerate(answer)}, eos=[])
    result = complete(engine, prompt, GenerationParams(max_tokens=len(answer), stop=("END",)))
    assert result.finish_reason == "length" and result.text == " ab EN"


def test_context_limit(tokenizer):
    engine = make_engine(tokenizer, context=20, eos=[])
    prompt = tokenizer.encode("The quick brown")
    steps = list(generate(engine, prompt, GenerationParams()))
    assert len(prompt) + len(steps) == 20 and steps[-1].finish_reason == "length"
    with pytest.raises(ContextTooLong, match="20"):
        next(generate(engine, list(range(3, 23)), GenerationParams()))
    with pytest.raises(BadOption):
        next(generate(engine, [], GenerationParams()))


def test_prefix_reuse_matches_a_fresh_run_and_skips_the_shared_prefix(tokenizer):
    engine = make_engine(tokenizer, eos=[])
    first = tokenizer.encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    answer = complete(engine, first, GenerationParams(max_tokens=6))
    follow = [*first, *answer.token_ids, *tokenizer.encode("<|im_end|>\n<|im_start|>user\nMore<|im_end|>\n")]
    engine.decoder.calls.clear()
    again = complete(engine, follow, GenerationParams(max_tokens=6))
    # Everything but the last answer token was in the cache already (the last was sampled, not fed).
    reused = len(first) + len(answer.token_ids) - 1
    assert again.timings.prompt_cached == reused
    assert engine.decoder.calls[0] == (follow[reused:], reused) and engine.decoder.resets == 0
    fresh = complete(make_engine(tokenizer, eos=[]), follow, GenerationParams(max_tokens=6))
    assert again.token_ids == fresh.token_ids and again.text == fresh.text


def test_diverging_prompt_reuses_only_the_common_prefix(tokenizer):
    engine = make_engine(tokenizer, eos=[])
    complete(engine, tokenizer.encode("shared prefix then one way"), GenerationParams(max_tokens=3))
    other = tokenizer.encode("shared prefix and another")
    result = complete(engine, other, GenerationParams(max_tokens=5))
    fresh = complete(make_engine(tokenizer, eos=[]), other, GenerationParams(max_tokens=5))
    assert 0 < result.timings.prompt_cached < len(other) and result.token_ids == fresh.token_ids
    # The same prompt again: all but its last token come from the cache.
    same = complete(engine, other, GenerationParams(max_tokens=5))
    assert same.timings.prompt_cached == len(other) - 1 and same.token_ids == fresh.token_ids
    # Nothing in common: the cache is reset.
    complete(engine, tokenizer.encode("zzz"), GenerationParams(max_tokens=2))
    assert engine.decoder.resets == 1


def test_interrupted_generation_leaves_a_consistent_cache(tokenizer):
    engine = make_engine(tokenizer, eos=[])
    prompt = tokenizer.encode("interrupt me")
    stream = generate(engine, prompt, GenerationParams(max_tokens=20))
    taken = [next(stream).token_id for _ in range(3)]
    stream.close()  # what Ctrl-C in the REPL does
    assert engine.kv_tokens == prompt + taken[:2] == engine.decoder.cache
    follow = prompt + taken + tokenizer.encode(" more", add_special_tokens=False)
    result = complete(engine, follow, GenerationParams(max_tokens=4))
    assert (
        result.token_ids
        == complete(make_engine(tokenizer, eos=[]), follow, GenerationParams(max_tokens=4)).token_ids
    )


def test_seeded_sampling_is_reproducible_through_generate(tokenizer):
    params = GenerationParams(max_tokens=15, sampling=SamplingParams(temperature=1.0, top_k=50, seed=7))
    prompt = tokenizer.encode("sample")
    runs = [complete(make_engine(tokenizer, eos=[]), prompt, params).token_ids for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0] != reference_greedy(tokenizer, prompt, 15)
    other = complete(
        make_engine(tokenizer, eos=[]),
        prompt,
        GenerationParams(max_tokens=15, sampling=params.sampling.replace(seed=8)),
    )
    assert other.token_ids != runs[0]


def test_repetition_penalty_sees_prompt_and_generated_tokens(tokenizer):
    prompt = tokenizer.encode("the the the")
    params = GenerationParams(max_tokens=30, sampling=SamplingParams(repeat_penalty=1e6))
    ids = complete(make_engine(tokenizer, eos=[]), prompt, params).token_ids
    assert len(set(ids)) == len(ids) and not set(ids) & set(prompt)


def test_last_step_carries_cache_stats_from_the_provider(tokenizer):
    class StatsDouble:
        def to_dict(self) -> dict:
            return {"hits": 3}

    class ProviderDouble:
        stats = StatsDouble()

    engine = make_engine(tokenizer, eos=[])
    engine.provider = ProviderDouble()
    steps = list(generate(engine, tokenizer.encode("x"), GenerationParams(max_tokens=3)))
    assert steps[-1].cache == {"hits": 3} and steps[0].cache == {}
    assert make_engine(tokenizer).cache_stats() == {}
