"""Rotary frequencies and tables against transformers' own rope functions (default and YaRN variants)."""

from __future__ import annotations

import pytest
import torch

from moeinf.models.adapters import adapter_for
from moeinf.models.rope import RotaryTable, inv_frequencies
from tests.fixtures.checkpoints import tiny_config

YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "rope_theta": 5e4}
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 1e4},
    "yarn-plain": YARN,
    "yarn-mscale": {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    "yarn-mscale-differ": {**YARN, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2},
    "yarn-no-truncate": {**YARN, "truncate": False},
    "yarn-attention-factor": {**YARN, "attention_factor": 1.3},
}


@pytest.mark.parametrize("name", list(ROPES))
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_frequencies_match_transformers(family, name):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fields = tiny_config(family, rope_parameters=dict(ROPES[name]), max_position_embeddings=256)
    spec = adapter_for({"model_type": family, **fields}).spec({"model_type": family, **fields})
    hf_config = AutoConfig.for_model(family, **fields)
    kind = hf_config.rope_parameters["rope_type"]
    if kind == "default":
        module = __import__(f"transformers.models.{family}.modeling_{family}", fromlist=["x"])
        rotary_cls = next(v for k, v in vars(module).items() if k.endswith("RotaryEmbedding"))
        want_inv, want_scale = rotary_cls.compute_default_rope_parameters(hf_config)
    else:
        want_inv, want_scale = ROPE_INIT_FUNCTIONS[kind](hf_config, "cpu")
    got_inv, got_scale = inv_frequencies(spec.attention.rope)
    assert torch.equal(got_inv, want_inv.float())
    assert got_scale == pytest.approx(want_scale, rel=1e-12)


def test_table_rotates_like_rotate_half_and_pairs():
    fields = tiny_config("deepseek_v3")
    spec = adapter_for({"model_type": "deepseek_v3", **fields}).spec({"model_type": "deepseek_v3", **fields})
    rope = spec.attention.rope
    table = RotaryTable(rope, 16, torch.device("cpu"), torch.float32)
    x = torch.randn(4, 3, rope.dim)
    q, _ = table.apply(x, x[:, :1], 5)
    # pair (x0, x1) at position p turns by angle p * inv[0]: compare with a complex product
    inv, _ = inv_frequencies(rope)
    angle = torch.arange(5, 9).float()[:, None] * inv[None, :]  # [T, R/2]
    z = (
        torch.view_as_complex(x.reshape(4, 3, -1, 2).contiguous())
        * torch.polar(torch.ones_like(angle), angle)[:, None]
    )
    want = torch.cat((z.real, z.imag), dim=-1)  # de-interleaved layout, as transformers' V3 path
    assert torch.allclose(q, want, atol=1e-6)
