"""Train the demo model's byte-level BPE tokenizer with `tokenizers` on the corpus from corpus.py.

Writes tokenizer.json, tokenizer_config.json (eos/bos token, chat template) and special_tokens_map.json.
Every domain contributes the same number of bytes so that no domain dominates the merges.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from corpus import DOMAINS, read_documents
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|pad|>"]
# The demo model is a base (completion) model: the template passes the text through unchanged, so
# `moeinf run demo "def main("` continues the prompt instead of wrapping it in role markers it never saw.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% if not loop.last %}\n{% endif %}{% endfor %}"
)


def training_texts(corpus_dir: Path, bytes_per_domain: int) -> list[str]:
    texts = []
    for domain in DOMAINS:
        taken = 0
        for doc in read_documents(corpus_dir / f"{domain}.train.txt"):
            texts.append(doc)
            taken += len(doc)
            if taken >= bytes_per_domain:
                break
    return texts


def train_tokenizer(corpus_dir: Path, out_dir: Path, vocab_size: int, bytes_per_domain: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(corpus_dir, bytes_per_domain), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "unk_token": None,
        "pad_token": "<|pad|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": EOS, "eos_token": EOS, "pad_token": "<|pad|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("build/demo_model/corpus"))
    parser.add_argument("--out", type=Path, default=Path("build/demo_model/tokenizer"))
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--mb-per-domain", type=float, default=1.5)
    args = parser.parse_args()
    tok = train_tokenizer(args.corpus, args.out, args.vocab_size, int(args.mb_per_domain * 1e6))
    for domain in DOMAINS:
        text = (args.corpus / f"{domain}.val.txt").read_text(encoding="utf-8")[:200_000]
        n = len(tok.encode(text).ids)
        print(f"{domain:6s} {len(text.encode()) / n:.2f} bytes/token on held-out text")


if __name__ == "__main__":
    main()
