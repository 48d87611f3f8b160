"""Decode speed of moeinf against transformers' `generate` on the same weights, all experts resident.

Issue 3, section 5. For each model: a synthetic Mixtral checkpoint (random fp32 weights) is written,
pulled into a temporary store, and both engines generate greedily with the same threads, alternating
run by run. Time to first token = time to generate 1 token; decode tokens/s = (N - 1) / (t(N) - t(1)).
Medians over --repeat runs. Prints a Markdown table.

    nice -n 10 .venv/bin/python scripts/bench_vs_transformers.py --repeat 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

MODELS = {  # name: (shape, dim, expert_dim)
    "tiny (4x8 experts, top-2, d256)": ("4x8x2", 256, 512),
    "~1 GB fp32 (8x8 experts, top-2, d768)": ("8x8x2", 768, 1536),
}
PROMPT = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n"


def time_moeinf(engine, prompt_ids: list[int], n: int) -> float:
    from moeinf.runtime.generate import GenerationParams, complete

    engine.reset()  # no prompt reuse between runs
    start = time.perf_counter()
    complete(engine, prompt_ids, GenerationParams(max_tokens=n, ignore_eos=True))
    return time.perf_counter() - start


def time_hf(model, prompt_ids: list[int], n: int) -> float:
    ids = torch.tensor([prompt_ids])
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from moeinf.bench.synthetic import parse_shape, write_synthetic_checkpoint
    from moeinf.demo import checkpoint_dir
    from moeinf.pull import pull
    from moeinf.runtime.cache_plan import cache_factory
    from moeinf.runtime.engine import Engine
    from moeinf.runtime.tokenizer import Tokenizer
    from moeinf.store import Store

    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        store = Store(Path(tmp) / "home")
        for label, (shape_text, dim, expert_dim) in MODELS.items():
            shape = parse_shape(shape_text, hidden=dim, expert_dim=expert_dim)
            ckpt = write_synthetic_checkpoint(
                Path(tmp) / shape_text, shape, tokenizer_dir=checkpoint_dir(), dtype="float32"
            )
            name = shape_text.replace("x", "-")
            pull(str(ckpt), name=name, store=store)
            engine = Engine.load(
                name,
                device="cpu",
                threads=args.threads,
                store=store,
                provider=cache_factory(ram_mem="100%", policy="lru"),
            )
            hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
            prompt_ids = Tokenizer.from_dir(ckpt).encode(PROMPT)
            time_moeinf(engine, prompt_ids, args.tokens)  # warm-up: experts read into the cache once
            time_hf(hf, prompt_ids, args.tokens)
            ours = {"t1": [], "tn": []}
            theirs = {"t1": [], "tn": []}
            for _ in range(args.repeat):
                ours["t1"].append(time_moeinf(engine, prompt_ids, 1))
                theirs["t1"].append(time_hf(hf, prompt_ids, 1))
                ours["tn"].append(time_moeinf(engine, prompt_ids, args.tokens))
                theirs["tn"].append(time_hf(hf, prompt_ids, args.tokens))
            engine.close()
            med = {
                k: {p: statistics.median(v) for p, v in d.items()}
                for k, d in (("ours", ours), ("hf", theirs))
            }
            tps = {k: (args.tokens - 1) / (m["tn"] - m["t1"]) for k, m in med.items()}
            params = sum(p.numel() for p in hf.parameters())
            rows.append((label, params, len(prompt_ids), med, tps))
            del hf

    print(f"threads {args.threads}, {args.tokens} new tokens, medians of {args.repeat} alternating runs\n")
    print(
        "| model | params | prompt | TTFT moeinf | TTFT transformers | decode tok/s moeinf | "
        "decode tok/s transformers | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, params, n_prompt, med, tps in rows:
        print(
            f"| {label} | {params / 1e6:.0f}M | {n_prompt} | {med['ours']['t1'] * 1e3:.0f} ms | "
            f"{med['hf']['t1'] * 1e3:.0f} ms | {tps['ours']:.1f} | {tps['hf']:.1f} | "
            f"{tps['ours'] / tps['hf']:.2f}x |"
        )


if __name__ == "__main__":
    main()
