"""How well can the next token's routing be guessed before it runs? Precision on the demo model.

Runs the packaged demo model (trained, its own routing) over the first 1000 tokens of argparse.py
from Python's standard library in one pass, records every MoE layer's top-k and the final hidden
state, then measures, per layer, the share of the next token's experts that each guess names:
- reuse: the current token's experts at the same layer (what the trace policy's hazard uses)
- final state: the current token's last hidden state through that layer's norm and router
- next embedding: the next token's embedding (known once it is sampled) through the router
- both: final state plus next embedding. Chance is top_k / experts.

    nice -n 5 .venv/bin/python -m scripts.measure_next_token_guess
"""

from __future__ import annotations

import pathlib
import sysconfig

import numpy as np
import torch
import torch.nn.functional as F

from moeinf.runtime.engine import Engine
from moeinf.runtime.routing_hooks import RoutingRecorder


def main(tokens: int = 1000) -> None:
    engine = Engine.load("demo", device="cpu")
    dec, spec = engine.decoder, engine.spec
    text = (pathlib.Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    ids = engine.tokenizer.encode(text[:20000])[:tokens]
    L, E, K = len(spec.moe_layers), spec.num_experts, spec.top_k
    recorder = RoutingRecorder(L, E, K)
    dec.set_routing_hook(recorder)
    dec.prefill_chunk = len(ids)  # one pass: the hook below sees every token's final state
    seen = {}
    dec.norm.register_forward_pre_hook(lambda _m, args: seen.__setitem__("h", args[0].detach().clone()))
    with torch.inference_mode():
        dec(torch.tensor(ids), 0)
        final = seen["h"]  # [T, D]
        embedded = dec.embed_tokens(torch.tensor(ids))  # [T, D]
        routing = recorder.current()  # [T, L, K]
        T = len(routing)
        inputs = {
            "final state": final[:-1],
            "next embedding": embedded[1:],
            "both": final[:-1] + embedded[1:],
        }
        results = {"reuse": [], **{name: [] for name in inputs}}
        for li, layer in enumerate(spec.moe_layers):
            block = dec.layers[layer]
            nxt = routing[1:, li]  # [T-1, K]: what we try to predict
            guesses = {"reuse": routing[:-1, li]}
            for name, x in inputs.items():
                logits = F.linear(block.post_attn_norm(x), block.moe.router.weight)  # [T-1, E]
                guesses[name] = logits.topk(K, dim=-1).indices.numpy()
            for name, guess in guesses.items():
                hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(nxt, guess, strict=True)]
                results[name].append(np.mean(hits) / K)
    print(f"demo model, {T} tokens, {L} MoE layers x {E} experts, top-{K}; chance {K / E:.3f}")
    for name, per_layer in results.items():
        print(f"{name:15s} mean {np.mean(per_layer):.3f}  per layer {np.round(per_layer, 3).tolist()}")


if __name__ == "__main__":
    main()
