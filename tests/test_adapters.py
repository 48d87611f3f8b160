"""Adapters: every key of a save_pretrained'd tiny model maps, the mapping is complete and shapes agree
with the spec; specs round-trip through YAML; unknown settings are refused at parse time."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from safetensors import safe_open

from moeinf.errors import InvalidSpec, UnmappedTensor, UnsupportedArchitecture
from moeinf.models.adapters import DenseTensor, ExpertTensor, IgnoredTensor, adapter_for
from moeinf.models.spec import ModelSpec
from moeinf.models.weights import dense_shapes, expert_shapes
from tests.fixtures.checkpoints import FAMILIES, build_checkpoint, tiny_config

GROUPED_V2 = {"q_lora_rank": 24, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}
CASES = [(f, {}) for f in FAMILIES] + [
    ("deepseek_v2", GROUPED_V2),
    ("deepseek_v3", {"q_lora_rank": None, "tie_word_embeddings": True}),
    ("qwen2_moe", {"mlp_only_layers": [0], "num_experts": 6}),
    ("qwen3_moe", {"decoder_sparse_step": 2, "attention_bias": True}),
    ("olmoe", {"clip_qkv": 0.5, "num_experts_per_tok": 3}),
]


def _config(family, **overrides):
    return {"model_type": family, **tiny_config(family, **overrides)}


def _load(tmp_path, family, overrides):
    out = build_checkpoint(family, tmp_path / "ckpt", **overrides)
    config = json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return config, shapes


@pytest.mark.parametrize(("family", "overrides"), CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_every_tensor_maps_and_the_mapping_is_complete(tmp_path, family, overrides):
    config, shapes = _load(tmp_path, family, overrides)
    adapter = adapter_for(config)
    spec = adapter.spec(config)
    assert adapter.family == family == spec.family
    want_dense, want_expert = dense_shapes(spec), expert_shapes(spec)
    dense, experts = {}, set()
    for key, shape in shapes.items():
        mapped = adapter.map_tensor(key, spec)
        if isinstance(mapped, DenseTensor):
            assert mapped.name not in dense, f"{key} maps to {mapped.name} twice"
            assert want_dense[mapped.name] == shape, key
            dense[mapped.name] = key
        elif isinstance(mapped, ExpertTensor):
            assert mapped.layer in spec.moe_layers and 0 <= mapped.expert < spec.num_experts
            assert want_expert[mapped.proj] == shape, key
            experts.add(mapped)
        else:
            assert isinstance(mapped, IgnoredTensor)
    assert set(dense) == set(want_dense)
    assert len(experts) == len(spec.moe_layers) * spec.num_experts * 3


def test_spec_fields_follow_the_config():
    spec = adapter_for(_config("deepseek_v2")).spec(_config("deepseek_v2", **GROUPED_V2))
    assert spec.moe_layers == (1, 2) and spec.num_shared_experts == 2 and spec.shared_expert_dim == 64
    assert spec.routing.group_scoring == "max" and (spec.routing.n_group, spec.routing.topk_group) == (4, 2)
    assert (
        spec.attention.kind == "mla" and spec.attention.q_lora_rank == 24 and spec.attention.rope.interleaved
    )
    assert adapter_for(_config("qwen2_moe")).spec(_config("qwen2_moe", mlp_only_layers=[1])).moe_layers == (
        0,
    )
    q3 = _config("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2)
    assert adapter_for(q3).spec(q3).moe_layers == (1, 3)
    v3 = adapter_for(_config("deepseek_v3")).spec(_config("deepseek_v3"))
    assert v3.routing.group_scoring == "top2_sum" and v3.routing.correction_bias and v3.routing.renormalize


def test_yarn_rope_and_softmax_scale_follow_transformers():
    yarn = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "mscale": 1.0}
    config = _config("deepseek_v3", rope_scaling={**yarn, "mscale_all_dim": 1.0}, rope_theta=5000.0)
    spec = adapter_for(config).spec(config)
    rope = spec.attention.rope
    assert (rope.kind, rope.theta, rope.factor, rope.original_max_position_embeddings) == (
        "yarn",
        5000.0,
        40.0,
        64,
    )
    mscale = 0.1 * math.log(40.0) + 1.0
    assert spec.attention.softmax_scale == pytest.approx(24**-0.5 * mscale * mscale)


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_round_trips_through_yaml(family):
    spec = adapter_for(_config(family)).spec(_config(family))
    again = ModelSpec.from_dict(yaml.safe_load(yaml.safe_dump(spec.to_dict())))
    assert again == spec
    assert spec.expert_params == 3 * spec.hidden_size * spec.expert_dim


@pytest.mark.parametrize(
    ("family", "bad"),
    [
        ("deepseek_v2", {"topk_method": "noaux_tc"}),
        ("deepseek_v2", {"norm_topk_prob": True}),
        ("deepseek_v3", {"topk_method": "group_limited_greedy"}),
        ("deepseek_v3", {"scoring_func": "softmax"}),
        ("deepseek_v3", {"moe_layer_freq": 2}),
        ("mixtral", {"hidden_act": "gelu"}),
        ("mixtral", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}),
        ("qwen3_moe", {"num_experts_per_tok": 9}),
        ("olmoe", {"head_dim": 32}),
        ("deepseek_v3", {"n_group": 3}),
        ("deepseek_v2", {"dtype": "int8"}),
    ],
)
def test_unknown_or_inconsistent_settings_are_refused(family, bad):
    config = _config(family, **bad)
    with pytest.raises(InvalidSpec):
        adapter_for(config).spec(config)


def test_unknown_family_and_unknown_tensor():
    with pytest.raises(UnsupportedArchitecture, match="mixtral"):
        adapter_for({"model_type": "llama"})
    adapter = adapter_for(_config("mixtral"))
    spec = adapter.spec(_config("mixtral"))
    expert = adapter.map_tensor("model.layers.1.block_sparse_moe.experts.7.w2.weight", spec)
    assert expert == ExpertTensor(1, 7, "down_proj")
    for key in (
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.2.input_layernorm.weight",
        "model.layers.0.block_sparse_moe.experts.8.w1.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.foo.weight",
    ):
        with pytest.raises(UnmappedTensor, match="model"):
            adapter.map_tensor(key, spec)
    v3 = adapter_for(_config("deepseek_v3"))
    assert isinstance(
        v3.map_tensor("model.layers.3.eh_proj.weight", v3.spec(_config("deepseek_v3"))), IgnoredTensor
    )
