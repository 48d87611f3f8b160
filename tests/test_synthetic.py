"""Synthetic checkpoints: any shape, hub format, pulled into the store like a real one."""

import json

import pytest
from safetensors import safe_open

from moeinf.bench.synthetic import parse_shape, write_synthetic_checkpoint
from moeinf.demo import checkpoint_dir
from moeinf.errors import BadOption
from moeinf.models.adapters import adapter_for


def test_parse_shape():
    s = parse_shape("24x32x4", hidden=768, expert_dim=1152)
    assert (s.layers, s.experts, s.top_k, s.heads) == (24, 32, 4, 12)
    assert s.expert_bytes(2) == 24 * 32 * 3 * 768 * 1152 * 2
    for bad in ("24x32", "0x4x2", "2x4x8", "axbxc"):
        with pytest.raises(BadOption):
            parse_shape(bad)
    with pytest.raises(BadOption, match="multiple of 64"):
        parse_shape("2x4x2", hidden=100)


def test_checkpoint_is_a_valid_mixtral(tmp_path):
    shape = parse_shape("2x6x2", hidden=64, expert_dim=40)
    out = write_synthetic_checkpoint(
        tmp_path / "ckpt", shape, tokenizer_dir=checkpoint_dir(), dtype="bfloat16"
    )
    config = json.loads((out / "config.json").read_text())
    spec = adapter_for(config).spec(config)
    assert (spec.num_layers, spec.num_experts, spec.top_k, spec.expert_dim) == (2, 6, 2, 40)
    assert spec.dtype == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len([k for k in index if ".experts." in k]) == 2 * 6 * 3
    for key, file in index.items():
        with safe_open(str(out / file), "pt") as f:
            assert key in f.keys()
        adapter_for(config).map_tensor(key, spec)  # every tensor maps to a canonical name
