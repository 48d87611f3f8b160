"""Record a stored model's own decode routing on generated prompts, as trace files for the simulator.

Greedy generation of `--tokens` tokens for each of `--prompts` prompts (topics x request kinds,
through the model's chat template when it has one), experts all resident; writes the decode routing
of every request to OUT.npz and its even / odd requests to OUT-a.npz / OUT-b.npz, so that each half
can be simulated with the other as its library:

    .venv/bin/python scripts/record_routing.py demo --out /tmp/demo-routing
    moeinf trace simulate /tmp/demo-routing-a.npz --library /tmp/demo-routing-b.npz \\
        --capacity 12.5%,25%,50% --policies lru,lfu,trace,oracle
"""

from __future__ import annotations

import argparse
import itertools
import random

TOPICS = (
    "the ocean", "a small bakery", "learning to code", "the history of trains", "a rainy day",
    "chess openings", "growing tomatoes", "the moon landing", "a job interview", "saving money",
    "a birthday party", "electric cars", "the immune system", "writing a novel", "a mountain village",
    "coffee", "sorting algorithms", "a lost cat", "volcanoes", "the stock market",
)  # fmt: skip
ASKS = (
    "Tell me a short story about {}.",
    "Explain {} to a child.",
    "Write a python function related to {}.",
    "Give three facts about {}.",
)


def generated_prompts(n: int) -> list[str]:
    """`n` prompts: each topic with two request kinds (fixed seed), repeated as needed."""
    rng = random.Random(0)
    pairs = [(topic, ask) for topic in TOPICS for ask in rng.sample(ASKS, 2)]
    return [ask.format(topic) for topic, ask in itertools.islice(itertools.cycle(pairs), n)]


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a user message, through the model's chat template when it has one."""
    if tokenizer.has_chat_template:
        return tokenizer.encode_chat([{"role": "user", "content": text}])
    return tokenizer.encode(text)


def main() -> None:
    from moeinf.runtime.cache_plan import cache_factory
    from moeinf.runtime.engine import Engine
    from moeinf.runtime.generate import GenerationParams, complete
    from moeinf.runtime.routing_hooks import RoutingRecorder
    from moeinf.runtime.sampling import SamplingParams
    from moeinf.runtime.trace import make_trace, write_trace

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--out", required=True, help="path prefix of the trace files")
    args = ap.parse_args()

    prompts = generated_prompts(args.prompts)
    engine = Engine.load(args.model, device="cpu", provider=cache_factory(ram_mem="100%", policy="lru"))
    spec = engine.spec
    recorder = RoutingRecorder(len(spec.moe_layers), spec.num_experts, spec.top_k)
    engine.decoder.set_routing_hook(recorder)
    tok = engine.tokenizer
    params = GenerationParams(
        max_tokens=args.tokens, ignore_eos=True, sampling=SamplingParams(temperature=0.0)
    )
    requests = []
    try:
        for text in prompts:
            engine.reset()
            ids = encode_prompt(tok, text)
            complete(engine, ids, params)
            routing = recorder.end_request()  # [prompt + decode forwards' tokens, L, K]
            requests.append(routing[len(ids) :])  # decode steps only
    finally:
        engine.close()
    E = spec.num_experts
    write_trace(make_trace(requests, num_experts=E), f"{args.out}.npz")
    write_trace(make_trace(requests[0::2], num_experts=E), f"{args.out}-a.npz")
    write_trace(make_trace(requests[1::2], num_experts=E), f"{args.out}-b.npz")
    print(
        f"{len(requests)} requests, {sum(len(r) for r in requests)} decode tokens -> {args.out}.npz, -a, -b"
    )


if __name__ == "__main__":
    main()
