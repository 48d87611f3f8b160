"""How well a MoE layer's router, applied early to the residual stream of an earlier layer of the same
token, predicts that layer's routing: the router lookahead's accuracy at 1, 2, 3... MoE layers ahead.

Runs a stored model on its own routing (greedy decode of generated prompts, experts all resident) and
reports the mean top-k overlap between the early guess and the real choice, decode steps only:

    .venv/bin/python scripts/measure_lookahead.py demo [--prompts 40] [--tokens 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_routing import encode_prompt, generated_prompts  # noqa: E402


def main() -> None:
    from moeinf.runtime.cache_plan import cache_factory
    from moeinf.runtime.engine import Engine
    from moeinf.runtime.generate import GenerationParams, complete
    from moeinf.runtime.sampling import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()

    engine = Engine.load(args.model, device="cpu", provider=cache_factory(ram_mem="100%", policy="lru"))
    layers = engine.decoder.layers
    moe = [i for i, layer in enumerate(layers) if layer.is_moe]
    K = engine.spec.top_k
    streams: dict[int, object] = {}  # MoE layer -> this decode token's residual stream after its attention
    overlap: dict[int, list[int]] = {}  # MoE layers ahead -> [matches, guesses]
    scoring = False  # the guesses below call post_attn_norm too: not a layer's own stream

    def watch(layer):
        def on_norm(module, inputs):  # post_attn_norm's input is the residual after attention
            if inputs[0].shape[0] == 1 and not scoring:
                streams[layer] = inputs[0]

        return on_norm

    class Scorer:
        replaces_routing = False

        def on_route(self, moe_index, weights, ids):
            nonlocal scoring
            if ids.shape[0] == 1:
                scoring = True
                target = layers[moe[moe_index]]
                true = set(ids[0].tolist())
                for earlier in range(moe_index):
                    h = streams[moe[earlier]]
                    guess = target.moe.router_logits(target.post_attn_norm(h)).topk(K, dim=-1).indices[0]
                    acc = overlap.setdefault(moe_index - earlier, [0, 0])
                    acc[0] += len(true & set(guess.tolist()))
                    acc[1] += K
                scoring = False
            return weights, ids

    for i in moe:
        layers[i].post_attn_norm.register_forward_pre_hook(watch(i))
    engine.decoder.set_routing_hook(Scorer())
    greedy = SamplingParams(temperature=0.0)
    params = GenerationParams(max_tokens=args.tokens, ignore_eos=True, sampling=greedy)
    try:
        for text in generated_prompts(args.prompts):
            engine.reset()
            complete(engine, encode_prompt(engine.tokenizer, text), params)
    finally:
        engine.close()
    for ahead, (hit, n) in sorted(overlap.items()):
        print(f"{ahead} MoE layer(s) ahead: top-{K} overlap {hit / n:.3f} ({n // K} guesses)")


if __name__ == "__main__":
    main()
