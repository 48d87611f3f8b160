"""Resharding proves completeness: an extra, missing or mis-shaped tensor fails naming it."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeinf.errors import InvalidCheckpoint, ReshardError, UnmappedTensor
from moeinf.models.adapters import adapter_for
from moeinf.reshard import Resharder, reshard
from moeinf.tensorfile import OutTensor, data_start, from_bytes, read_header, write_tensor_file


@pytest.fixture
def olmoe_copy(checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint("olmoe"), folder)
    return folder


def _reshard(folder, out):
    config = json.loads((folder / "config.json").read_text())
    adapter = adapter_for(config)
    return reshard(folder, out, adapter, adapter.spec(config))


def _edit(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_unmapped_tensor_is_named(olmoe_copy, tmp_path):
    _edit(olmoe_copy, lambda t: t.__setitem__("model.layers.0.mystery.weight", torch.zeros(2)))
    with pytest.raises(UnmappedTensor, match="model.layers.0.mystery.weight"):
        _reshard(olmoe_copy, tmp_path / "out")


def test_missing_expert_projection_is_named(olmoe_copy, tmp_path):
    _edit(olmoe_copy, lambda t: t.pop("model.layers.1.mlp.experts.6.down_proj.weight"))
    with pytest.raises(ReshardError, match="down_proj of routed expert experts/L001/E006"):
        _reshard(olmoe_copy, tmp_path / "out")


def test_missing_dense_tensor_is_named(olmoe_copy, tmp_path):
    _edit(olmoe_copy, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(ReshardError, match="layers.1.post_attn_norm.weight"):
        _reshard(olmoe_copy, tmp_path / "out")


def test_wrong_shape_is_named(olmoe_copy, tmp_path):
    _edit(olmoe_copy, lambda t: t.__setitem__("model.norm.weight", torch.ones(3)))
    with pytest.raises(ReshardError, match="model.norm.weight"):
        _reshard(olmoe_copy, tmp_path / "out")


def test_index_listing_a_missing_tensor_fails(checkpoint, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(checkpoint("mixtral_sharded"), folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = "model-00001-of-00012.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ReshardError, match="model.layers.0.extra.weight"):
        _reshard(folder, tmp_path / "out")


def test_tensor_in_two_shards_fails(checkpoint, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(checkpoint("mixtral_sharded"), folder)
    first = load_file(folder / "model-00001-of-00012.safetensors")
    key = next(iter(first))
    last = folder / "model-00012-of-00012.safetensors"
    tensors = load_file(last)
    tensors[key] = first[key]
    save_file(tensors, last)
    with pytest.raises(ReshardError, match="more than one shard"):
        _reshard(folder, tmp_path / "out")


def test_garbage_shard_is_invalid_checkpoint(olmoe_copy, tmp_path):
    (olmoe_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(InvalidCheckpoint, match="model.safetensors"):
        _reshard(olmoe_copy, tmp_path / "out")


def test_resharder_resumes_after_a_kill(checkpoint, tmp_path):
    """A new Resharder on the same folder skips the shards its saved state lists and drops bytes
    written after that point, ending byte-identical to an uninterrupted reshard."""
    folder = checkpoint("mixtral_sharded")
    config = json.loads((folder / "config.json").read_text())
    adapter = adapter_for(config)
    spec = adapter.spec(config)
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    first = Resharder(adapter, spec, tmp_path / "out")
    for name in shards[:5]:
        first.add_shard(folder / name)
    with open(tmp_path / "out" / "dense.safetensors", "ab") as f:  # a kill in the middle of shard 6
        f.write(b"half-written tensor")
    second = Resharder(adapter, spec, tmp_path / "out")
    assert second.done_shards == set(shards[:5])
    for name in shards:
        second.add_shard(folder / name)
    result = second.finish()
    assert result.expert_files == len(spec.moe_layers) * spec.num_experts
    assert not (tmp_path / "out" / ".reshard").exists()

    clean = reshard(folder, tmp_path / "clean", adapter, spec)
    for rel, written in clean.files.items():  # byte-identical to an uninterrupted reshard
        assert result.files[rel] == written, rel
        assert (tmp_path / "out" / rel).read_bytes() == (tmp_path / "clean" / rel).read_bytes()


@pytest.mark.parametrize("names", [["a"], ["a" * 3000, "b"], [f"t{i}" for i in range(60)]])
def test_tensorfile_aligns_data_and_round_trips(tmp_path, names):
    tensors = [OutTensor(n, "F32", (2,), 8, from_bytes(bytes(range(8)))) for n in names]
    path = tmp_path / "x.safetensors"
    written = write_tensor_file(path, tensors)
    assert data_start(path) % 4096 == 0 and written.size == path.stat().st_size
    infos, _ = read_header(path)
    assert list(infos) == names
    loaded = load_file(path)  # the safetensors library accepts the padded header
    assert torch.equal(loaded[names[0]], torch.frombuffer(bytearray(range(8)), dtype=torch.float32))
