"""`moeinf trace import`: a trace file's requests (a slice of them) join a model's trace library, their
EAMs and their token-level routing counts."""

import numpy as np
import pytest
from typer.testing import CliRunner

from moeinf.cli.main import app
from moeinf.cli.trace import parse_requests
from moeinf.errors import BadOption
from moeinf.runtime.trace import make_trace, write_trace
from moeinf.runtime.trace_library import open_model_library


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_parse_requests():
    assert list(parse_requests(None, 4)) == [0, 1, 2, 3]
    assert list(parse_requests("1:", 4)) == [1, 2, 3]
    assert list(parse_requests(":2", 4)) == [0, 1]
    assert list(parse_requests("2", 4)) == [2] and list(parse_requests("-1", 4)) == [3]
    assert list(parse_requests("9:", 4)) == []
    with pytest.raises(BadOption, match="--requests"):
        parse_requests("a:b", 4)


def test_import_adds_the_chosen_requests(checkpoint, tmp_path):
    from moeinf.pull import pull

    stored = pull(str(checkpoint("mixtral")), name="mx")
    spec = stored.spec
    layers, experts = len(spec.moe_layers), spec.num_experts
    # request r routes every token of every layer to experts r and r+1: distinct EAMs, no merging
    reqs = [np.tile(np.array([r, r + 1]), (6, layers, 1)) for r in range(3)]  # [T, L, K] each
    path = write_trace(make_trace(reqs, num_experts=experts), tmp_path / "t.npz")

    out = invoke("trace", "import", "mx", path, "--requests", "1:")
    assert out.exit_code == 0, out.stderr
    assert "imported 2 requests (12 tokens)" in out.stdout
    lib = open_model_library(stored)
    assert int(lib.requests.sum()) == 2 and int(lib.tokens.sum()) == 12
    assert lib.routing.tokens == 12  # token-level counts too: the trace policy's reuse statistics
    assert lib.routing.reuses[:, 1:4].sum() > 0 and lib.routing.uses[:, 0].sum() == 0
    used = lib.eams.sum(axis=(0, 1))  # [E]: request 0 (experts 0, 1) was left out
    assert used[0] == 0 and used[1] > 0 and used[2] > 0 and used[3] > 0

    none = invoke("trace", "import", "mx", path, "--requests", "5:")
    assert none.exit_code != 0 and "selects none" in none.stderr
    wrong = tmp_path / "wrong.npz"
    other_shape = np.tile(np.array([0, 1]), (2, layers + 1, 1))  # one layer too many
    write_trace(make_trace([other_shape], num_experts=experts), wrong)
    bad = invoke("trace", "import", "mx", wrong)
    assert bad.exit_code != 0 and "does not match" in bad.stderr


def test_import_maps_the_traces_layers_onto_the_models_moe_layers(checkpoint, tmp_path):
    """DeepSeek's first layer is dense: trace layer i is the model's i-th MoE layer, and the dense
    layer's rows stay empty in the library (whose layers are the model's, as the cache keys are)."""
    from moeinf.pull import pull

    stored = pull(str(checkpoint("deepseek_v2")), name="dsv2")
    spec = stored.spec
    assert spec.moe_layers[0] > 0 and len(spec.moe_layers) < spec.num_layers
    moe = len(spec.moe_layers)
    reqs = [np.tile(np.arange(spec.top_k), (5, moe, 1))]  # every token: experts 0..K-1 at every MoE layer
    path = write_trace(make_trace(reqs, num_experts=spec.num_experts), tmp_path / "ds.npz")
    out = invoke("trace", "import", "dsv2", path)
    assert out.exit_code == 0, out.stderr
    lib = open_model_library(stored)
    dense = [i for i in range(spec.num_layers) if i not in spec.moe_layers]
    assert lib.eams[:, dense].sum() == 0 and lib.eams[:, list(spec.moe_layers)].sum() == 5 * moe * spec.top_k
    assert lib.routing.uses[dense].sum() == 0 and lib.routing.reuses[list(spec.moe_layers), 0].min() == 4
