"""`pull` through the real huggingface_hub client against the local hub: the store equals the source.

Every source tensor is compared bit for bit (raw bytes) with its place in dense.safetensors or in
its expert file; expert files have their data at byte 4096 with gate, up, down back to back; the
manifest's sizes and hashes match the files; the spec matches the adapter's reading of config.json.
"""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from moeinf.manifest import MANIFEST
from moeinf.models.adapters import DenseTensor, ExpertTensor, IgnoredTensor, adapter_for
from moeinf.pull import pull
from moeinf.store import Store
from moeinf.tensorfile import read_header
from tests.conftest import CHECKPOINTS


def _raw(info) -> bytes:
    with open(info.path, "rb") as f:
        f.seek(info.start)
        return f.read(info.nbytes)


def _source_tensors(folder):
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(read_header(shard)[0])
    return out


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_pull_roundtrip_bit_for_bit(name, hub, checkpoint):
    source = checkpoint(name)
    events = []
    model = pull(f"test/{name}", progress=events.append)

    config = json.loads((source / "config.json").read_text())
    adapter = adapter_for(config)
    spec = adapter.spec(config)
    assert model.spec == spec
    assert model.manifest.source.repo == f"test/{name}"
    assert model.manifest.source.commit == hub.repos[f"test/{name}"].revisions["main"]

    dense, _ = read_header(model.dense_path)
    checked = 0
    for key, src in _source_tensors(source).items():
        mapped = adapter.map_tensor(key, spec)
        if isinstance(mapped, IgnoredTensor):
            continue
        if isinstance(mapped, DenseTensor):
            dst = dense[mapped.name]
        else:
            assert isinstance(mapped, ExpertTensor)
            dst = read_header(model.expert_path(mapped.layer, mapped.expert))[0][mapped.proj]
        assert (dst.dtype, dst.shape) == (src.dtype, src.shape), key
        assert _raw(dst) == _raw(src), key
        checked += 1
    assert checked == model.manifest.stats["source_tensors"] - len(model.manifest.stats["ignored_tensors"])

    # every routed expert has its own file, data at 4096, gate/up/down back to back
    for layer in spec.moe_layers:
        for expert in range(spec.num_experts):
            tensors, _ = read_header(model.expert_path(layer, expert))
            assert list(tensors) == ["gate_proj", "up_proj", "down_proj"]
            offsets = [(t.start, t.end) for t in tensors.values()]
            assert offsets[0][0] == 4096
            assert offsets[1][0] == offsets[0][1] and offsets[2][0] == offsets[1][1]
            assert model.expert_path(layer, expert).stat().st_size == offsets[2][1]

    # the safetensors library reads the padded files
    with safe_open(model.expert_path(spec.moe_layers[-1], 0), "pt") as f:
        assert f.get_tensor("down_proj").shape == (spec.hidden_size, spec.expert_dim)

    # manifest: every file on disk listed with its true size and sha256; tokenizer files copied as is
    on_disk = {str(p.relative_to(model.path)) for p in model.path.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(model.manifest.files) == on_disk
    for rel, entry in model.manifest.files.items():
        data = (model.path / rel).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry.size, entry.sha256), rel
    for meta in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (model.path / meta).read_bytes() == (source / meta).read_bytes()

    # nothing left behind, and progress was reported per file
    assert not (Store().home / "partial" / model.name).exists()
    downloaded = {e.file for e in events if e.kind == "file" and e.phase == "download"}
    assert downloaded == {p.name for p in source.glob("*.safetensors")}


def test_sharded_fixture_splits_an_expert_across_shards(checkpoint):
    """The multi-shard checkpoint really exercises experts whose projections live in two files."""
    index = json.loads((checkpoint("mixtral_sharded") / "model.safetensors.index.json").read_text())
    by_expert = {}
    for key, file in index["weight_map"].items():
        if ".experts." in key:
            by_expert.setdefault(key.rsplit(".", 3)[0], set()).add(file)
    assert any(len(files) > 1 for files in by_expert.values())


def test_pull_with_dtype_conversion(hub, checkpoint):
    model = pull("test/qwen3_moe", name="q3-bf16", dtype="bf16")
    assert model.spec.dtype == "bfloat16" and model.manifest.source_dtype == "float32"
    src = checkpoint("qwen3_moe") / "model.safetensors"
    with safe_open(src, "pt") as s, safe_open(model.expert_path(1, 3), "pt") as e:
        expected = s.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight").to(torch.bfloat16)
        assert torch.equal(e.get_tensor("up_proj"), expected)
    with safe_open(src, "pt") as s, safe_open(model.dense_path, "pt") as d:
        expected = s.get_tensor("model.embed_tokens.weight").to(torch.bfloat16)
        assert torch.equal(d.get_tensor("embed_tokens.weight"), expected)
    assert model.verify() == []


def test_pull_local_folder(checkpoint):
    source = checkpoint("deepseek_v3")
    model = pull(str(source), name="dsv3-local")
    assert model.manifest.source.kind == "local" and model.manifest.source.path == str(source)
    assert model.verify() == []
    assert Store().open("dsv3-local").spec.family == "deepseek_v3"
