"""Turning `--ram-mem` / `--gpu-mem` / `--policy` into an expert cache for one stored model.

Decides the tiers (CPU: RAM is the compute tier; CUDA: GPU slots in front of pinned RAM slots), their
slot counts from the budgets (or from free memory when none is given) and says why, for --verbose;
a budget larger than the memory available for it is refused.
A percentage budget is a share of the model's routed experts: `25%` holds a quarter of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch

from moeinf.errors import BudgetTooLarge, DenseDoesNotFit
from moeinf.models.spec import ModelSpec
from moeinf.runtime.budget import default_budget_bytes, format_bytes, parse_size, slots_for
from moeinf.runtime.expert_cache import ExpertCache
from moeinf.runtime.expert_store import ExpertLayout, round_up
from moeinf.runtime.policy import DEFAULT_POLICY, Policy, check_policy_name, make_policy
from moeinf.runtime.slot_pool import torch_dtype


@dataclass
class CachePlan:
    device: torch.device
    dtype: torch.dtype
    layout: ExpertLayout
    policy: str
    slots: int  # compute tier (GPU on CUDA, RAM on CPU)
    slot_bytes: int
    host_slots: int = 0  # CUDA only: pinned RAM tier
    host_slot_bytes: int = 0
    top_k: int = 1  # a request for more experts of a layer than this is a bulk (prefill) request
    scratch_slots: int = 2  # beyond the budget: transient slots for bulk misses (stated overhead)
    reasons: list[str] = field(default_factory=list)

    @property
    def budget_bytes(self) -> int:
        return self.slots * self.slot_bytes + self.host_slots * self.host_slot_bytes


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_memory(device: torch.device) -> tuple[int, str]:
    """Bytes that can be allocated on `device` now, and what that memory is called in messages."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], "GPU"
    return available_ram(), "RAM"


def dense_bytes_for(stored, dtype: torch.dtype) -> int:
    """The dense weights' size once loaded in `dtype` (from the stored file's size and dtype)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    return stored.dense_path.stat().st_size * itemsize // torch_dtype(stored.manifest.spec.dtype).itemsize


def slot_dtype(stored: str, device: torch.device, compute: torch.dtype) -> torch.dtype:
    """The dtype experts are kept in on the compute tier.

    On the CPU with the native kernels, half-precision experts stay in their stored dtype (raw slots:
    half the RAM of fp32 copies, no conversion per load) and are widened to fp32 in the kernel.
    """
    from moeinf import kernels

    half = torch_dtype(stored)
    if half != compute and kernels.keeps_half(device, compute):
        return half
    return compute


def slot_bytes_for(layout: ExpertLayout, dtype: torch.dtype) -> int:
    if dtype == torch_dtype(layout.dtype):
        return layout.read_bytes  # raw slot: the file image, filled by one read
    return round_up(3 * layout.hidden * layout.expert_dim * torch.empty(0, dtype=dtype).element_size())


def plan_cache(
    spec: ModelSpec,
    *,
    dense_bytes: int,
    device: torch.device,
    dtype: torch.dtype,
    ram_mem: str | None = None,
    gpu_mem: str | None = None,
    policy: str = DEFAULT_POLICY,
) -> CachePlan:
    check_policy_name(policy)  # an unknown name fails here, before anything is allocated
    layout = ExpertLayout(spec.hidden_size, spec.expert_dim, spec.dtype)
    n_experts = spec.num_experts * len(spec.moe_layers)
    reasons: list[str] = []

    def tier(budget: str | None, available: int, dense: int, slot_bytes: int, what: str) -> int:
        if dense > available:
            raise DenseDoesNotFit(
                f"the dense weights ({format_bytes(dense)}) do not fit in the {format_bytes(available)} "
                f"of {what} available"
            )
        total = n_experts * slot_bytes
        if budget is None:
            nbytes, why = default_budget_bytes(available, dense, total)
            reasons.append(f"{what} budget {format_bytes(nbytes)} (default: {why})")
        else:
            size = parse_size(budget)
            nbytes = size.resolve(total)
            reasons.append(f"{what} budget {format_bytes(nbytes)} (from {size})")
        slots = slots_for(nbytes, slot_bytes, num_experts_total=n_experts, min_slots=spec.top_k, what=what)
        if budget is not None and slots * slot_bytes > available - dense:
            # The default budget fits by construction; an explicit one (or the bench's all-resident
            # 100%) on a model larger than memory would fill it expert by expert until the OS swaps or
            # kills the process: refused now, with what would fit.
            beside = f" beside the dense weights ({format_bytes(dense)})" if dense else ""
            flag = "--gpu-mem" if what == "GPU" else "--ram-mem"
            need, left = format_bytes(slots * slot_bytes), format_bytes(max(0, available - dense))
            raise BudgetTooLarge(
                f"{what} budget {size} needs {need} for {slots} experts, but only {left} of {what} is "
                f"available{beside}: lower {flag}, or leave it out to use what fits"
            )
        reasons.append(
            f"{what} tier: {slots} of {n_experts} experts ({100 * slots / n_experts:.1f}%), "
            f"{format_bytes(slot_bytes)} per slot"
        )
        return slots

    if policy == "naive":
        # No cache: the compute tier has only scratch slots, filled per layer and dropped; on CUDA a
        # pinned staging area of top-k slots sits in front (every layer refills it: no reuse survives).
        reasons.append("naive: no expert cache; every routed expert is read on demand and dropped")
        cuda = device.type == "cuda"
        return CachePlan(
            device,
            dtype,
            layout,
            policy,
            0,
            slot_bytes_for(layout, dtype),
            spec.top_k if cuda else 0,
            layout.read_bytes if cuda else 0,
            top_k=spec.top_k,
            scratch_slots=spec.top_k,
            reasons=reasons,
        )
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        gpu_slot = slot_bytes_for(layout, dtype)
        slots = tier(gpu_mem, free, dense_bytes, gpu_slot, "GPU")
        host_slot = layout.read_bytes
        host_slots = tier(ram_mem, available_ram(), 0, host_slot, "RAM")
        return CachePlan(
            device, dtype, layout, policy, slots, gpu_slot, host_slots, host_slot, spec.top_k, reasons=reasons
        )
    if gpu_mem is not None:
        reasons.append("--gpu-mem ignored: no CUDA device in use")
    cpu_slot = slot_bytes_for(layout, dtype)
    slots = tier(ram_mem, available_ram(), dense_bytes, cpu_slot, "RAM")
    return CachePlan(device, dtype, layout, policy, slots, cpu_slot, top_k=spec.top_k, reasons=reasons)


def build_cache(plan: CachePlan, expert_path, *, direct_io: bool = True, policy=None) -> ExpertCache:
    """Allocate the planned pools and start the transfer threads. `expert_path(layer, expert) -> Path`.

    `policy`: a ready policy object (e.g. `trace` with the model's library), else made from its name.
    The pinned RAM tier behind a GPU (CUDA) is plain LRU: the policy's smarts go to the compute tier.
    """
    return ExpertCache(
        expert_path,
        plan.layout,
        slots=plan.slots,
        policy=policy if policy is not None else make_policy(plan.policy),
        device=plan.device,
        dtype=plan.dtype,
        host_slots=plan.host_slots,
        host_policy=make_policy("lru") if plan.host_slots else None,
        direct_io=direct_io,
        bulk_threshold=plan.top_k,
        scratch_slots=plan.scratch_slots,
    )


def describe(plan: CachePlan, cache: ExpertCache | None = None) -> list[str]:
    lines = list(plan.reasons)
    lines.append(f"policy: {plan.policy}")
    scratch = plan.scratch_slots * plan.slot_bytes
    lines.append(f"overhead beyond the budget: {plan.scratch_slots} scratch slots ({format_bytes(scratch)})")
    if cache is not None:
        mode = {"direct": "direct I/O (O_DIRECT)", "buffered": "buffered reads + POSIX_FADV_DONTNEED"}
        lines.append(f"store reads: {mode.get(cache.reader.mode or '', 'decided at the first read')}")
        from moeinf.runtime.trace_library import LibraryRecorder
        from moeinf.runtime.trace_policy_native import describe_engine

        if cache.policy.name == "trace" and not isinstance(cache.policy, LibraryRecorder):
            lines.append(describe_engine(cache.policy))
    return lines


def model_policy(name: str, stored, library=None):
    """The policy `name` for a stored model: `trace` learns from and adds to the model's trace library
    (`library`, default the one in the store), using its token-level routing statistics when it has
    enough of them."""
    spec = stored.manifest.spec
    shape = {"num_layers": spec.num_layers, "num_experts": spec.num_experts, "top_k": spec.top_k}
    if name != "trace":
        return make_policy(name, **shape)  # lru / lfu on their C cores where they build
    from moeinf.runtime.trace_library import open_model_library

    library = library if library is not None else open_model_library(stored)
    return make_policy(
        "trace",
        library=library,
        routing=library.routing_stats(),
        **shape,
    )


def _all_fit(plan: CachePlan, spec) -> bool:
    """Whether the compute tier holds every routed expert of the model (no eviction can happen)."""
    return plan.slots >= len(spec.moe_layers) * spec.num_experts


def cache_factory(
    *,
    ram_mem: str | None = None,
    gpu_mem: str | None = None,
    policy: str = DEFAULT_POLICY,
    policy_object: Policy | None = None,
    on_plan: Callable[[CachePlan, ExpertCache], None] | None = None,
) -> Callable[..., ExpertCache]:
    """A provider factory for `Engine.load(provider=...)`: (stored model, device, dtype) -> ExpertCache.

    `policy_object`: a ready policy named `policy` to use instead of making one (the bench's replay
    oracle). `on_plan` receives the plan and the cache once built (the CLI prints `describe()` with
    --verbose).
    """

    def make(stored, device: torch.device, dtype: torch.dtype) -> ExpertCache:
        spec = stored.manifest.spec
        plan = plan_cache(
            spec,
            dense_bytes=dense_bytes_for(stored, dtype),
            device=device,
            dtype=slot_dtype(spec.dtype, device, dtype),
            ram_mem=ram_mem,
            gpu_mem=gpu_mem,
            policy=policy,
        )
        library = None
        if policy == "trace" and policy_object is None:
            from moeinf.runtime.trace_library import open_model_library

            library = open_model_library(stored)
        if library is not None and _all_fit(plan, spec):
            from moeinf.runtime.trace_library import LibraryRecorder

            chosen = LibraryRecorder(library)
            plan.reasons.append(
                "trace: every expert fits, so nothing is ever evicted: the policy only records this "
                "model's routing for its trace library"
            )
        elif policy_object is not None:
            chosen = policy_object
        else:
            chosen = model_policy(policy, stored, library)
        cache = build_cache(plan, stored.expert_path, policy=chosen)
        if library is not None:  # finished requests' decode routing feeds the library's statistics
            # (not saved here: the policy saves the library when it adds the request's EAM just after)
            cache.record_routing(partial(library.add_routing, save=False), spec.num_layers)
        cache.reader.probe(stored.expert_path(spec.moe_layers[0], 0))
        if on_plan is not None:
            on_plan(plan, cache)
        return cache

    return make
