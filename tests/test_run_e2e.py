"""End to end: `moeinf run` and the Python API against transformers on tiny random checkpoints.

For every family the checkpoint folder is given to `run` (so it is pulled into the test's store first),
and greedy output with `--raw --format json --ignore-eos --max-tokens 32` must equal transformers'
`generate(do_sample=False)` token for token; the Python API (`Engine.load` + `complete`) must too, and
the last position's logits agree to 1e-4 (fp32). More CLI behaviour against transformers is in
test_run_cli.py; the terminal and pipe behaviour in test_run_terminal.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moeinf.cli.main import app
from moeinf.runtime.engine import Engine
from moeinf.runtime.generate import GenerationParams, complete
from tests.fixtures.checkpoints import FAMILIES

transformers = pytest.importorskip("transformers")

PROMPT = "Hello world! The experts route"
N = 32


def hf_pair(ckpt: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(str(ckpt))


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' greedy generate, with EOS disabled (what --ignore-eos does)."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0
        )
    return out[0, len(prompt_ids) :].tolist()


def run_json(*args: str, device: str = "cpu") -> dict:
    """`moeinf run ARGS --format json` in-process. CPU by default: `auto` picks bf16 on a CUDA machine,
    and these tests compare against transformers in fp32."""
    result = CliRunner().invoke(app, ["run", *args, "--format", "json", "--device", device])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_and_api_greedy_equal_transformers(family, checkpoint):
    ckpt = checkpoint(family)
    out = run_json(str(ckpt), PROMPT, "--raw", "--ignore-eos", "--max-tokens", str(N))

    model, tokenizer = hf_pair(ckpt)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    expected = hf_greedy(model, prompt_ids, N)
    assert out["prompt_token_ids"] == prompt_ids
    assert out["token_ids"] == expected
    assert out["finish_reason"] == "length" and out["stats"]["generated"] == N
    assert out["text"] == tokenizer.decode(expected, skip_special_tokens=True) or "\ufffd" in out["text"]

    # The Python API on the model `run` pulled into the store.
    engine = Engine.load(family, device="cpu")
    result = complete(engine, prompt_ids, GenerationParams(max_tokens=N, ignore_eos=True))
    assert result.token_ids == expected
    sequence = prompt_ids + expected[:-1]
    engine.reset()
    ours = engine.decoder.forward(torch.tensor(sequence), 0, last_only=True)[0]
    with torch.no_grad():
        theirs = model(torch.tensor([sequence])).logits[0, -1].float()
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
