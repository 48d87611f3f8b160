"""Print a few continuations of in-domain prompts from the demo model (dev tooling; uses transformers).

Used to judge by eye whether each domain's text is recognisable; greedy unless --temperature > 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import MixtralForCausalLM

PROMPTS = {
    "code": "def read_config(path):\n",
    "docs": "The :mod:`socket` module provides",
    "bible": "Genesis 12\n\n  1 Now the LORD said unto Abram,",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("src/moeinf/demo"))
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    model = MixtralForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    for domain, prompt in PROMPTS.items():
        ids = torch.tensor([tok.encode(prompt).ids])
        sampling = {"do_sample": True, "temperature": args.temperature, "top_k": 0, "top_p": 0.95}
        kwargs = sampling if args.temperature > 0 else {"do_sample": False}
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, **kwargs)
        print(f"--- {domain} ---\n{prompt}{tok.decode(out[0, ids.shape[1] :].tolist())}\n", flush=True)


if __name__ == "__main__":
    main()
