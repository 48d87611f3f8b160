"""The store commands through Typer's CliRunner, plus real subprocesses for pipelines and import cost."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeinf.cli.main import app
from moeinf.store import Store

REPO_ROOT = Path(__file__).resolve().parents[1]
LIST_KEYS = {"name", "path", "size_bytes", "architecture", "num_layers", "num_experts", "top_k"}


def invoke(*args):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def pulled(hub):
    result = invoke("pull", "test/deepseek_v2")
    assert result.exit_code == 0, result.output
    return Store().open("deepseek_v2")


def test_pull_prints_plain_progress_and_result(hub):
    result = invoke("pull", "test/mixtral_sharded", "--name", "mx")
    assert result.exit_code == 0, result.output
    assert "pulling model-00001-of-00012.safetensors" in result.stderr
    assert "resharding model-00001-of-00012.safetensors: done" in result.stderr
    assert "\x1b[" not in result.stderr  # no terminal escapes when stderr is not a TTY
    name, size, path = result.stdout.strip().split("\t")
    assert name == "mx" and Path(path) == Store().model_dir("mx")
    again = invoke("pull", "test/mixtral_sharded", "--name", "mx")
    assert again.exit_code == 0 and "already pulled" in again.stderr


def test_list_table_and_json(pulled):
    table = invoke("list")
    assert table.exit_code == 0
    header, row = table.stdout.strip().splitlines()
    assert header.split()[:2] == ["NAME", "SIZE"] and "LAYERS x EXPERTS (TOP-K)" in header
    assert row.startswith("deepseek_v2") and "3 x 8 (2)" in row

    listed = json.loads(invoke("list", "--json").stdout)
    assert len(listed) == 1 and LIST_KEYS <= set(listed[0])
    entry = listed[0]
    assert (entry["architecture"], entry["num_layers"], entry["num_experts"], entry["top_k"]) == (
        "deepseek_v2",
        3,
        8,
        2,
    )
    assert entry["size_bytes"] == pulled.size_bytes and entry["path"] == str(pulled.path)


def test_list_empty_store():
    result = invoke("list", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []
    assert invoke("list").stdout.strip().startswith("NAME")


def test_show_text_and_json(pulled):
    text = invoke("show", "deepseek_v2")
    assert text.exit_code == 0
    for needle in ("deepseek_v2", "active per token", "bytes per expert", "float32", "test/deepseek_v2@main"):
        assert needle in text.stdout
    info = json.loads(invoke("show", "deepseek_v2", "--json").stdout)
    assert LIST_KEYS <= set(info)
    spec = pulled.spec
    assert info["bytes_per_expert"] == 3 * spec.hidden_size * spec.expert_dim * 4
    assert info["params_active"] < info["params_total"]
    assert info["commit"] == pulled.manifest.source.commit
    # MLA keeps the compressed latent and the rotary key per layer and position: what the KV cache allocates
    a = spec.attention
    assert info["kv_values_per_token"] == spec.num_layers * (a.kv_lora_rank + a.qk_rope_head_dim)
    assert info["context_length"] == spec.max_position_embeddings
    assert "tokens at most" in text.stdout and "per token in fp32" in text.stdout


def test_show_verify_detects_flipped_and_truncated_expert_files(pulled):
    ok = invoke("show", "deepseek_v2", "--verify")
    assert ok.exit_code == 0 and "OK" in ok.stdout

    flipped = pulled.expert_path(2, 5)
    data = bytearray(flipped.read_bytes())
    data[5000] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated = pulled.expert_path(1, 0)
    truncated.write_bytes(truncated.read_bytes()[:-10])

    bad = invoke("show", "deepseek_v2", "--verify")
    assert bad.exit_code != 0
    assert "experts/L002/E005.safetensors: sha256 mismatch" in bad.stderr
    assert "experts/L001/E000.safetensors: size" in bad.stderr
    assert "Traceback" not in bad.output
    assert json.loads(invoke("show", "deepseek_v2", "--json", "--verify").stdout)["verified"] is False


def test_rm(pulled):
    refused = CliRunner().invoke(app, ["rm", "deepseek_v2"], input="")
    assert refused.exit_code == 2 and "--yes" in refused.stderr
    assert Store().exists("deepseek_v2")
    done = invoke("rm", "deepseek_v2", "--yes")
    assert done.exit_code == 0 and "deleted deepseek_v2" in done.stdout
    assert not pulled.path.exists() and invoke("list", "--json").stdout.strip() == "[]"
    missing = invoke("rm", "deepseek_v2", "--yes")
    assert missing.exit_code == 1 and "not found" in missing.stderr


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["show", "nothing-here"], 1, "not found"),
        (["show", "../etc"], 2, "model name"),
        (["pull", "org/re po"], 2, "whitespace"),
        (["pull", "test/olmoe", "--dtype", "int3"], 2, "bf16"),
    ],
)
def test_errors_are_one_line_without_traceback(hub, args, code, message):
    result = invoke(*args)
    assert result.exit_code == code
    assert result.stderr.startswith("Error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_list_json_pipeline_in_real_processes(hub):
    assert invoke("pull", "test/olmoe").exit_code == 0
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    script = Path(sys.executable).parent / "moeinf"  # the installed console script
    command = [str(script)] if script.exists() else [sys.executable, "-m", "moeinf.cli.main"]
    producer = subprocess.Popen([*command, "list", "--json"], env=env, stdout=subprocess.PIPE)
    consumer = subprocess.run(
        [sys.executable, "-c", "import json, sys; print(*[m['name'] for m in json.load(sys.stdin)])"],
        stdin=producer.stdout,
        capture_output=True,
        text=True,
        timeout=60,
    )
    producer.stdout.close()
    assert producer.wait(timeout=60) == 0
    assert consumer.returncode == 0 and consumer.stdout.split() == ["olmoe"]


@pytest.mark.parametrize("args", [["--help"], ["list"], ["list", "--json"], ["show", "--help"]])
def test_cli_paths_do_not_import_torch(args):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    check = (
        "import sys; from moeinf.cli.main import app\n"
        "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "bad = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", check, *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_rich_progress_shows_one_bar_per_file(capsys):
    from moeinf.cli.ui import PullDisplay
    from moeinf.pull import PullEvent

    with PullDisplay(rich_output=True) as display:
        display(PullEvent("status", "resolving test/x@main"))
        for done in (0, 50_000, 100_000):
            display(PullEvent("file", file="model.safetensors", phase="download", done=done, total=100_000))
        display(PullEvent("file", file="model.safetensors", phase="reshard", done=100_000, total=100_000))
    err = capsys.readouterr().err
    assert "resolving test/x@main" in err
    assert err.count("pulling model.safetensors") == 1 and err.count("resharding model.safetensors") == 1
    assert "100.0/100.0 kB" in err
