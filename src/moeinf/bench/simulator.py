"""The policy simulator: replays a routing trace through a cache policy and counts what moves.

It drives the very policy objects the runtime uses, with the hook order of `runtime.expert_cache`:
for each layer of each token, `on_access` for every routed expert (one `on_accesses` call for
them when the policy has one: the same calls, batched); each miss then takes a free slot,
or, when there is none, either bypasses (`should_bypass`: fetched into a scratch slot, never
resident) or takes the slot of the victim `choose_victim` names among resident experts the running
layer does not use (those are pinned in the real cache); then `plan_prefetch(layer, ids)` and each
planned key not resident takes a slot the same way. The pool is shared by all layers
(`capacity x layers x experts` slots) or split per layer.
The cache persists across requests. Residency does not depend on timing (as in a replay whose
transfers land before the next decision); a time model is laid over it: one transfer channel, demand
before queued prefetches, a layer computes once its experts have landed. numpy, no torch.
A policy on a C core (runtime/policy_core.py: lru, lfu, trace) runs this same loop inside its core,
step for step (tests/test_policy_core.py compares the two, fetch for fetch).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from moeinf.errors import BadOption
from moeinf.runtime.expert_key import ExpertKey
from moeinf.runtime.policy import Policy, PolicyBase, batched_access, fused_hook, make_policy
from moeinf.runtime.policy_core import replays_natively
from moeinf.runtime.trace import Trace


@dataclass
class SimResult:
    policy: str
    capacity: float  # fraction of all routed experts
    slots: int
    per_layer: bool
    tokens: int
    requests: int
    accesses: int  # routed (layer, expert) uses
    demand_misses: int  # uses whose expert was neither resident nor in flight (bypasses included)
    prefetches_issued: int
    prefetches_used: int
    prefetches_wasted: int  # evicted, or still unused at the end, without being used
    bypasses: int
    time_ms: float  # modelled
    compute_ms_per_layer: float
    transfer_ms_per_expert: float
    wall_s: float
    cpu_s: float  # process CPU time: the speed measure on a shared machine
    bound_ms_per_token: float | None = None  # max(layers x compute, oracle fetches x transfer)

    @property
    def fetches(self) -> int:
        return self.demand_misses + self.prefetches_issued

    def per_token(self, value: float) -> float:
        return value / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            fetches=self.fetches,
            fetches_per_token=self.per_token(self.fetches),
            demand_misses_per_token=self.per_token(self.demand_misses),
            prefetches_per_token=self.per_token(self.prefetches_issued),
            wasted_prefetches_per_token=self.per_token(self.prefetches_wasted),
            bypasses_per_token=self.per_token(self.bypasses),
            hit_rate=1 - self.demand_misses / self.accesses if self.accesses else 0.0,
            time_ms_per_token=self.per_token(self.time_ms),
            tokens_per_s=self.tokens / self.cpu_s if self.cpu_s > 0 else 0.0,
        )
        return out


def slots_for(capacity: float, num_layers: int, num_experts: int, top_k: int, per_layer: bool) -> int:
    """Slot count for a capacity fraction: of all experts (shared pool) or of each layer's (per layer)."""
    if not 0 < capacity <= 1:
        raise BadOption(f"capacity must be in (0, 100%] (got {capacity:g})")
    per = (
        max(1, round(capacity * num_experts))
        if per_layer
        else max(1, round(capacity * num_layers * num_experts))
    )
    if per < top_k + (0 if per_layer else 0):
        raise BadOption(
            f"capacity {capacity:.1%} gives {per} slots{' per layer' if per_layer else ''}, "
            f"fewer than top_k={top_k} (a layer's experts must all be resident)"
        )
    return per * num_layers if per_layer else per


def make_sim_policy(name: str, trace: Trace, **options) -> Policy:
    """A policy for replaying `trace`: the runtime's, or the oracle (which is given the trace's future)."""
    if name == "oracle":
        from moeinf.runtime.oracle import OraclePolicy

        return OraclePolicy(trace.experts, trace.num_experts)
    if name in ("trace", "lru", "lfu"):  # the shape from the start (and the C cores, which need it)
        shape = {"num_layers": trace.num_layers, "num_experts": trace.num_experts, "top_k": trace.top_k}
        options = {**shape, **options}
    return make_policy(name, **options)


def _default(policy: Policy, hook: str) -> bool:
    """Whether `policy` keeps PolicyBase's no-op `hook`."""
    return getattr(type(policy), hook, None) is getattr(PolicyBase, hook)


def _layer_calls(
    block: np.ndarray, keytab: list[ExpertKey], E: int, K: int
) -> Iterable[tuple[int, tuple[ExpertKey, ...], tuple[int, ...]]]:
    """The layer calls of one request's `experts [T, L, K]`, in order: (layer, keys, expert ids),
    skipping -1 (and layers left with no expert)."""
    T, L, _ = block.shape
    if bool((block >= 0).all()):  # the common case: grouped by C-level zips, no Python loop
        flat = (block.astype(np.int64) + np.arange(L, dtype=np.int64)[None, :, None] * E).reshape(-1)
        keys = iter(list(map(keytab.__getitem__, flat.tolist())))
        ids = iter(block.reshape(-1).tolist())
        groups = zip(*[keys] * K, strict=False), zip(*[ids] * K, strict=False)
        return zip(list(range(L)) * T, *groups, strict=True)
    calls = []
    for row in block.tolist():
        for layer, row_ids in enumerate(row):
            kept = tuple(e for e in row_ids if e >= 0)
            if kept:
                calls.append((layer, tuple(keytab[layer * E + e] for e in kept), kept))
    return calls


def simulate(
    trace: Trace,
    policy: Policy,
    *,
    capacity: float,
    per_layer: bool = False,
    compute_ms_per_layer: float = 0.5,
    transfer_ms_per_expert: float = 14.0,
    on_fetch: Callable[[ExpertKey, bool], None] | None = None,
    native: bool = True,
) -> SimResult:
    """Replay `trace` through `policy`; see the module docstring. `on_fetch(key, prefetch)` sees every
    fetch in order (for replay-equivalence tests). A native policy (runtime/policy_core.py) runs this
    loop in its C core unless `native` is False: the same steps, several times faster."""
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    slots = slots_for(capacity, L, E, K, per_layer)
    if native and replays_natively(policy):
        return _simulate_natively(
            trace, policy, capacity, slots, per_layer, compute_ms_per_layer, transfer_ms_per_expert, on_fetch
        )
    keytab = [ExpertKey(layer, e) for layer in range(L) for e in range(E)]  # flat id -> the one key object
    # Residency: one free count for the shared pool, or one per layer.
    free = [slots // L] * L if per_layer else [slots]
    resident: set[ExpertKey] = set()
    prefetched: set[ExpertKey] = set()  # prefetched and not used yet
    run: tuple[ExpertKey, ...] = ()  # the running layer's experts (pinned); read by the can_evict closures
    C, X = float(compute_ms_per_layer), float(transfer_ms_per_expert)
    now = 0.0  # compute clock
    busy = 0.0  # the transfer channel is committed until then
    queue: deque[tuple[ExpertKey, float]] = deque()  # prefetches not started: (key, issued at)
    queued: set[ExpertKey] = set()
    ready_at: dict[ExpertKey, float] = {}  # started transfers: when they land
    accesses = misses = issued = used = wasted = bypasses = 0
    on_accesses = batched_access(policy)
    choose_victim, on_insert, on_evict = policy.choose_victim, policy.on_insert, policy.on_evict
    # Hooks a policy leaves at PolicyBase's no-op defaults are not called (same outcome, less time).
    plan_prefetch = None if _default(policy, "plan_prefetch") else policy.plan_prefetch
    should_bypass = None if _default(policy, "should_bypass") else policy.should_bypass
    replace = (
        policy.replace if fused_hook(policy, "replace", ("choose_victim", "on_evict", "on_insert")) else None
    )  # type: ignore[attr-defined]

    if per_layer:

        def evictable_in(layer: int) -> Callable[[ExpertKey], bool]:
            return lambda k: k[0] == layer and k not in run

        can_evict_of = [evictable_in(layer) for layer in range(L)]
    else:
        shared_can_evict = lambda k: k not in run  # noqa: E731
        can_evict_of = [shared_can_evict] * L

    def evict(victim: ExpertKey, notify: bool = True) -> None:
        nonlocal wasted
        if victim not in resident or victim in run:
            raise RuntimeError(f"policy {policy.name} chose victim {victim} that is not evictable")
        resident.discard(victim)
        if notify:
            on_evict(victim)
        if victim in prefetched:
            prefetched.discard(victim)
            wasted += 1
            if victim in queued:  # cancelled before its transfer started
                queued.discard(victim)
                for i, (k, _) in enumerate(queue):
                    if k == victim:
                        del queue[i]
                        break
            ready_at.pop(victim, None)

    resident_all = resident.issuperset
    wall0, cpu0 = time.perf_counter(), time.process_time()
    offsets = trace.seq_offsets.tolist()
    for r in range(trace.num_requests):
        policy.on_request_start()
        for layer, run, ids in _layer_calls(trace.experts[offsets[r] : offsets[r + 1]], keytab, E, K):
            accesses += len(run)
            if queue:
                # Channel: queued prefetches that started before this layer's routing keep going.
                while queue and busy < now:
                    k, at = queue.popleft()
                    queued.discard(k)
                    busy = (busy if busy > at else at) + X
                    ready_at[k] = busy
            ready = now
            missed = None if resident_all(run) else [k for k in run if k not in resident]
            on_accesses(run, missed or ())
            # Only a prefetched expert's first use can wait for its transfer: later uses come after the
            # layer that waited for it, and a resident expert is never missed, so its entry goes then.
            if prefetched and not prefetched.isdisjoint(run):
                for k in run:
                    if k in prefetched:
                        prefetched.discard(k)
                        used += 1
                        if k in queued:  # promoted to demand
                            queued.discard(k)
                            queue.remove(next(q for q in queue if q[0] == k))
                            busy = (busy if busy > now else now) + X
                            ready_at[k] = busy
                        t = ready_at.pop(k, None)
                        if t is not None and t > ready:
                            ready = t
            if missed:
                pool = layer if per_layer else 0
                can_evict = can_evict_of[layer]
                misses += len(missed)
                for k in missed:
                    busy = (busy if busy > now else now) + X
                    if busy > ready:
                        ready = busy
                    if on_fetch is not None:
                        on_fetch(k, False)
                    if free[pool]:
                        free[pool] -= 1
                    # A bypass is asked for only when a slot must be freed, as the cache does.
                    elif should_bypass is not None and should_bypass(k):
                        bypasses += 1
                        continue
                    elif replace is not None:  # one call for choose_victim, on_evict and on_insert
                        victim = replace(k, can_evict)
                        if victim is None:
                            raise RuntimeError(f"policy {policy.name} found no victim for a demand miss")
                        if prefetched or victim not in resident or victim in run:
                            evict(victim, notify=False)  # the general path, with its checks
                        else:
                            resident.remove(victim)
                        resident.add(k)
                        continue
                    else:
                        victim = choose_victim(can_evict)
                        if victim is None:
                            raise RuntimeError(f"policy {policy.name} found no victim for a demand miss")
                        if prefetched or victim not in resident or victim in run:
                            evict(victim)  # the general path, with its checks
                        else:  # the hot path, inlined: a plain resident expert leaves
                            resident.remove(victim)
                            on_evict(victim)
                    resident.add(k)
                    on_insert(k)
            if plan_prefetch is not None:
                plan = plan_prefetch(layer, ids)
                if plan:
                    for k in plan:
                        if k in resident or k in run:
                            continue
                        p = k[0] if per_layer else 0
                        if free[p]:
                            free[p] -= 1
                        else:
                            victim = choose_victim(can_evict_of[k[0]])
                            if victim is None:
                                break
                            evict(victim)
                        resident.add(k)
                        on_insert(k)
                        prefetched.add(k)
                        queued.add(k)
                        queue.append((k, now))
                        issued += 1
                        if on_fetch is not None:
                            on_fetch(k, True)
            now = ready + C
        policy.on_request_end()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    counts = {
        "accesses": accesses,
        "demand_misses": misses,
        "prefetches_issued": issued,
        "prefetches_used": used,
        "prefetches_wasted": wasted + len(prefetched),
        "bypasses": bypasses,
        "time_ms": now,
    }
    return _result(trace, policy, capacity, slots, per_layer, C, X, wall, cpu, counts)


def _result(trace, policy, capacity, slots, per_layer, C, X, wall, cpu, counts: dict) -> SimResult:
    """A SimResult from a replay's counters (accesses, demand_misses, prefetches_issued / _used /
    _wasted, bypasses, time_ms): the Python loop's or a policy core's."""
    return SimResult(
        policy=policy.name,
        capacity=capacity,
        slots=slots,
        per_layer=per_layer,
        tokens=trace.num_tokens,
        requests=trace.num_requests,
        compute_ms_per_layer=float(C),
        transfer_ms_per_expert=float(X),
        wall_s=wall,
        cpu_s=cpu,
        **counts,
    )


def _simulate_natively(trace, policy, capacity, slots, per_layer, C, X, on_fetch) -> SimResult:
    wall0, cpu0 = time.perf_counter(), time.process_time()
    experts = np.ascontiguousarray(trace.experts, dtype=np.int64)
    out = policy._simulate(
        experts, trace.seq_offsets.tolist(), slots, per_layer, float(C), float(X), on_fetch is not None
    )
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    log = out.pop("log")
    if on_fetch is not None:
        E = trace.num_experts
        for code in log:
            f = code >> 1
            on_fetch(ExpertKey(f // E, f % E), bool(code & 1))
    return _result(trace, policy, capacity, slots, per_layer, C, X, wall, cpu, out)


def simulate_grid(
    trace: Trace,
    policies: Sequence[str],
    capacities: Sequence[float],
    *,
    per_layer: bool = False,
    compute_ms_per_layer: float = 0.5,
    transfer_ms_per_expert: float = 14.0,
    policy_options: Callable[[str], dict] | None = None,
) -> list[SimResult]:
    """Every policy at every capacity, each from a fresh policy object, with the bound filled in from
    the oracle's fetches (the oracle is run for the bound even when not asked for)."""
    results: list[SimResult] = []
    for capacity in capacities:
        row: dict[str, SimResult] = {}
        names = list(dict.fromkeys([*policies, "oracle"]))
        for name in names:
            options = policy_options(name) if policy_options is not None and name != "oracle" else {}
            policy = make_sim_policy(name, trace, **options)
            row[name] = simulate(
                trace,
                policy,
                capacity=capacity,
                per_layer=per_layer,
                compute_ms_per_layer=compute_ms_per_layer,
                transfer_ms_per_expert=transfer_ms_per_expert,
            )
        oracle = row["oracle"]
        bound = max(
            trace.num_layers * compute_ms_per_layer, oracle.per_token(oracle.fetches) * transfer_ms_per_expert
        )
        for name in policies:
            row[name].bound_ms_per_token = bound
            results.append(row[name])
    return results
