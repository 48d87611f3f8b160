"""Turn a tiny transformers model into what moeinf's decoder loads, without the store (test-only).

`convert(model, out_dir)` saves the model with save_pretrained, maps every tensor with the family's
adapter into canonical dense tensors and per-expert files `experts/L###/E###.safetensors`, and returns
the spec, the dense dict and an object with `expert_path(layer, expert)` for ResidentProvider.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeinf.models.adapters import DenseTensor, ExpertTensor, adapter_for
from moeinf.models.spec import ModelSpec


@dataclass
class ExpertDir:
    root: Path

    def expert_path(self, layer: int, expert: int) -> Path:
        return self.root / f"L{layer:03d}" / f"E{expert:03d}.safetensors"


def convert(model, out_dir: Path) -> tuple[ModelSpec, dict[str, torch.Tensor], ExpertDir]:
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    adapter = adapter_for(config)
    spec = adapter.spec(config)
    dense: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for shard in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                mapped = adapter.map_tensor(key, spec)
                if isinstance(mapped, DenseTensor):
                    dense[mapped.name] = f.get_tensor(key)
                elif isinstance(mapped, ExpertTensor):
                    experts.setdefault((mapped.layer, mapped.expert), {})[mapped.proj] = f.get_tensor(key)
    files = ExpertDir(out_dir / "experts")
    for (layer, expert), tensors in experts.items():
        path = files.expert_path(layer, expert)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({p: tensors[p].contiguous() for p in ("gate_proj", "up_proj", "down_proj")}, str(path))
    return spec, dense, files


# --- the exactness battery shared by test_decoder_exactness*.py ---------------------------------

PROMPT_LEN, NEW_TOKENS, MAX_SEQ_LEN = 12, 32, 64
YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
    "mscale": 0.707,
    "mscale_all_dim": 1.0,
    "beta_fast": 32,
    "beta_slow": 1,
}


def make_pair(family: str, overrides: dict, seed: int, out_dir: Path):
    """(transformers model, moeinf Decoder on the same weights via ResidentProvider, prompt [PROMPT_LEN])."""
    from moeinf.models.transformer import Decoder
    from moeinf.runtime.resident import ResidentProvider
    from tests.fixtures.checkpoints import build_model

    model = build_model(family, seed=seed, **overrides)
    spec, dense, files = convert(model, out_dir)
    provider = ResidentProvider(files, "cpu", torch.float32)
    decoder = Decoder.build(spec, dense, provider, device="cpu", dtype=torch.float32, max_seq_len=MAX_SEQ_LEN)
    prompt = torch.randint(3, spec.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(7))
    return model, decoder, prompt


def check_logits(model, decoder, prompt) -> None:
    decoder.reset()
    with torch.no_grad():
        want = model(prompt[None]).logits[0].float()  # [T, V]
    got = decoder(prompt, 0)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


def check_greedy(model, decoder, prompt) -> None:
    model.generation_config.eos_token_id = None  # as --ignore-eos: always NEW_TOKENS tokens
    with torch.no_grad():
        want = model.generate(
            prompt[None],
            attention_mask=torch.ones(1, PROMPT_LEN, dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )[0, PROMPT_LEN:].tolist()
    decoder.reset()
    logits = decoder(prompt, 0, last_only=True)
    got = []
    for pos in range(PROMPT_LEN, PROMPT_LEN + NEW_TOKENS):
        got.append(int(logits[-1].argmax()))
        logits = decoder(torch.tensor(got[-1:]), pos)
    assert got == want


def check_prefill_equals_steps(decoder, prompt) -> None:
    decoder.reset()
    prefill = decoder(prompt, 0)
    decoder.reset()
    steps = torch.cat([decoder(prompt[i : i + 1], i) for i in range(PROMPT_LEN)])
    assert torch.allclose(prefill, steps, atol=1e-5, rtol=0)
    decoder.reset()  # a prefill that continues a cache (start_pos > 0) agrees too
    decoder(prompt[:5], 0)
    assert torch.allclose(decoder(prompt[5:], 5), prefill[5:], atol=1e-5, rtol=0)
