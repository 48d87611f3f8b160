"""`pull` failure modes through the real client: refusals before download, hub errors, resume, locking."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from moeinf.errors import (
    DiskFull,
    GatedRepo,
    IncompleteModel,
    ModelExists,
    ModelNotFound,
    NetworkError,
    QuantizedCheckpoint,
    RepoNotFound,
    RevisionNotFound,
    UnsafeCheckpoint,
    UnsupportedArchitecture,
)
from moeinf.pull import pull
from moeinf.store import Store

REPO_ROOT = Path(__file__).resolve().parents[1]


def _weight_requests(hub, suffixes=(".safetensors", ".bin")):
    return [(m, p) for m, p, _ in hub.requests if "/resolve/" in p and p.endswith(suffixes)]


@pytest.fixture
def custom_repo(hub, checkpoint, tmp_path):
    """`custom_repo(repo_id, files={name: bytes or source file name}, gated_token=None)` -> repo id."""

    def make(repo_id, files, gated_token=None):
        folder = tmp_path / repo_id.replace("/", "__")
        folder.mkdir()
        for name, content in files.items():
            if isinstance(content, bytes):
                (folder / name).write_bytes(content)
            else:
                shutil.copyfile(checkpoint("olmoe") / content, folder / name)
        hub.add_repo(repo_id, folder, gated_token=gated_token)
        return repo_id

    return make


def test_pickle_only_repo_is_refused_without_downloading(custom_repo, hub):
    repo = custom_repo(
        "test/pickle-only",
        {
            "config.json": "config.json",
            "tokenizer.json": "tokenizer.json",
            "pytorch_model.bin": b"\x80\x04pickle",
        },
    )
    with pytest.raises(UnsafeCheckpoint, match="pickle"):
        pull(repo)
    assert [r for r in hub.requests if "/resolve/" in r[1]] == []  # not even config.json
    assert Store().list() == []


def test_repo_with_pickle_and_safetensors_uses_only_safetensors(custom_repo, hub):
    repo = custom_repo(
        "test/both-formats",
        {
            "config.json": "config.json",
            "tokenizer.json": "tokenizer.json",
            "model.safetensors": "model.safetensors",
            "pytorch_model.bin": b"\x80\x04pickle",
        },
    )
    model = pull(repo)
    assert model.verify() == []
    assert not any(p.endswith(".bin") for _, p in _weight_requests(hub))


def test_unknown_architecture_is_refused_before_weights_download(custom_repo, hub, checkpoint):
    config = json.loads((checkpoint("olmoe") / "config.json").read_text())
    config["model_type"] = "llama"
    repo = custom_repo(
        "test/llama",
        {"config.json": json.dumps(config).encode(), "model.safetensors": "model.safetensors"},
    )
    with pytest.raises(UnsupportedArchitecture, match="mixtral") as err:
        pull(repo)
    assert "llama" in str(err.value)
    assert any(p.endswith("/config.json") for _, p, _ in hub.requests)
    assert _weight_requests(hub) == []
    assert not Store().partial_dir("llama").exists()  # a refusal leaves nothing to resume
    with pytest.raises(ModelNotFound):
        Store().open("llama")


def test_quantized_checkpoint_is_refused_before_weights_download(custom_repo, hub, checkpoint):
    config = json.loads((checkpoint("olmoe") / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    repo = custom_repo(
        "test/fp8", {"config.json": json.dumps(config).encode(), "model.safetensors": "model.safetensors"}
    )
    with pytest.raises(QuantizedCheckpoint, match="fp8"):
        pull(repo)
    assert _weight_requests(hub) == []


def test_repo_not_found_and_bad_revision(hub):
    with pytest.raises(RepoNotFound, match="test/no-such-repo"):
        pull("test/no-such-repo")
    with pytest.raises(RevisionNotFound):
        pull("test/olmoe@v9.9")


def test_gated_repo_needs_a_token(custom_repo, hub, monkeypatch):
    repo = custom_repo(
        "test/gated",
        {
            "config.json": "config.json",
            "tokenizer.json": "tokenizer.json",
            "model.safetensors": "model.safetensors",
        },
        gated_token="hf_secret",
    )
    with pytest.raises(GatedRepo, match="HF_TOKEN"):
        pull(repo)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert pull(repo).verify() == []


def test_no_network(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(NetworkError, match="cannot reach"):
        pull("test/olmoe")


def test_disk_space_is_checked_before_weights(hub, monkeypatch):
    monkeypatch.setattr(Store, "free_bytes", lambda self: 10_000)
    with pytest.raises(DiskFull, match="MOEINF_HOME"):
        pull("test/olmoe")
    assert _weight_requests(hub) == []


def test_dropped_connection_resumes_with_range(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1024)  # so bytes before the drop reach the disk
    shard = "model-00003-of-00012.safetensors"
    hub.drop_after[shard] = 20_000
    model = pull("test/mixtral_sharded")
    assert model.verify() == []
    gets = [rng for method, rng in hub.downloads(shard) if method == "GET"]
    assert gets[0] is None and len(gets) == 2
    assert gets[1] is not None and int(gets[1].removeprefix("bytes=").split("-")[0]) >= 19_000


def test_killed_pull_leaves_nothing_visible_and_resumes(hub, tmp_path):
    stall_shard = "model-00005-of-00012.safetensors"
    hub.stall_after[stall_shard] = 1000
    hub.stalled.clear()
    hub.release.clear()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from moeinf.pull import pull; pull('test/mixtral_sharded')"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert hub.stalled.wait(timeout=60), proc.stderr.read().decode() if proc.poll() is not None else ""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        hub.stall_after.clear()
        hub.release.set()
        if proc.poll() is None:
            proc.kill()
    store = Store()
    assert store.list() == []
    with pytest.raises(IncompleteModel):
        store.open("mixtral_sharded")
    state = json.loads((store.partial_dir("mixtral_sharded") / "build/.reshard/state.json").read_text())
    assert "model-00001-of-00012.safetensors" in state["shards"]

    model = pull("test/mixtral_sharded")
    assert model.verify() == []
    first_gets = [m for m, _ in hub.downloads("model-00001-of-00012.safetensors") if m == "GET"]
    assert len(first_gets) == 1  # the finished shard was not fetched again
    assert [m for m, _ in hub.downloads(stall_shard) if m == "GET"] == ["GET", "GET"]
    hub.release.clear()


def test_pull_again_is_a_noop(hub):
    pull("test/olmoe")
    hub.requests.clear()
    events = []
    pull("test/olmoe", progress=events.append)
    assert any("already pulled" in e.message for e in events)
    assert [r for r in hub.requests if "/resolve/" in r[1]] == []


def test_concurrent_pulls_of_one_model(hub):
    results, errors = [], []

    def run():
        try:
            results.append(pull("test/qwen2_moe"))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(results) == 2
    assert results[0].verify() == []
    assert len([m for m, _ in hub.downloads("model.safetensors") if m == "GET"]) == 1


def test_name_taken_by_another_model(hub):
    pull("test/olmoe")
    with pytest.raises(ModelExists, match="rm"):
        pull("test/qwen3_moe", name="olmoe")


def test_token_saved_under_hf_home_is_used(custom_repo, hub, tmp_path):
    """huggingface_hub reads HF_HOME at import, so this runs in a fresh process."""
    repo = custom_repo(
        "test/gated-home",
        {"config.json": "config.json", "model.safetensors": "model.safetensors"},
        gated_token="hf_from_home",
    )
    hf_home = tmp_path / "hf-home-with-token"
    hf_home.mkdir()
    (hf_home / "token").write_text("hf_from_home")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(hf_home)}
    env.pop("HF_TOKEN", None)
    code = f"from moeinf.pull import pull; print(pull({repo!r}).name)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "gated-home"
