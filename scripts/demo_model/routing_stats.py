"""Routing statistics of the demo model on each domain's held-out text (dev tooling; uses transformers).

Per layer and domain: the share of expert activations taken by the busiest 20% of experts, and the
fraction of a token's experts that the previous token also used at the same layer, each against the
value uniform random routing would give (20% share; K/E reuse). Also, per layer, how different the
domains' expert distributions are (mean total-variation distance between domain pairs; 0 = identical).
The "all" column pools the domains: a model that balances overall but specialises per domain shows a
high per-domain share and a low pooled one. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import torch
from corpus import DOMAINS
from tokenizers import Tokenizer
from train import encode_domain
from transformers import MixtralForCausalLM


@torch.no_grad()
def domain_routing(
    model: MixtralForCausalLM, stream: torch.Tensor, seq_len: int, windows: int
) -> torch.Tensor:
    """Routed expert ids of evenly spaced windows: [W, S, L, K]."""
    k = model.config.num_experts_per_tok
    starts = torch.linspace(0, len(stream) - seq_len - 1, windows).long().tolist()
    x = torch.stack([stream[i : i + seq_len] for i in starts]).long()  # [W, S]
    out = model(input_ids=x, output_router_logits=True)
    # router_logits: one [W*S, E] tensor per layer
    per_layer = [r.view(len(starts), seq_len, -1).topk(k, dim=-1).indices for r in out.router_logits]
    return torch.stack(per_layer, dim=2)  # [W, S, L, K]


def top_share(ids: torch.Tensor, num_experts: int) -> list[float]:
    """Per layer: share of activations on the ceil(20%) busiest experts. ids: [W, S, L, K]."""
    n_top = math.ceil(0.2 * num_experts)
    shares = []
    for layer in range(ids.shape[2]):
        counts = torch.bincount(ids[:, :, layer].reshape(-1), minlength=num_experts).float()  # [E]
        shares.append((counts.sort(descending=True).values[:n_top].sum() / counts.sum()).item())
    return shares


def reuse(ids: torch.Tensor) -> list[float]:
    """Per layer: mean fraction of token t's experts also routed for token t-1 (same window)."""
    cur, prev = ids[:, 1:], ids[:, :-1]  # [W, S-1, L, K]
    hits = (cur.unsqueeze(-1) == prev.unsqueeze(-2)).any(-1).float()  # [W, S-1, L, K]
    return hits.mean(dim=(0, 1, 3)).tolist()


def distribution(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per layer expert-use distribution: [L, E]."""
    layers = ids.shape[2]
    counts = torch.stack(
        [torch.bincount(ids[:, :, layer].reshape(-1), minlength=num_experts) for layer in range(layers)]
    ).float()
    return counts / counts.sum(-1, keepdim=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("src/moeinf/demo"))
    p.add_argument("--corpus", type=Path, default=Path("build/demo_model/corpus"))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = MixtralForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    eos_id = tok.token_to_id("<|endoftext|>")
    e, k = model.config.num_local_experts, model.config.num_experts_per_tok
    share, rep, dist, all_ids = {}, {}, {}, []
    for d in DOMAINS:
        stream = encode_domain(tok, args.corpus / f"{d}.val.txt", eos_id)
        ids = domain_routing(model, stream, args.seq_len, args.windows)
        share[d], rep[d], dist[d] = top_share(ids, e), reuse(ids), distribution(ids, e)
        all_ids.append(ids)
    pooled = top_share(torch.cat(all_ids), e)  # all domains together: is the whole model balanced?
    n_top = math.ceil(0.2 * e)
    print(f"{args.windows} x {args.seq_len} held-out tokens per domain; {e} experts, top-{k}.\n")
    head = " | ".join([f"top-20% share {d}" for d in DOMAINS] + ["all"] + [f"reuse {d}" for d in DOMAINS])
    print(f"| layer | {head} | domain TV distance |")
    print("|---" * (3 + 2 * len(DOMAINS)) + "|")
    pairs = list(itertools.combinations(DOMAINS, 2))
    for layer in range(model.config.num_hidden_layers):
        tv = sum(0.5 * (dist[a][layer] - dist[b][layer]).abs().sum().item() for a, b in pairs) / len(pairs)
        cells = [f"{share[d][layer]:.0%}" for d in DOMAINS] + [f"{pooled[layer]:.0%}"]
        cells += [f"{rep[d][layer]:.0%}" for d in DOMAINS]
        print(f"| {layer} | " + " | ".join(cells) + f" | {tv:.2f} |")
    uniform = [f"{n_top / e:.0%}"] * (len(DOMAINS) + 1) + [f"{k / e:.1%}"] * len(DOMAINS)
    print("| uniform | " + " | ".join(uniform) + " | 0.00 |")
    means = [f"{sum(share[d]) / len(share[d]):.0%}" for d in DOMAINS] + [f"{sum(pooled) / len(pooled):.0%}"]
    means += [f"{sum(rep[d]) / len(rep[d]):.0%}" for d in DOMAINS]
    print("| mean | " + " | ".join(means) + " | |")


if __name__ == "__main__":
    main()
