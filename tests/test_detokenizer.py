"""Streaming detokenisation on real byte-fallback and byte-level tokenizers, and stop strings."""

from __future__ import annotations

import random

import pytest

from moeinf.runtime.detokenizer import REPLACEMENT, StopMatcher, StreamDecoder
from moeinf.runtime.tokenizer import Tokenizer
from tests.support_tokenizers import write_bytelevel_style, write_llama_style

TEXTS = [
    "Hello 🤖🚀 world! 混合专家模型 naïve café — ok",
    "👨‍👩‍👧‍👦 family, 日本語のテキスト, Ελληνικά, emoji at end 🎉",
    "plain ascii text with the quick brown fox",
    "  spaces   and\nnewlines\n\n混",
]


@pytest.fixture(scope="module", params=["llama", "bytelevel"])
def tokenizer(request, tmp_path_factory) -> Tokenizer:
    out = tmp_path_factory.mktemp(request.param)
    path = write_llama_style(out) if request.param == "llama" else write_bytelevel_style(out)
    return Tokenizer.from_dir(path)


def _stream(tokenizer: Tokenizer, ids: list[int], context: list[int] = ()) -> list[str]:
    decoder = StreamDecoder(tokenizer, context=context)
    deltas = [decoder.add(i) for i in ids]
    deltas.append(decoder.flush())
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_whole_characters_and_add_up(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids)
    assert full.strip() == text.strip()  # both tokenizers round-trip these (Strip may eat a leading space)
    deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == full
    assert not any(REPLACEMENT in d for d in deltas)
    # Emitted text is always a prefix of the final text: nothing is taken back or lost.
    emitted = ""
    for d in deltas:
        emitted += d
        assert full.startswith(emitted)


def test_multibyte_characters_really_span_several_tokens(tokenizer):
    # Guard for the test above: the vocabularies are too small to hold these characters whole.
    ids = tokenizer.encode("混🤖", add_special_tokens=False)
    assert len(ids) >= 4
    assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids)


def test_byte_fallback_tokens_are_used(tmp_path):
    tok = Tokenizer.from_dir(write_llama_style(tmp_path))
    ids = tok.encode("混", add_special_tokens=False)
    assert [tok.id_to_token(i) for i in ids][-3:] == ["<0xE6>", "<0xB7>", "<0xB7>"]
    deltas = _stream(tok, ids)
    assert deltas[-4:] == ["", "", "混", ""]


def test_context_keeps_the_leading_space_of_a_continuation(tokenizer):
    prompt = tokenizer.encode("The quick", add_special_tokens=True)
    # Metaspace writes the space as "▁" before "brown"; byte-level as "Ġ": either way it is in the ids.
    candidates = [tokenizer.encode(t, add_special_tokens=False) for t in ("brown fox 🦊", " brown fox 🦊")]
    generated = next(c for c in candidates if tokenizer.decode(prompt + c) == "The quick brown fox 🦊")
    assert tokenizer.decode(generated).lstrip() == "brown fox 🦊"  # alone, Metaspace's Strip drops the space
    assert "".join(_stream(tokenizer, generated, context=prompt)) == " brown fox 🦊"


def test_context_that_ends_inside_a_character(tokenizer):
    ids = tokenizer.encode("ab混c", add_special_tokens=False)
    split = next(i for i in range(1, len(ids)) if REPLACEMENT in tokenizer.decode(ids[:i]))
    assert "".join(_stream(tokenizer, ids[split:], context=ids[:split])) == tokenizer.decode(ids)[len("ab") :]


def test_special_tokens_are_skipped(tmp_path):
    tok = Tokenizer.from_dir(write_bytelevel_style(tmp_path))
    ids = tok.encode("hi<|im_end|>there", add_special_tokens=False)
    assert tok.token_id("<|im_end|>") in ids
    assert "".join(_stream(tok, ids)) == "hithere"


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tmp_path):
    tok = Tokenizer.from_dir(write_llama_style(tmp_path))
    ids = tok.encode("ok混", add_special_tokens=False)[:-1]  # drop the last byte of 混
    deltas = _stream(tok, ids)
    assert "".join(deltas[:-1]) == "ok"
    assert deltas[-1] == tok.decode(ids)[2:] and REPLACEMENT in deltas[-1]


def test_random_token_streams_match_full_decode(tokenizer):
    rng = random.Random(0)
    ids_pool = tokenizer.encode(" ".join(TEXTS), add_special_tokens=False)
    checked = 0
    while checked < 20:
        start = rng.randrange(len(ids_pool) - 10)
        ids = ids_pool[start : start + rng.randrange(1, 40)]
        if REPLACEMENT in tokenizer.decode(ids):
            # Cut inside a character: byte fallback then turns the whole byte run into U+FFFD, where the
            # stream keeps each complete character; that case is covered by the tests above.
            continue
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids)
        checked += 1


# -- stop strings --------------------------------------------------------------------------------


def _feed_all(matcher: StopMatcher, deltas: list[str]) -> tuple[str, bool]:
    out = ""
    for d in deltas:
        text, stopped = matcher.feed(d)
        out += text
        if stopped:
            return out, True
    return out + matcher.flush(), False


def test_stop_string_split_across_deltas():
    matcher = StopMatcher(["<|end|>"])
    assert matcher.feed("Hello <|") == ("Hello ", False)  # "<|" held back: may start the stop string
    assert matcher.feed("en") == ("", False)
    assert matcher.feed("d|> more") == ("", True)
    assert matcher.feed("ignored") == ("", True)


def test_partial_stop_that_does_not_complete_is_released():
    assert _feed_all(StopMatcher(["STOP"]), ["a ST", "OR", "Y"]) == ("a STORY", False)
    assert _feed_all(StopMatcher(["STOP"]), ["ends with ST"]) == ("ends with ST", False)


def test_earliest_of_several_stops_wins_and_multibyte_stops():
    assert _feed_all(StopMatcher(["world", "lo w"]), ["hel", "lo wor", "ld"]) == ("hel", True)
    assert _feed_all(StopMatcher(["混合"]), ["专家", "混", "合模型"]) == ("专家", True)
    assert _feed_all(StopMatcher(["\n\n"]), ["line\n", "\nnext"]) == ("line", True)


def test_no_stops_passes_text_through():
    matcher = StopMatcher([])
    assert matcher.feed("abc") == ("abc", False) and matcher.flush() == ""


def test_stop_strings_over_real_token_stream(tokenizer):
    text = "Hello 🤖 world! 混合专家 stop here"
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder, matcher = StreamDecoder(tokenizer), StopMatcher(["专家"])
    out = ""
    for i in ids:
        emitted, stopped = matcher.feed(decoder.add(i))
        out += emitted
        if stopped:
            break
    assert stopped and out == "Hello 🤖 world! 混合"
