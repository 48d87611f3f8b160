"""The `run` REPL and chat session in-process: commands, multi-line input, conversation, Ctrl-C, Ctrl-D.

The model is the generation-loop test double (tests/support_generation.py); the real model through a
real terminal is tested in test_run_e2e.py.
"""

from __future__ import annotations

import io

import pytest

from moeinf.cli.repl import Repl
from moeinf.cli.session import ChatSession, format_stats, with_parameter
from moeinf.errors import BadOption
from moeinf.runtime.generate import GenerationParams
from moeinf.runtime.tokenizer import Tokenizer
from tests.support_generation import make_engine
from tests.support_tokenizers import write_bytelevel_style


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_dir(write_bytelevel_style(tmp_path_factory.mktemp("tok")))


def lines(*items):
    """A read_line function that plays `items` (an exception instance is raised), then Ctrl-D."""
    queue = list(items)
    prompts: list[str] = []

    def read_line(prompt: str) -> str:
        prompts.append(prompt)
        if not queue:
            raise EOFError
        item = queue.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    read_line.prompts = prompts  # type: ignore[attr-defined]
    return read_line


def repl_for(tokenizer, *inputs, verbose=False, **engine_kwargs):
    engine = make_engine(tokenizer, eos=[], **engine_kwargs)
    session = ChatSession(engine, GenerationParams(max_tokens=5))
    out, err = io.StringIO(), io.StringIO()
    read_line = lines(*inputs)
    repl = Repl(session, read_line=read_line, out=out, err=err, verbose=verbose)
    repl.run()
    return session, out.getvalue(), err.getvalue(), read_line.prompts


def test_conversation_is_kept_and_the_kv_cache_reused(tokenizer):
    session, out, _, prompts = repl_for(tokenizer, "Hello there", "And again?")
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert session.messages[2]["content"] == "And again?"
    assert prompts == [">>> "] * 3  # two messages, then Ctrl-D
    # The second prompt holds the first turn; most of it came from the KV cache.
    ids = session.prompt_ids("next")
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello there"
    )
    assert session.engine.kv_tokens and out.endswith("\n\n\n")


def test_prefix_reuse_across_turns(tokenizer):
    engine = make_engine(tokenizer, eos=[])
    session = ChatSession(engine, GenerationParams(max_tokens=4))
    first = list(session.ask("Hi"))
    second = list(session.ask("More"))
    assert first[-1].timings.prompt_cached == 0
    assert second[-1].timings.prompt_cached >= first[-1].timings.prompt_tokens


def test_multiline_input(tokenizer):
    session, _, _, prompts = repl_for(tokenizer, '"""first line', "second line", 'third"""')
    assert session.messages[0]["content"] == "first line\nsecond line\nthird"
    assert prompts[:3] == [">>> ", "... ", "... "]
    session, _, _, _ = repl_for(tokenizer, '"""one line"""')
    assert session.messages[0]["content"] == "one line"


def test_set_parameter_system_verbose_show_clear(tokenizer):
    session, out, err, _ = repl_for(
        tokenizer,
        "/set parameter temperature 0.5",
        "/set parameter num_predict 3",
        "/set parameter stop END ###",
        "/set system You are terse.",
        "/show info",
        "/set verbose",
        "hello",
        "/clear",
        "/set parameter nonsense 1",
        "/set parameter top_k abc",
        "/whatever",
        "/?",
    )
    assert session.params.sampling.temperature == 0.5 and session.params.max_tokens == 3
    assert session.params.stop == ("END", "###") and session.system == "You are terse."
    assert "Set parameter 'temperature' to '0.5'" in out and "Set system message." in out
    assert "context length" in out and "temperature" in out
    assert "prompt eval count:" in err and "eval rate:" in err and "load duration:" in err
    assert session.messages == [] and "Cleared session context" in out
    assert "Error: unknown parameter 'nonsense'" in out and "needs a int" in out
    assert "Unknown command '/whatever'" in out and "/set parameter" in out
    assert "You are terse." in tokenizer.decode(session.prompt_ids("x"), skip_special_tokens=False)


def test_bye_ends_and_ctrl_c_at_the_prompt_does_not(tokenizer):
    session, out, _, prompts = repl_for(tokenizer, KeyboardInterrupt(), "/bye", "never read")
    assert "Use Ctrl + d or /bye to exit." in out and len(prompts) == 2 and session.messages == []


def test_ctrl_c_stops_the_answer_and_forgets_the_turn(tokenizer):
    engine = make_engine(tokenizer, eos=[])
    calls = {"n": 0}
    forward = engine.decoder.forward

    def interrupted_forward(tokens, start_pos, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # the second decode step of the first answer
            raise KeyboardInterrupt
        return forward(tokens, start_pos, **kw)

    engine.decoder.forward = interrupted_forward
    session = ChatSession(engine, GenerationParams(max_tokens=5))
    out = io.StringIO()
    Repl(session, read_line=lines("first", "second"), out=out, err=io.StringIO()).run()
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["second"]
    # After the interruption the cache still describes exactly what the decoder holds.
    assert engine.kv_tokens == engine.decoder.cache


def test_with_parameter_validates():
    params = GenerationParams()
    assert with_parameter(params, "seed", "42").sampling.seed == 42
    assert with_parameter(params, "num_predict", "-1").max_tokens is None
    with pytest.raises(BadOption):
        with_parameter(params, "temperature", "-2")


def test_verbose_block_format(tokenizer):
    from moeinf.runtime.generate import Timings

    text = format_stats(
        1.5, 2.0, Timings(10, 4, 0.5, 8, 0.7, 0.1), {"requests": 10, "hits": 9, "hit_rate": 0.9}
    )
    assert "prompt eval count:    6 token(s)" in text and "prompt cache count:   4 token(s)" in text
    assert "eval rate:            10.00 tokens/s" in text and "expert cache hits:    9/10 (90.0%)" in text
