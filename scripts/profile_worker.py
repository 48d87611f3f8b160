"""Where a decode step's time goes: one engine with an expert cache generates a prompt once to warm
up (first touches, CUDA/cuBLAS init), then again under cProfile (or, with --torch, torch.profiler),
printing ms per token and the functions that take the most time.

For finding per-token overhead on a device we cannot sit at (a lent GPU machine): one call prints
enough to act on. With --ram-mem/--gpu-mem 100% the warm run holds every expert it touched, so the
profile shows the compute path, not reads.

    python scripts/profile_worker.py MODEL [--device cuda] [--policy lru] [--gpu-mem 100%]
        [--ram-mem 100%] [--max-tokens 32] [--top 30] [--torch]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics

import torch

from moeinf.bench.workload import BUILTIN_PROMPTS
from moeinf.runtime.cache_plan import cache_factory
from moeinf.runtime.engine import Engine
from moeinf.runtime.generate import GenerationParams, generate
from moeinf.runtime.sampling import SamplingParams


def decode_ms(engine: Engine, ids: list[int], params: GenerationParams) -> list[float]:
    engine.reset()
    return [s.timings.step_s * 1000 for s in generate(engine, ids, params) if s.index > 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--ram-mem", default="100%")
    ap.add_argument("--gpu-mem", default=None)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--torch", action="store_true", help="torch.profiler (CPU + CUDA op times) instead")
    args = ap.parse_args()
    make = cache_factory(ram_mem=args.ram_mem, gpu_mem=args.gpu_mem, policy=args.policy)
    engine = Engine.load(args.model, device=args.device, provider=make)
    ids = engine.tokenizer.encode(BUILTIN_PROMPTS[0][1])
    params = GenerationParams(
        max_tokens=args.max_tokens, ignore_eos=True, sampling=SamplingParams(temperature=0.0)
    )
    warm = decode_ms(engine, ids, params)
    plain = decode_ms(engine, ids, params)  # warm, unprofiled: the honest per-token time
    if args.torch:
        import torch.profiler as tp

        activities = [tp.ProfilerActivity.CPU]
        if engine.device.type == "cuda":
            activities.append(tp.ProfilerActivity.CUDA)
        with tp.profile(activities=activities) as prof:
            profiled = decode_ms(engine, ids, params)
    else:
        profiler = cProfile.Profile()
        profiler.enable()
        profiled = decode_ms(engine, ids, params)
        profiler.disable()
    print(
        f"{args.model} on {engine.device} ({engine.dtype}), policy {args.policy}, torch {torch.__version__}: "
        f"decode ms/token median: first run {statistics.median(warm):.2f}, "
        f"warm {statistics.median(plain):.2f}, "
        f"profiled {statistics.median(profiled):.2f} ({len(plain)} tokens)"
    )
    print("cache:", {k: v for k, v in engine.cache_stats().items() if not isinstance(v, (dict, list))})
    if args.torch:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        if len(activities) > 1:
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.top))
        return
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumtime").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
