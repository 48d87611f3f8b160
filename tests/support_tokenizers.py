"""Tiny real tokenizers, trained in-process, in the styles of the families' checkpoints (test-only).

- `write_llama_style`: Mixtral/Mistral: BPE with byte fallback (`<0xE4>` tokens), Metaspace `▁`,
  decoder Replace/ByteFallback/Fuse/Strip, BOS added by the post-processor.
- `write_bytelevel_style`: Qwen/DeepSeek/OLMoE: byte-level BPE (GPT-2 alphabet), special tokens as
  added tokens; optionally a BOS added by the post-processor as DeepSeek's tokenizer.json does.
Each writes tokenizer.json + tokenizer_config.json (+ chat template) into a directory that both
moeinf's Tokenizer and transformers' AutoTokenizer load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world! How are you today?",
    "Mixture of experts models route each token to a few experts out of many.",
    "def forward(self, x): return self.down(silu(self.gate(x)) * self.up(x))",
    "numbers 0123456789 and punctuation: ; , . ! ? ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ `",
] * 8

# Templates shaped like the real checkpoints' (whitespace control, raise_exception, loop variables).
MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEEPSEEK_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# OLMoE/Tulu style: one statement per line, relying on trim_blocks and lstrip_blocks.
OLMOE_TEMPLATE = """{{ bos_token }}{% for message in messages %}
    {% if message['role'] == 'system' %}
{{ '<|system|>\\n' + message['content'] + '\\n' }}
    {% elif message['role'] == 'user' %}
{{ '<|user|>\\n' + message['content'] + '\\n' }}
    {% elif message['role'] == 'assistant' %}
        {% if not loop.last %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}
        {% else %}
{{ '<|assistant|>\\n'  + message['content'] + eos_token }}
        {% endif %}
    {% endif %}
    {% if loop.last and add_generation_prompt %}
{{ '<|assistant|>\\n' }}
    {% endif %}
{% endfor %}"""
# Exercises the environment: namespace, loop controls, tojson (non-escaping), dict(), generation tag.
FEATURES_TEMPLATE = """{%- set ns = namespace(system='') -%}
{%- for m in messages -%}
  {%- if m['role'] == 'system' %}{% set ns.system = m['content'] %}{% continue %}{% endif -%}
  {%- if m['content'] == 'STOP' %}{% break %}{% endif -%}
<{{ m['role'] }}>{% generation %}{{ m['content'] }}{% endgeneration %}</{{ m['role'] }}>
{% endfor -%}
{{ {'system': ns.system, 'html': '<b>&</b>', 'unicode': 'é'} | tojson }}
{{ dict(a=1) | tojson(indent=2) }}
{%- if tools %}{{ tools | tojson }}{% endif -%}
{%- if add_generation_prompt %}<assistant>{% endif -%}"""


def _train_bpe(pre_tokenizer: Any, vocab_size: int, alphabet: list[str]) -> dict:
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return json.loads(tok.to_str())["model"]


def write_llama_style(out: Path, *, chat_template: str | None = MIXTRAL_TEMPLATE, **config: Any) -> Path:
    """Mistral-style tokenizer: byte-fallback BPE over `▁`-joined words; BOS from the post-processor."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    out.mkdir(parents=True, exist_ok=True)
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trained = _train_bpe(metaspace, 400, [])
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True)
    )
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.save(str(out / "tokenizer.json"))
    cfg: dict[str, Any] = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        **config,
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return out


BYTELEVEL_SPECIALS = (
    "<|endoftext|>",
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<|im_start|>",
    "<|im_end|>",
)


def write_bytelevel_style(
    out: Path, *, chat_template: str | None = QWEN_TEMPLATE, bos: str | None = None, **config: Any
) -> Path:
    """Qwen/DeepSeek/OLMoE-style byte-level BPE; with `bos` the post-processor adds it (DeepSeek)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    out.mkdir(parents=True, exist_ok=True)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trained = _train_bpe(byte_level, 500, pre_tokenizers.ByteLevel.alphabet())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=trained["vocab"], merges=merges))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BYTELEVEL_SPECIALS])
    if bos is not None:  # DeepSeek's tokenizer.json adds BOS in its post-processor
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    tok.save(str(out / "tokenizer.json"))
    cfg: dict[str, Any] = {
        "eos_token": "<|im_end|>" if bos is None else "<｜end▁of▁sentence｜>",
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        **config,
    }
    if bos is not None:
        cfg["bos_token"] = {
            "__type": "AddedToken",
            "content": bos,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return out
