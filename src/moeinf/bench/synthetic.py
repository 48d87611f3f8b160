"""Synthetic random-weight MoE checkpoints of any shape, for benchmarks and routing replay.

Writes a Mixtral-architecture checkpoint in Hugging Face hub format (config.json, one safetensors
shard per layer, the demo model's tokenizer), streaming one layer at a time so a multi-GB model
never sits in RAM; `moeinf create` then pulls it into the store like any other checkpoint. Router
weights are drawn wider than usual so routing spreads over the experts instead of collapsing onto a
few (random std-0.02 routers flatter every cache: ../shared/NOTES.md).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moeinf.errors import BadOption


@dataclass(frozen=True)
class SyntheticShape:
    layers: int
    experts: int
    top_k: int
    hidden: int = 768
    expert_dim: int = 1152
    heads: int = 12
    kv_heads: int = 4

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.expert_dim

    def expert_bytes(self, itemsize: int) -> int:
        return self.layers * self.experts * self.expert_params * itemsize


def parse_shape(text: str, *, hidden: int = 768, expert_dim: int = 1152) -> SyntheticShape:
    """`"24x32x4"` (layers x experts x top-k) -> SyntheticShape."""
    match = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", text)
    if not match:
        raise BadOption(f"bad shape {text!r}: expected LAYERSxEXPERTSxTOPK, e.g. 24x32x4")
    layers, experts, top_k = (int(g) for g in match.groups())
    if min(layers, experts, top_k, hidden, expert_dim) < 1 or top_k > experts:
        raise BadOption(f"bad shape {text!r}: need positive sizes and top-k <= experts")
    if hidden % 64:
        raise BadOption(f"--dim {hidden} must be a multiple of 64 (attention heads of 64)")
    return SyntheticShape(
        layers, experts, top_k, hidden, expert_dim, heads=hidden // 64, kv_heads=hidden // 64
    )


def write_synthetic_checkpoint(
    out_dir: Path,
    shape: SyntheticShape,
    *,
    tokenizer_dir: Path,
    dtype: str = "bfloat16",
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the checkpoint into `out_dir`; `progress(layers_done, layers)` after each shard."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    d, i, e = shape.hidden, shape.expert_dim, shape.experts
    head_dim = d // shape.heads
    gen = torch.Generator().manual_seed(seed)

    def rand(*dims: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*dims, generator=gen) * std).to(torch_dtype)

    weight_map: dict[str, str] = {}

    def save(tensors: dict[str, torch.Tensor], filename: str) -> None:
        save_file(tensors, str(out_dir / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, filename))

    total = shape.layers + 1
    save(
        {
            # Unit-scale embeddings: tokens then differ more than what attention mixes in, so routing
            # varies from token to token instead of collapsing onto a context average.
            "model.embed_tokens.weight": rand(vocab, d, std=1.0),
            "model.norm.weight": torch.ones(d, dtype=torch_dtype),
            "lm_head.weight": rand(vocab, d),
        },
        "model-embed.safetensors",
    )
    for layer in range(shape.layers):
        p = f"model.layers.{layer}"
        tensors = {
            f"{p}.input_layernorm.weight": torch.ones(d, dtype=torch_dtype),
            f"{p}.post_attention_layernorm.weight": torch.ones(d, dtype=torch_dtype),
            f"{p}.self_attn.q_proj.weight": rand(shape.heads * head_dim, d),
            f"{p}.self_attn.k_proj.weight": rand(shape.kv_heads * head_dim, d),
            f"{p}.self_attn.v_proj.weight": rand(shape.kv_heads * head_dim, d),
            f"{p}.self_attn.o_proj.weight": rand(d, shape.heads * head_dim),
            # Wide router: logits of order 1 spread tokens over the experts.
            f"{p}.block_sparse_moe.gate.weight": rand(e, d, std=d**-0.5 * 2),
        }
        for expert in range(e):
            q = f"{p}.block_sparse_moe.experts.{expert}"
            tensors[f"{q}.w1.weight"] = rand(i, d)
            tensors[f"{q}.w3.weight"] = rand(i, d)
            tensors[f"{q}.w2.weight"] = rand(d, i)
        save(tensors, f"model-layer{layer:03d}.safetensors")
        if progress:
            progress(layer + 2, total)
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    tok_config = (
        json.loads((tokenizer_dir / "config.json").read_text())
        if (tokenizer_dir / "config.json").exists()
        else {}
    )
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": d,
        "intermediate_size": i,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": head_dim,
        "num_local_experts": e,
        "num_experts_per_tok": shape.top_k,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "sliding_window": None,
        "dtype": dtype,
        "bos_token_id": tok_config.get("bos_token_id"),
        "eos_token_id": tok_config.get("eos_token_id"),
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    return out_dir
