"""moeinf's Tokenizer against transformers' AutoTokenizer on tokenizers trained in the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeinf.errors import ChatTemplateError, TokenizerError
from moeinf.runtime.tokenizer import Tokenizer
from tests.support_tokenizers import (
    DEEPSEEK_TEMPLATE,
    FEATURES_TEMPLATE,
    MIXTRAL_TEMPLATE,
    OLMOE_TEMPLATE,
    QWEN_TEMPLATE,
    write_bytelevel_style,
    write_llama_style,
)

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world!",
    " leading space and  double  spaces ",
    "The experts 🤖🚀 route tokens: 混合专家模型 — naïve café",
    "line one\nline two\n\n\ttabbed",
    "special <s> and </s> inside text <|im_end|>",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "user", "content": "Hi 🤖"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Explain experts: 专家"},
    ],
]
SYSTEM_CONVERSATION = [{"role": "system", "content": "Be brief."}, *CONVERSATIONS[1]]


def _pair(path: Path) -> tuple[Tokenizer, object]:
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return write_llama_style(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    return write_bytelevel_style(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory) -> Path:
    return write_bytelevel_style(
        tmp_path_factory.mktemp("deepseek"),
        chat_template=DEEPSEEK_TEMPLATE,
        bos="<｜begin▁of▁sentence｜>",
        add_bos_token=True,
    )


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory) -> Path:
    return write_bytelevel_style(
        tmp_path_factory.mktemp("olmoe"), chat_template=OLMOE_TEMPLATE, bos="<|endoftext|>"
    )


@pytest.mark.parametrize("style", ["llama_dir", "qwen_dir", "deepseek_dir", "olmoe_dir"])
def test_raw_encode_and_decode_match_transformers(style, request):
    ours, theirs = _pair(request.getfixturevalue(style))
    for text in TEXTS:
        expected = theirs(text)["input_ids"]
        assert ours.encode(text) == expected, text
        assert (
            ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False)["input_ids"]
        )
        assert ours.decode(expected) == theirs.decode(expected, skip_special_tokens=True)
        assert ours.decode(expected, skip_special_tokens=False) == theirs.decode(expected)


def test_bos_comes_from_post_processor_or_add_bos_token(llama_dir, qwen_dir, deepseek_dir):
    llama, qwen, deepseek = (Tokenizer.from_dir(p) for p in (llama_dir, qwen_dir, deepseek_dir))
    assert llama.encode("hi")[0] == llama.bos_token_id == 1
    assert deepseek.encode("hi")[0] == deepseek.bos_token_id is not None
    assert qwen.bos_token_id is None and qwen.encode("hi") == qwen.encode("hi", add_special_tokens=False)


def test_add_bos_eos_flags_in_config_defer_to_tokenizer_json(tmp_path):
    # transformers 5 ignores add_bos_token/add_eos_token when tokenizer.json exists; so do we.
    ours, theirs = _pair(write_llama_style(tmp_path, add_bos_token=False, add_eos_token=True))
    assert ours.encode("the fox") == theirs("the fox")["input_ids"]
    assert ours.encode("the fox")[0] == ours.bos_token_id and ours.encode("the fox")[-1] != ours.eos_token_id


@pytest.mark.parametrize(
    ("style", "template", "conversations"),
    [
        ("llama_dir", MIXTRAL_TEMPLATE, CONVERSATIONS),
        ("qwen_dir", QWEN_TEMPLATE, [*CONVERSATIONS, SYSTEM_CONVERSATION]),
        ("deepseek_dir", DEEPSEEK_TEMPLATE, [*CONVERSATIONS, SYSTEM_CONVERSATION]),
        ("olmoe_dir", OLMOE_TEMPLATE, [*CONVERSATIONS, SYSTEM_CONVERSATION]),
    ],
)
def test_chat_template_renders_and_encodes_like_transformers(style, template, conversations, request):
    ours, theirs = _pair(request.getfixturevalue(style))
    assert ours.chat_template == template
    for conversation in conversations:
        for add_generation_prompt in (True, False):
            expected = theirs.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert ours.render_chat(conversation, add_generation_prompt=add_generation_prompt) == expected
            ids = theirs.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            assert ours.encode_chat(conversation, add_generation_prompt=add_generation_prompt) == list(ids)


def test_template_environment_features_match_transformers(tmp_path):
    ours, theirs = _pair(write_bytelevel_style(tmp_path, chat_template=FEATURES_TEMPLATE))
    conversation = [
        {"role": "system", "content": "sys & <tags>"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "tool_calls": None},
        {"role": "user", "content": "STOP"},
        {"role": "user", "content": "never shown"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "description": "<x>"}}]
    expected = theirs.apply_chat_template(
        conversation, tools=tools, tokenize=False, add_generation_prompt=True
    )
    rendered = ours.render_chat(conversation, tools=tools)
    assert rendered == expected
    assert '"<b>&</b>"' in rendered and "never shown" not in rendered


def test_raise_exception_in_template_is_a_chat_template_error(llama_dir):
    ours = Tokenizer.from_dir(llama_dir)
    with pytest.raises(ChatTemplateError, match="alternate"):
        ours.render_chat([{"role": "assistant", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        ours.render_chat([])


def test_chat_template_jinja_file_takes_precedence(tmp_path):
    path = write_bytelevel_style(tmp_path, chat_template=QWEN_TEMPLATE)
    (path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    ours, theirs = _pair(path)
    conversation = CONVERSATIONS[1]
    assert ours.render_chat(conversation) == theirs.apply_chat_template(conversation, tokenize=False)
    assert ours.render_chat(conversation).startswith("[Hi 🤖]")


def test_template_list_in_config_uses_default(tmp_path):
    path = write_bytelevel_style(
        tmp_path,
        chat_template=[
            {"name": "default", "template": "D{{ messages[0]['content'] }}"},
            {"name": "rag", "template": "R"},
        ],
    )
    ours, theirs = _pair(path)
    assert ours.render_chat(CONVERSATIONS[0]) == theirs.apply_chat_template(CONVERSATIONS[0], tokenize=False)


def test_special_tokens_map_fills_missing_tokens(tmp_path):
    path = write_bytelevel_style(tmp_path, chat_template="{{ bos_token }}|{{ eos_token }}")
    (path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    ours, theirs = _pair(path)
    assert ours.render_chat(CONVERSATIONS[0]) == theirs.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    assert ours.special_tokens["bos_token"] == "<|im_start|>"


def test_model_without_template_and_missing_files(tmp_path):
    ours = Tokenizer.from_dir(write_bytelevel_style(tmp_path / "a", chat_template=None))
    assert not ours.has_chat_template
    with pytest.raises(ChatTemplateError):
        ours.render_chat(CONVERSATIONS[0])
    with pytest.raises(TokenizerError):
        Tokenizer.from_dir(tmp_path / "empty")


def test_special_ids_and_vocab(qwen_dir):
    ours = Tokenizer.from_dir(qwen_dir)
    im_end = ours.token_id("<|im_end|>")
    assert im_end in ours.special_ids and ours.eos_token_id == im_end
    assert ours.vocab_size == len(json.loads((qwen_dir / "tokenizer.json").read_text())["model"]["vocab"]) + 5


@pytest.mark.parametrize(
    ("writer", "tokenizer_class"),
    [
        (write_llama_style, "LlamaTokenizerFast"),  # Mixtral's tokenizer_config.json names this class
        (write_bytelevel_style, "Qwen2TokenizerFast"),
        (write_bytelevel_style, "GPTNeoXTokenizerFast"),  # OLMoE
    ],
)
def test_model_specific_tokenizer_classes_match(writer, tokenizer_class, tmp_path):
    # transformers 5 rebuilds these classes' pipelines from vocab and merges; tokenizer.json must agree.
    ours, theirs = _pair(writer(tmp_path, tokenizer_class=tokenizer_class))
    assert type(theirs).__name__ != "TokenizersBackend"
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
