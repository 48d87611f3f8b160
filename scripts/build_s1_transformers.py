"""Build the issue-6 measurement model "S1" with transformers and pull it into the store as `s1-hf`.

S1 (../shared/NOTES.md): Mixtral architecture, 24 layers x 32 experts, top-4, hidden 768, expert
hidden 1152, vocab 32000, 12 heads / 4 KV heads, 2.1B parameters; random weights (seed 0) saved in
bf16 with save_pretrained, so the store holds exactly what a hub download of such a model would give.
Needs ~9 GB of RAM (fp32 init) and ~9 GB of disk (checkpoint + store); transformers is a test-only
dependency, hence a script. The tokenizer is the test fixtures' small BPE (ids < 4096 < vocab).

    nice -n 10 .venv/bin/python -m scripts.build_s1_transformers [--work /tmp/s1-hf] [--name s1-hf]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/s1-hf"))
    ap.add_argument("--name", default="s1-hf")
    ap.add_argument("--keep-checkpoint", action="store_true")
    args = ap.parse_args()

    import torch
    from tests.fixtures.checkpoints import build_tokenizer
    from transformers import MixtralConfig, MixtralForCausalLM

    from moeinf.pull import pull

    start = time.perf_counter()
    checkpoint = args.work / "checkpoint"
    checkpoint.mkdir(parents=True, exist_ok=True)
    config = MixtralConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=1152,
        num_hidden_layers=24,
        num_attention_heads=12,
        num_key_value_heads=4,
        num_local_experts=32,
        num_experts_per_tok=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    print(f"built {params / 1e9:.2f}B parameters in {time.perf_counter() - start:.0f} s", flush=True)
    model.save_pretrained(checkpoint, max_shard_size="2GB")
    del model
    build_tokenizer(checkpoint)
    print(f"saved in {time.perf_counter() - start:.0f} s", flush=True)
    stored = pull(str(checkpoint), name=args.name)
    print(f"pulled as {stored.name} in {time.perf_counter() - start:.0f} s: {stored.path}", flush=True)
    if not args.keep_checkpoint:
        shutil.rmtree(checkpoint)


if __name__ == "__main__":
    main()
