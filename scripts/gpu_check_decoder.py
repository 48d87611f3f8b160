"""Check the decoder on a CUDA machine against transformers references computed on this one.

`prepare DIR` (needs transformers; CPU) converts tiny checkpoints of every family into canonical
dense/expert files and records transformers' fp32 logits and greedy tokens. `check DIR` (needs only
torch + moeinf; run it on the GPU machine with PYTHONPATH=src) loads each into the decoder on CUDA and
compares: fp32 logits to 1e-4, greedy tokens exactly, prefill == steps; then bf16 sanity and speed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

CASES = {
    "mixtral": ("mixtral", {"sliding_window": 7}),
    "qwen2_moe": ("qwen2_moe", {"norm_topk_prob": True, "num_experts_per_tok": 3, "num_experts": 7}),
    "qwen3_moe": ("qwen3_moe", {}),
    "olmoe": ("olmoe", {"clip_qkv": 0.3}),
    "deepseek_v2": (
        "deepseek_v2",
        {"q_lora_rank": 24, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2},
    ),
    "deepseek_v3": (
        "deepseek_v3",
        {"n_routed_experts": 12, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3},
    ),
}


def prepare(root: Path) -> None:
    import yaml
    from safetensors.torch import save_file
    from tests import support_decoder as battery
    from tests.fixtures.checkpoints import build_model

    for name, (family, overrides) in CASES.items():
        model = build_model(family, seed=3, **overrides)
        spec, dense, _ = battery.convert(model, root / name)
        save_file({k: v.contiguous() for k, v in dense.items()}, str(root / name / "dense.safetensors"))
        (root / name / "spec.yaml").write_text(yaml.safe_dump(spec.to_dict()))
        prompt = torch.randint(
            3, spec.vocab_size, (battery.PROMPT_LEN,), generator=torch.Generator().manual_seed(7)
        )
        model.generation_config.eos_token_id = None
        with torch.no_grad():
            logits = model(prompt[None]).logits[0]
            tokens = model.generate(
                prompt[None],
                attention_mask=torch.ones_like(prompt[None]),
                do_sample=False,
                max_new_tokens=battery.NEW_TOKENS,
                pad_token_id=0,
            )[0, len(prompt) :]
        save_file(
            {"prompt": prompt, "logits": logits.contiguous(), "tokens": tokens.contiguous()},
            str(root / name / "reference.safetensors"),
        )
        for f in (root / name).glob("model*.safetensors"):
            f.unlink()


def check(root: Path) -> int:
    import yaml
    from safetensors.torch import load_file

    from moeinf.models.spec import ModelSpec
    from moeinf.models.transformer import Decoder
    from moeinf.runtime.resident import ResidentProvider

    class Files:
        def __init__(self, base: Path) -> None:
            self.base = base

        def expert_path(self, layer: int, expert: int) -> Path:
            return self.base / "experts" / f"L{layer:03d}" / f"E{expert:03d}.safetensors"

    cuda, failures = torch.device("cuda" if torch.cuda.is_available() else "cpu"), 0  # cpu: dry run
    for name in CASES:
        base = root / name
        spec = ModelSpec.from_dict(yaml.safe_load((base / "spec.yaml").read_text()))
        dense, ref = (
            load_file(str(base / "dense.safetensors")),
            load_file(str(base / "reference.safetensors")),
        )
        prompt, want, want_tokens = ref["prompt"], ref["logits"], ref["tokens"].tolist()
        result = {"case": name}
        for dtype in (torch.float32, torch.bfloat16):
            dec = Decoder.build(
                spec,
                dense,
                ResidentProvider(Files(base), cuda, dtype),
                device=cuda,
                dtype=dtype,
                max_seq_len=64,
            )
            logits = dec(prompt, 0)
            got, pos, step = [], len(prompt), logits[-1:]
            _sync()
            t0 = time.perf_counter()
            for _ in range(len(want_tokens)):
                got.append(int(step[-1].argmax()))
                step = dec(torch.tensor(got[-1:], device=cuda), pos)
                pos += 1
            _sync()
            tag = "fp32" if dtype == torch.float32 else "bf16"
            result[f"{tag}_max_diff"] = (logits.cpu() - want).abs().max().item()
            result[f"{tag}_tokens_equal"] = got == want_tokens
            result[f"{tag}_ms_per_token"] = round((time.perf_counter() - t0) * 1000 / len(want_tokens), 2)
            if dtype == torch.float32:
                dec.reset()
                steps = torch.cat([dec(prompt[i : i + 1].to(cuda), i) for i in range(len(prompt))])
                result["prefill_vs_steps"] = (steps - logits).abs().max().item()
                dec.reset()
                dec.prefill_chunk = 5  # chunked prefill, and MLA with the latent cache expanded
                for layer in dec.layers:
                    layer.attn.absorb_max_tokens = 0
                result["chunked_expanded_vs_ref"] = (dec(prompt, 0).cpu() - want).abs().max().item()
                ok = (
                    result["fp32_max_diff"] < 1e-4
                    and got == want_tokens
                    and result["prefill_vs_steps"] < 1e-5
                    and result["chunked_expanded_vs_ref"] < 1e-4
                )
                failures += not ok
                result["ok"] = ok
        print(json.dumps(result), flush=True)
    return failures


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    verb, folder = sys.argv[1], Path(sys.argv[2])
    if verb == "prepare":
        prepare(folder)
    else:
        sys.exit(1 if check(folder) else 0)
