"""`moeinf serve` on a CUDA device (skipped without one): greedy output through the API equals
`moeinf run --raw` on the GPU (bf16 by default, expert cache with a GPU tier), /api/ps reports the GPU,
and switching or unloading models gives the GPU memory back (one model in memory at a time).
"""

from __future__ import annotations

import httpx
import pytest
import torch

from moeinf.server.app import ServerConfig, create_app
from moeinf.server.manager import LoadOptions
from tests.test_serve import PROMPT, generate, home, ps, run_cli, serving, wait_for  # noqa: F401 (fixture)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_serve_on_cuda_equals_run_and_frees_gpu_memory(home, monkeypatch):  # noqa: F811
    baseline = torch.cuda.memory_allocated()
    load = LoadOptions(device="cuda", gpu_mem="50%", ram_mem="100%")
    with serving(create_app(ServerConfig(load=load, home=home))) as url:
        answer = generate(url, PROMPT, options={"num_predict": 12})
        loaded = ps(url)["models"][0]
        assert loaded["device"].startswith("cuda") and loaded["size_vram"] > 0
        assert answer["cache"]["requests"] > 0 and answer["cache"]["bytes_h2d"] > 0
        one_model = torch.cuda.memory_allocated() - baseline
        assert one_model > 0

        generate(url, PROMPT, model="olmoe-long", options={"num_predict": 4})
        assert [m["name"] for m in ps(url)["models"]] == ["olmoe-long"]
        generate(url, PROMPT, options={"num_predict": 4})
        # Back on the first model: the second one's memory was given back (not two models resident).
        assert torch.cuda.memory_allocated() - baseline <= one_model * 1.1

        generate(url, PROMPT, options={"num_predict": 1}, keep_alive=0)
        wait_for(lambda: ps(url)["models"] == [])
        # cuBLAS keeps a workspace per thread's handle (32 MiB on Hopper) in torch's allocator: not ours.
        torch._C._cuda_clearCublasWorkspaces()
        assert torch.cuda.memory_allocated() - baseline < 1024**2
        body = {"model": "olmoe", "prompt": PROMPT, "raw": True, "options": {"num_predict": 12}}
        streamed = httpx.post(f"{url}/api/generate", json=body, timeout=60).text
    expected = run_cli(home, monkeypatch, PROMPT, "--raw", "--max-tokens", "12", device="cuda")
    assert answer["response"] == expected["text"]
    assert '"done": true' in streamed
