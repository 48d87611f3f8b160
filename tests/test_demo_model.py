"""The packaged demo model: files present and small, understood by moeinf's adapter, tokenizer round-trips,
and the weights are trained (low loss on in-domain text), checked with transformers as the oracle."""

from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from moeinf.cli.main import app
from moeinf.demo import CHECKPOINT_FILES, checkpoint_dir
from moeinf.models.adapters import ExpertTensor, adapter_for
from moeinf.runtime.tokenizer import Tokenizer
from moeinf.store import Store

SAMPLES = {
    "code": 'def main(argv=None):\n    """Run it."""\n    if argv is None:\n        argv = sys.argv[1:]\n',
    "docs": "The :func:`open` function returns a :term:`file object`.\n\n.. versionadded:: 3.4\n",
    "bible": "  3 And God said, Let there be light: and there was light.\n",
}


def _config() -> dict:
    return json.loads((checkpoint_dir() / "config.json").read_text())


def test_packaged_files_exist_and_fit_the_size_budget():
    d = checkpoint_dir()
    for name in CHECKPOINT_FILES:
        assert (d / name).is_file(), name
    total = sum((d / name).stat().st_size for name in CHECKPOINT_FILES)
    assert total <= 40 * 1024 * 1024


def test_config_parses_to_a_mixtral_spec_and_every_tensor_maps():
    config = _config()
    spec = adapter_for(config).spec(config)
    assert (spec.family, spec.num_layers, spec.num_experts, spec.top_k) == ("mixtral", 6, 32, 4)
    assert spec.dtype == "bfloat16" and spec.tie_word_embeddings
    experts = set()
    with safe_open(checkpoint_dir() / "model.safetensors", framework="numpy") as f:
        for key in f.keys():
            mapped = adapter_for(config).map_tensor(key, spec)  # raises UnmappedTensor for a stray key
            if isinstance(mapped, ExpertTensor):
                experts.add((mapped.layer, mapped.expert, mapped.proj))
    assert len(experts) == spec.num_layers * spec.num_experts * 3


@pytest.mark.parametrize("domain", sorted(SAMPLES))
def test_tokenizer_round_trips_text(domain):
    tok = Tokenizer.from_dir(checkpoint_dir())
    text = SAMPLES[domain] + "Unicode: é ü → 漢字\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # BPE merges, not raw bytes


def test_tokenizer_special_tokens_and_passthrough_chat_template():
    tok = Tokenizer.from_dir(checkpoint_dir())
    assert tok.eos_token_id == _config()["eos_token_id"] == tok.token_id("<|endoftext|>")
    messages = [{"role": "user", "content": "def parse(x):"}]
    assert tok.render_chat(messages, add_generation_prompt=True) == "def parse(x):"


def test_weights_are_trained_on_every_domain():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    model = transformers.MixtralForCausalLM.from_pretrained(checkpoint_dir(), dtype=torch.float32).eval()
    tok = Tokenizer.from_dir(checkpoint_dir())
    for domain, text in SAMPLES.items():
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        # An untrained model scores about ln V = 8.3 nats/token; the shipped one 2.4-4.9 on these samples.
        assert loss < 0.7 * math.log(_config()["vocab_size"]), (domain, loss)


def _run_json(*args: str) -> dict:
    result = CliRunner().invoke(app, ["run", *args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_pull_demo_then_greedy_run_is_deterministic_and_equals_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pulled = CliRunner().invoke(app, ["pull", "demo"])
    assert pulled.exit_code == 0, pulled.output
    assert Store().open("demo").manifest.spec.num_experts == 32

    prompt, n = "Genesis 12\n\n  1 Now the LORD said unto Abram,", 24
    args = ("demo", prompt, "--temperature", "0", "--ignore-eos", "--max-tokens", str(n), "--threads", "2")
    # Two independent runs, through the (pass-through) chat template and raw: the same tokens.
    first, raw = _run_json(*args), _run_json(*args, "--raw")
    assert len(first["token_ids"]) == n
    assert raw["prompt_token_ids"] == first["prompt_token_ids"] and raw["token_ids"] == first["token_ids"]

    model = transformers.MixtralForCausalLM.from_pretrained(checkpoint_dir(), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            torch.tensor([first["prompt_token_ids"]]), do_sample=False, max_new_tokens=n, min_new_tokens=n
        )
    assert first["token_ids"] == out[0, len(first["prompt_token_ids"]) :].tolist()
