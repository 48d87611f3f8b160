"""Budgets -> tiers: percentages, explicit sizes, the errors a user can meet, and what --verbose says."""

import pytest
import torch

from moeinf.errors import BadOption, BudgetTooLarge, BudgetTooSmall, DenseDoesNotFit
from moeinf.models.adapters import adapter_for
from moeinf.runtime import cache_plan
from moeinf.runtime.cache_plan import describe, plan_cache
from tests.fixtures.checkpoints import tiny_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def spec():
    from transformers import AutoConfig

    config = AutoConfig.for_model("mixtral", **tiny_config("mixtral")).to_dict()
    return adapter_for(config).spec(config)


def plan(spec, **kw):
    return plan_cache(spec, dense_bytes=1000, device=CPU, dtype=torch.float32, **kw)


def test_percentage_is_a_share_of_the_experts(spec):
    n = spec.num_experts * len(spec.moe_layers)
    p = plan(spec, ram_mem="50%")
    assert p.slots == n // 2
    assert plan(spec, ram_mem="100%").slots == n
    assert any("50%" in line for line in describe(p))


def test_explicit_bytes(spec):
    one = plan(spec, ram_mem="100%").slot_bytes
    assert plan(spec, ram_mem=str(one * spec.top_k + 10)).slots == spec.top_k


def test_too_small_budget_says_how_much_is_needed(spec):
    with pytest.raises(BudgetTooSmall, match="at least"):
        plan(spec, ram_mem="1KiB")


def test_bad_values_are_clear(spec):
    with pytest.raises(BadOption):
        plan(spec, ram_mem="lots")
    with pytest.raises(BadOption, match="unknown policy"):
        plan(spec, policy="mru")


def test_budget_beyond_available_memory_is_refused(spec, monkeypatch):
    """A model larger than memory with --ram-mem 100% (or the bench's all-resident) must fail up front,
    not fill RAM expert by expert until the OS swaps or kills it; what fits still works."""
    n = spec.num_experts * len(spec.moe_layers)
    slot = plan(spec, ram_mem="100%").slot_bytes
    monkeypatch.setattr(cache_plan, "available_ram", lambda: 1000 + (n // 2) * slot)  # dense 1000 B + half
    with pytest.raises(BudgetTooLarge, match="lower --ram-mem, or leave it out") as err:
        plan(spec, ram_mem="100%")
    assert f"{n} experts" in str(err.value) and "beside the dense weights" in str(err.value)
    assert plan(spec, ram_mem="50%").slots == n // 2  # exactly what is available
    with pytest.raises(BudgetTooLarge):
        plan(spec, ram_mem=str(n * slot))  # in bytes too


def test_gpu_budget_beyond_free_gpu_memory_is_refused(spec, monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 2**34))
    with pytest.raises(BudgetTooLarge, match="--gpu-mem"):
        plan_cache(spec, dense_bytes=1000, device=torch.device("cuda"), dtype=torch.float32, gpu_mem="100%")


def test_dense_that_cannot_fit(spec):
    with pytest.raises(DenseDoesNotFit):
        plan_cache(spec, dense_bytes=1 << 60, device=CPU, dtype=torch.float32)


def test_default_budget_is_explained(spec):
    p = plan(spec)
    assert p.slots >= spec.top_k
    assert any("default" in line for line in describe(p))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_naive_plans_no_cache_on_either_device(spec, device, monkeypatch):
    """naive keeps nothing: no compute-tier slots (only top-k scratch slots, refilled per layer) and on
    CUDA only a top-k pinned staging area in RAM, whatever the budgets say."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**34, 2**34))
    budgets = {"ram_mem": "50%", "gpu_mem": "50%"}
    p = plan_cache(
        spec, dense_bytes=1000, device=torch.device(device), dtype=torch.float32, policy="naive", **budgets
    )
    assert p.slots == 0 and p.scratch_slots == spec.top_k
    assert p.host_slots == (spec.top_k if device == "cuda" else 0)
    assert any("naive: no expert cache" in line for line in describe(p))
