"""The native CPU kernels (moeinf.kernels) against an fp64 reference on random inputs.

Odd sizes (not multiples of the 8-wide vectors, fewer rows than threads), 1-8 tokens, fp32 / bf16 /
f16 weights, 1 and 2 threads, the AVX2 and the scalar path. Half-precision weights widen exactly to
fp32, so every dtype must show only fp32-accumulation error. Skipped when the library is not built.
"""

from __future__ import annotations

import itertools
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

from moeinf import kernels
from moeinf.kernels import build

pytestmark = pytest.mark.skipif(
    not kernels.available(), reason=f"native kernels unavailable: {build.reason()}"
)

SIZES = (1, 3, 17, 64, 100, 773)
TOKENS = (1, 2, 3, 8)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Error per token, in the 2-norm, relative to the size of the products summed (|x| |W|^T): fp32
# accumulation error scales with that, while the plain relative error is unbounded when a sum cancels
# (torch's own fp32 products show 8e-6 on these inputs). Observed here: ~1e-7.
TOL = 1e-6


@pytest.fixture(params=[True, False], ids=["avx2", "scalar"])
def simd(request):
    on = kernels.set_simd(request.param)
    if request.param and not on:
        pytest.skip("CPU lacks AVX2+FMA+F16C")
    yield on
    kernels.set_simd(True)


# (SIMD path, threads): thread splitting is independent of the path, so the slow scalar path runs once
PATHS = [
    pytest.param((True, 1), id="avx2-1"),
    pytest.param((True, 2), id="avx2-2"),
    pytest.param((False, 2), id="scalar-2"),
]


@pytest.fixture
def path(request):
    want, threads = request.param
    on = kernels.set_simd(want)
    if want and not on:
        pytest.skip("CPU lacks AVX2+FMA+F16C")
    yield threads
    kernels.set_simd(True)


def rel_err(y: torch.Tensor, ref: torch.Tensor, size: torch.Tensor) -> float:
    """Largest per-token ||y - ref|| / ||size||, size being the magnitude of the summed products."""
    y, ref, size = (a.double().reshape(-1, ref.shape[-1]) for a in (y, ref, size))
    return ((y - ref).norm(dim=-1) / size.norm(dim=-1).clamp_min(1e-300)).max().item()


def ref_linear(x, w, bias=None):
    """fp64 x W^T (+ bias) and the size |x| |W|^T (+ |bias|) its rounding error scales with."""
    x, w = x.double(), w.double()
    if bias is None:
        return x @ w.T, x.abs() @ w.abs().T
    return x @ w.T + bias.double(), x.abs() @ w.abs().T + bias.double().abs()


def ref_swiglu(x, gate, up, down):
    """fp64 SwiGLU and its error size: the first stage's sizes carried through silu (|silu'| < 1.1)."""
    x, gate, up, down = (t.double() for t in (x, gate, up, down))
    g, u = x @ gate.T, x @ up.T
    h = torch.nn.functional.silu(g) * u
    h_size = (
        h.abs()
        + torch.nn.functional.silu(g).abs() * (x.abs() @ up.abs().T)
        + 1.1 * u.abs() * (x.abs() @ gate.abs().T)
    )
    return h @ down.T, h_size @ down.abs().T


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_linear_matches_fp64(path):
    threads = path
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for case, (n, k, dtype) in enumerate(itertools.product(SIZES, SIZES, DTYPES)):
        t = TOKENS[case % len(TOKENS)]
        x = torch.randn(t, k, generator=g)
        w = torch.randn(n, k, generator=g).to(dtype)
        y = kernels.linear(x, w, threads=threads)
        assert y.shape == (t, n) and y.dtype == torch.float32
        worst = max(worst, rel_err(y, *ref_linear(x, w)))
    assert worst < TOL


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_expert_forward_matches_fp64(path):
    threads = path
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for case, (d, i, dtype) in enumerate(itertools.product(SIZES, SIZES, DTYPES)):
        t = TOKENS[(case // len(DTYPES)) % len(TOKENS)]
        x = torch.randn(t, d, generator=g)
        gate, up = (torch.randn(i, d, generator=g).to(dtype) for _ in range(2))
        down = torch.randn(d, i, generator=g).to(dtype)
        y = kernels.expert_forward(x, gate, up, down, threads=threads)
        assert y.shape == (t, d)
        worst = max(worst, rel_err(y, *ref_swiglu(x, gate, up, down)))
    assert worst < TOL


def test_thread_counts_give_identical_bits():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 100, generator=g)
    w = torch.randn(773, 100, generator=g).to(torch.bfloat16)
    gate, up = (torch.randn(773, 100, generator=g) for _ in range(2))
    down = torch.randn(100, 773, generator=g)
    one = kernels.linear(x, w, threads=1), kernels.expert_forward(x, gate, up, down, threads=1)
    for threads in (2, 3, 7):
        assert torch.equal(kernels.linear(x, w, threads=threads), one[0])
        assert torch.equal(kernels.expert_forward(x, gate, up, down, threads=threads), one[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_half_value_widens_exactly(simd, dtype):
    """x = 1 and K = 1: y is the weight itself, so all 65536 bit patterns (subnormals, inf, nan) show."""
    w = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 1)  # [N, 1]
    y = kernels.linear(torch.ones(1, 1), w, threads=2)
    torch.testing.assert_close(y[0], w[:, 0].float(), rtol=0, atol=0, equal_nan=True)


def test_bias_scale_accumulate_and_out():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 17, generator=g)
    w, b = torch.randn(5, 17, generator=g), torch.randn(5, generator=g)
    out = torch.full((2, 5), float("nan"))
    y = kernels.linear(x, w, b, out=out)
    assert y is out
    assert rel_err(y, *ref_linear(x, w, b)) < TOL

    gate, up = torch.randn(9, 17, generator=g), torch.randn(9, 17, generator=g)
    down = torch.randn(17, 9, generator=g)
    scale, acc = torch.tensor([0.5, -2.0]), torch.randn(2, 17, generator=g)
    ref, size = ref_swiglu(x, gate, up, down)
    expected = acc.double() + scale.double()[:, None] * ref
    got = kernels.expert_forward(x, gate, up, down, scale=scale, out=acc, accumulate=True)
    assert got is acc and rel_err(got, expected, 2 * size + acc.abs()) < TOL


def test_leading_dims_and_noncontiguous_activations():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(17, 2, generator=g).T  # [2, 17], not contiguous
    w = torch.randn(3, 17, generator=g)
    assert rel_err(kernels.linear(x, w), *ref_linear(x, w)) < TOL
    x3 = torch.randn(1, 2, 17, generator=g)
    assert kernels.linear(x3, w).shape == (1, 2, 3)


def test_rejects_what_it_cannot_compute():
    x, w = torch.randn(1, 4), torch.randn(3, 4)
    with pytest.raises(ValueError):
        kernels.linear(x, torch.randn(3, 5))
    with pytest.raises(ValueError):
        kernels.linear(x.double(), w)
    with pytest.raises(ValueError):
        kernels.linear(x, torch.randn(4, 3).T)  # a transposed (strided) weight would need a copy
    with pytest.raises(ValueError):
        kernels.expert_forward(x, w, w, torch.randn(3, 4))  # down must be [D, I]
    with pytest.raises(ValueError):
        kernels.expert_forward(x, w, w, torch.randn(4, 3), accumulate=True)  # no out to add to
    assert kernels.accepts(x, w)
    assert not kernels.accepts(torch.randn(kernels.MAX_TOKENS + 1, 4), w)  # prefill: torch
    assert not kernels.accepts(x.double(), w.double())
    assert not kernels.accepts(x, torch.randn(4, 3).T)
    assert not kernels.accepts(x, w, w.half())


def test_try_variants_compute_or_decline():
    g = torch.Generator().manual_seed(5)
    bf16 = torch.bfloat16
    x, b = torch.randn(2, 17, generator=g), torch.randn(5, generator=g)
    w = torch.randn(5, 17, generator=g).to(bf16)
    assert torch.equal(kernels.try_linear(x, w, b), kernels.linear(x, w, b))
    gate, up = torch.randn(9, 17, generator=g).to(bf16), torch.randn(9, 17, generator=g).to(bf16)
    down = torch.randn(17, 9).to(bf16)
    assert torch.equal(
        kernels.try_expert_forward(x, gate, up, down), kernels.expert_forward(x, gate, up, down)
    )
    many = torch.randn(kernels.MAX_TOKENS + 1, 17, generator=g)
    declined = [
        kernels.try_linear(x, w.float()),  # fp32 weights: torch reads them at full speed
        kernels.try_expert_forward(x, gate.float(), up.float(), down.float()),
        kernels.try_linear(many, w),  # prefill: torch
        kernels.try_linear(x.double(), w.double()),
        kernels.try_linear(x, torch.randn(17, 5).to(bf16).T),
        kernels.try_linear(x, torch.randn(5, 16).to(bf16)),
        kernels.try_expert_forward(many, gate, up, down),
        kernels.try_expert_forward(x, gate, up.half(), down),
        kernels.try_expert_forward(x, gate, up, down.T.contiguous().T),
        kernels.try_expert_forward(x, gate, up, torch.randn(9, 17).to(bf16)),
    ]
    assert all(y is None for y in declined)
    trained = torch.randn(5, 17, dtype=bf16, requires_grad=True)
    assert kernels.try_linear(x, trained) is None  # autograd needs torch
    with torch.no_grad():
        assert kernels.try_linear(x, trained) is not None


def test_describe_names_the_path_and_turning_off(monkeypatch):
    assert "native" in kernels.describe()
    monkeypatch.setenv("MOEINF_NATIVE", "0")
    build.reset()
    try:
        assert not kernels.available()
        assert "torch" in kernels.describe() and "MOEINF_NATIVE=0" in kernels.describe()
        assert not kernels.accepts(torch.randn(1, 4), torch.randn(3, 4))
        assert kernels.try_linear(torch.randn(1, 4), torch.randn(3, 4)) is None
    finally:
        monkeypatch.delenv("MOEINF_NATIVE")
        build.reset()
    assert kernels.available()


def test_build_reports_a_broken_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # exists, always fails
    monkeypatch.setenv("MOEINF_NATIVE_DIR", str(tmp_path))
    build.reset()
    try:
        assert not kernels.available()
        assert "failed" in build.reason()
    finally:
        monkeypatch.delenv("CC")
        monkeypatch.delenv("MOEINF_NATIVE_DIR")
        build.reset()


def test_unwritable_cache_dir_falls_back_to_the_temp_dir(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MOEINF_NATIVE_DIR", str(blocker / "native"))  # cannot be created
    build.reset()
    try:
        native = build.load()
        assert native is not None and str(native.path).startswith(tempfile.gettempdir())
    finally:
        monkeypatch.delenv("MOEINF_NATIVE_DIR")
        build.reset()


@pytest.mark.slow
def test_a_regular_install_ships_the_source_and_a_library_built_at_install(tmp_path):
    """`pip install .` (through a wheel) compiles the kernels at build time (setup.py) and ships the C
    source too; the installed package loads that library without compiling anything."""
    import subprocess
    import sys
    import sysconfig
    import zipfile
    from pathlib import Path

    pytest.importorskip("setuptools")  # the build backend, used here without build isolation (offline)
    import shutil

    repo = Path(__file__).resolve().parents[1]
    root = tmp_path / "source"  # a copy: setuptools builds in <source>/build, which concurrent runs share
    root.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(repo / name, root / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so")
    for name in ("src", "native"):
        shutil.copytree(repo / name, root / name, ignore=ignore)
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, root], check=True)
    (wheel,) = wheels.glob("moeinf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"moeinf/kernels/moeinf_kernels.c", "moeinf/kernels/libmoeinf_kernels.so"} <= names
    core = "moeinf/runtime/moeinf_policy_core" + sysconfig.get_config_var("EXT_SUFFIX")
    assert {"moeinf/runtime/moeinf_policy_core.c", core} <= names  # the policies' C cores too
    subprocess.run([*pip, "install", "--no-deps", "--target", target, wheel], check=True)
    probe = (
        "import moeinf.kernels as k; print(k.describe()); "
        "from moeinf.runtime import policy_core as t; print(t.core_reason(), t.load_core().__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "MOEINF_NATIVE_DIR": str(tmp_path / "no-cache")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.count("built at install") == 2, out.stdout + out.stderr
    assert out.stdout.count(str(target)) == 2, out.stdout + out.stderr
    assert not (tmp_path / "no-cache").exists()  # nothing compiled at run time


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("d", "i", "n"), [(17, 9, 1), (64, 100, 3), (100, 773, 4), (33, 8, 8)])
def test_a_fused_layer_is_bit_for_bit_the_experts_one_at_a_time(simd, dtype, d, i, n):
    """try_moe_forward: sum over experts, in order, of scale * expert(x) from zero, with the same
    roundings as one expert_forward each (the decode path switches between the two with the cache's
    state, and the cache must not change a bit)."""
    g = torch.Generator().manual_seed(d * i + n)
    experts = [
        tuple((torch.randn(*s, generator=g) * 0.1).to(dtype) for s in ((i, d), (i, d), (d, i)))
        for _ in range(n)
    ]
    x, scales = torch.randn(1, d, generator=g), torch.rand(n, generator=g)
    want = torch.zeros(1, d)
    for e in range(n):
        want += kernels.try_expert_forward(x, *experts[e]) * scales[e]
    before = torch.get_num_threads()
    for threads in (1, 3):
        torch.set_num_threads(threads)
        try:
            got = kernels.try_moe_forward(x, experts, scales)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(got, want), threads
    # against fp64 too: the sum of fp32-accumulated experts
    ref = sum(
        float(scales[e]) * (F.silu(x.double() @ gt.double().T) * (x.double() @ u.double().T)) @ dn.double().T
        for e, (gt, u, dn) in enumerate(experts)
    )
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_a_fused_layer_declines_what_it_cannot_compute():
    bf16 = torch.bfloat16
    one = tuple(torch.randn(*s).to(bf16) for s in ((6, 4), (6, 4), (4, 6)))
    x, s1 = torch.randn(1, 4), torch.ones(1)
    assert kernels.try_moe_forward(x, [one], s1) is not None
    fp32 = tuple(w.float() for w in one)
    assert kernels.try_moe_forward(x, [fp32], s1) is None  # fp32 weights: torch's path
    assert kernels.try_moe_forward(torch.randn(2, 4), [one], s1) is None  # one token only
    assert kernels.try_moe_forward(x, [one, fp32], torch.ones(2)) is None  # mixed dtypes
    assert kernels.try_moe_forward(x, [one], torch.ones(2)) is None  # a scale per expert
    assert kernels.try_moe_forward(x, [], torch.ones(0)) is None
    wrong = (one[0], one[1], one[2].T.contiguous())
    assert kernels.try_moe_forward(x, [wrong], s1) is None
