"""`moeinf create`: a random model of the asked shape lands in the store; nothing is left behind."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from moeinf.bench.create import create
from moeinf.bench.synthetic import parse_shape
from moeinf.cli.main import app
from moeinf.errors import DiskFull, ModelExists, TokenizerError
from moeinf.store import Store


def test_create_makes_the_asked_shape(checkpoint, isolated_home):
    shape = parse_shape("3x6x2", hidden=64, expert_dim=40)
    events = []
    model = create("syn", shape, dtype="bf16", tokenizer_dir=checkpoint("mixtral"), progress=events.append)
    spec = Store().open("syn").manifest.spec
    assert (spec.num_layers, spec.num_experts, spec.top_k) == (3, 6, 2)
    assert (spec.hidden_size, spec.expert_dim, spec.dtype) == (64, 40, "bfloat16")
    assert spec.moe_layers == (0, 1, 2)
    assert all(model.expert_path(layer, e).is_file() for layer in range(3) for e in range(6))
    assert not list(isolated_home.glob(".create-*"))  # the temporary checkpoint is gone
    writes = [e for e in events if e.phase == "write"]
    assert writes and writes[-1].done == writes[-1].total
    with pytest.raises(ModelExists):
        create("syn", shape, tokenizer_dir=checkpoint("mixtral"))


def test_create_checks_free_disk_first(checkpoint, isolated_home, monkeypatch):
    monkeypatch.setattr(Store, "free_bytes", lambda self: 1000)
    with pytest.raises(DiskFull, match="creating big"):
        create("big", parse_shape("2x4x2", hidden=64, expert_dim=32), tokenizer_dir=checkpoint("mixtral"))
    assert not list(isolated_home.glob(".create-*"))
    assert not Store().exists("big")


def test_create_needs_a_tokenizer(tmp_path):
    with pytest.raises(TokenizerError):
        create("x", parse_shape("2x4x2", hidden=64, expert_dim=32), tokenizer_dir=tmp_path)


def test_create_cli(checkpoint):
    runner = CliRunner()
    args = ["create", "cli-syn", "--shape", "2x4x2", "--dim", "64", "--expert-dim", "32"]
    result = runner.invoke(app, [*args, "--tokenizer", str(checkpoint("mixtral"))])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("cli-syn\t")
    assert Store().open("cli-syn").manifest.spec.num_experts == 4
    bad = runner.invoke(app, ["create", "y", "--shape", "2x4", "--tokenizer", str(checkpoint("mixtral"))])
    assert bad.exit_code != 0 and "bad shape" in bad.stderr
