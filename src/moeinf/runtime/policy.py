"""Cache policies: who is evicted, what is prefetched. Pure Python over `ExpertKey`, no torch.

The cache calls the hooks below; the same objects run unchanged in the trace simulator. `lru` and
`lfu` are the baselines; smarter policies (trace-guided, oracle) implement the same protocol.

Call contract (bench.simulator follows it exactly; learning policies rely on it):
  - `on_request_start()` / `on_request_end()` around each generation request (the `trace` policy
    adds the request's activation matrix to its library at the end);
  - per MoE layer call, in layer order: `on_access(key, hit)` for every requested expert first;
    then, for each miss, `should_bypass(key)` and, unless it bypasses, a slot: a free one or
    `choose_victim(can_evict)` with `can_evict` false for the running layer's experts (pinned);
    then always `plan_prefetch(layer, ids)` (the `trace` policy takes it as the end of the layer
    call), whose keys take slots the same way;
  - optionally (run time), `on_router_lookahead(layer + 1, predicted ids)` before `plan_prefetch` of
    `layer`; the decoder makes the guess during `layer`'s attention, i.e. before `layer`'s own
    on_access calls.
The simulator may call the batched forms instead, `on_accesses(keys, missed)` for a layer call's
accesses and `replace(key, can_evict)` for choose_victim + on_evict + on_insert, where a policy
defines them at least as specifically as the hooks they stand for; they must decide exactly as the
separate calls (tests/test_simulator.py).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Container, Sequence
from typing import Any, Protocol

from moeinf.runtime.expert_key import ExpertKey


class Policy(Protocol):
    name: str
    uses_lookahead: bool  # wants on_router_lookahead calls (the decoder then computes them)

    def on_request_start(self) -> None: ...

    def on_request_end(self) -> None: ...

    def on_access(self, key: ExpertKey, hit: bool) -> None:
        """The model used `key` (hit: it was resident or in flight when asked for)."""

    def on_accesses(self, keys: Sequence[ExpertKey], missed: Container[ExpertKey]) -> None:
        """One layer call's uses at once: the same as `on_access(k, k not in missed)` for each key in
        order (the simulator's fast path; the cache calls `on_access`)."""

    def replace(self, key: ExpertKey, can_evict: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        """A demand miss `key` takes the slot of a victim: the same as `choose_victim(can_evict)`, then,
        if it names one, `on_evict(victim)` and `on_insert(key)` (the simulator's fast path)."""

    def on_insert(self, key: ExpertKey) -> None:
        """`key` took a slot (demand fetch or prefetch)."""

    def on_evict(self, key: ExpertKey) -> None:
        """`key` left its slot."""

    def choose_victim(self, can_evict: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        """The resident key to evict among those `can_evict` accepts, or None if there is none."""

    def plan_prefetch(self, layer: int, expert_ids: Sequence[int]) -> list[ExpertKey]:
        """Keys to fetch ahead, called after `layer` routed to `expert_ids`. Most urgent first."""

    def should_bypass(self, key: ExpertKey) -> bool:
        """Called for a demand miss before it takes a slot: True = compute it from a scratch slot and
        drop it (a fetch, but no eviction, no on_insert/on_evict), because it is unlikely to be used
        again before what it would evict."""

    def on_router_lookahead(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Run time only: the router of `layer` applied early (to the hidden state of an earlier layer
        of the same token) predicts `expert_ids`. Call it before `plan_prefetch` of the layer before."""


class PolicyBase:
    """No-op defaults for the optional hooks, so simple policies implement only what they use."""

    name = "base"
    uses_lookahead = False  # True: the decoder computes next-layer router predictions for on_router_lookahead

    def on_request_start(self) -> None:
        pass

    def on_request_end(self) -> None:
        pass

    def on_access(self, key: ExpertKey, hit: bool) -> None:
        pass

    def on_accesses(self, keys: Sequence[ExpertKey], missed: Container[ExpertKey]) -> None:
        for key in keys:
            self.on_access(key, key not in missed)

    def replace(self, key: ExpertKey, can_evict: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        victim = self.choose_victim(can_evict)  # type: ignore[attr-defined]
        if victim is not None:
            self.on_evict(victim)  # type: ignore[attr-defined]
            self.on_insert(key)  # type: ignore[attr-defined]
        return victim

    def plan_prefetch(self, layer: int, expert_ids: Sequence[int]) -> list[ExpertKey]:
        return []

    def should_bypass(self, key: ExpertKey) -> bool:
        return False

    def on_router_lookahead(self, layer: int, expert_ids: Sequence[int]) -> None:
        pass


class LruPolicy(PolicyBase):
    """Evict the resident expert used least recently."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()  # oldest first

    def on_access(self, key: ExpertKey, hit: bool) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_accesses(self, keys: Sequence[ExpertKey], missed: Container[ExpertKey]) -> None:
        order = self._order
        to_end = order.move_to_end
        for key in keys:
            if key in order:
                to_end(key)

    def on_insert(self, key: ExpertKey) -> None:
        order = self._order
        if key in order:
            order.move_to_end(key)
        else:
            order[key] = None  # new keys land at the end

    def on_evict(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def choose_victim(self, can_evict: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        for key in self._order:
            if can_evict(key):
                return key
        return None

    def replace(self, key: ExpertKey, can_evict: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        order = self._order
        for victim in order:
            if can_evict(victim):
                break
        else:
            return None
        del order[victim]
        if key in order:
            order.move_to_end(key)
        else:
            order[key] = None
        return victim


class LfuPolicy(PolicyBase):
    """Evict the resident expert used least often over the whole run (ties: least recently).

    Counts survive eviction, as in MoE-Infinity's activation-count caching: an expert that was hot
    earlier keeps its claim when it comes back.
    """

    name = "lfu"

    def __init__(self) -> None:
        self._count: dict[ExpertKey, int] = {}
        self._last: dict[ExpertKey, int] = {}
        self._resident: set[ExpertKey] = set()
        self._tick = 0
        # Min-heap of (count, last, key), updated lazily: a use only bumps the counters, and an entry
        # that reaches the top with old values is re-filed with the current ones. Counts and ticks only
        # grow, so every entry is a lower bound of its key's current (count, last): the first current
        # entry on top is the true minimum. O(1) per use, O(log n) per victim.
        self._heap: list[tuple[int, int, ExpertKey]] = []

    def on_access(self, key: ExpertKey, hit: bool) -> None:
        tick = self._tick = self._tick + 1
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = tick

    def on_accesses(self, keys: Sequence[ExpertKey], missed: Container[ExpertKey]) -> None:
        count, last = self._count, self._last
        tick = self._tick
        for key in keys:
            tick += 1
            count[key] = count.get(key, 0) + 1
            last[key] = tick
        self._tick = tick

    def on_insert(self, key: ExpertKey) -> None:
        self._resident.add(key)
        last = self._last.setdefault(key, self._tick)
        heap = self._heap
        heapq.heappush(heap, (self._count.get(key, 0), last, key))
        if len(heap) > 4 * len(self._resident) + 64:  # entries of evicted keys pile up: drop them
            heap[:] = [(self._count.get(k, 0), self._last[k], k) for k in self._resident]
            heapq.heapify(heap)

    def on_evict(self, key: ExpertKey) -> None:
        self._resident.discard(key)

    def choose_victim(self, can_evict: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        victim, held = self._find_victim(can_evict)
        for entry in held:
            heapq.heappush(self._heap, entry)
        return victim

    def replace(self, key: ExpertKey, can_evict: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        """choose_victim + on_evict + on_insert in one pass (the simulator's fast path): the victim's
        entry is on top when found, so the new key's entry replaces it (evicted entries are otherwise
        dropped lazily; the victim is the same either way: the least (count, last) among the evictable)."""
        victim, held = self._find_victim(can_evict)
        heap = self._heap
        if victim is not None:
            self._resident.discard(victim)
            self._resident.add(key)
            entry = (self._count.get(key, 0), self._last.setdefault(key, self._tick), key)
            heapq.heapreplace(heap, entry)
        for entry in held:
            heapq.heappush(heap, entry)
        return victim

    def _find_victim(
        self, can_evict: Callable[[ExpertKey], bool]
    ) -> tuple[ExpertKey | None, list[tuple[int, int, ExpertKey]]]:
        """The resident key with the least current (count, last) that `can_evict` accepts, its entry
        left on top of the heap, and the entries popped on the way (not evictable): push them back."""
        heap, count, last, resident = self._heap, self._count, self._last, self._resident
        held: list[tuple[int, int, ExpertKey]] = []
        while heap:
            c, t, key = heap[0]
            if key not in resident:
                heapq.heappop(heap)  # evicted since
                continue
            now = (count.get(key, 0), last[key], key)
            if now[0] != c or now[1] != t:
                heapq.heapreplace(heap, now)  # used since: re-file with its current values
                continue
            if can_evict(key):
                return key, held
            held.append(heapq.heappop(heap))
        return None, held


def _hook_owner(cls: type, name: str) -> type | None:
    """The class in `cls`'s MRO that defines `name`."""
    return next((c for c in cls.__mro__ if name in c.__dict__), None)


def fused_hook(policy: Policy, hook: str, parts: Sequence[str]) -> bool:
    """Whether the policy's `hook` stands for its `parts` hooks: defined in a class at least as specific
    as each of theirs (a subclass that overrides a part gets the parts called one by one)."""
    owner = _hook_owner(type(policy), hook)
    return owner is not None and all(
        (part_owner := _hook_owner(type(policy), part)) is not None and issubclass(owner, part_owner)
        for part in parts
    )


def batched_access(policy: Policy) -> Callable[[Sequence[ExpertKey], Sequence[ExpertKey]], None]:
    """`on_accesses(keys, missed)` of the policy when it is at least as specific as its `on_access` (a
    subclass that overrides only `on_access` gets it called per key), else a per-key loop over it."""
    if fused_hook(policy, "on_accesses", ("on_access",)):
        return policy.on_accesses  # type: ignore[attr-defined]
    on_access = policy.on_access

    def each(keys: Sequence[ExpertKey], missed: Sequence[ExpertKey]) -> None:
        for k in keys:
            on_access(k, k not in missed)

    return each


def _trace_policy(**options: Any) -> Policy:
    # imported late: it imports this module
    from moeinf.runtime.trace_policy_native import make_trace_policy

    return make_trace_policy(**options)


def _shaped(name: str, python: Callable[[], Policy]) -> Callable[..., Policy]:
    """A factory for `lru` / `lfu`: the native policy (runtime/policy_core.py) when the model's shape
    is given and the C cores load, else the Python class (same decisions)."""

    def make(**shape: Any) -> Policy:
        if shape:
            from moeinf.runtime.policy_core import make_native  # imported late: it imports this module

            native = make_native(name, **shape)
            if native is not None:
                return native
        return python()

    return make


def _oracle_policy(**options: Any) -> Policy:
    from moeinf.errors import BadOption

    raise BadOption(
        "the oracle policy needs the future: it exists only in `moeinf trace simulate` and in "
        "`moeinf bench --routing-trace` (where the replayed trace is the future)"
    )


# name -> factory; factories of policies that learn (trace) take keyword options such as `library`.
class NaivePolicy(PolicyBase):
    """No cache at all (the baseline of accelerate-style offloading): every routed expert is read on
    demand into a scratch slot and dropped after use. Use with a cache of zero regular slots."""

    name = "naive"

    def on_access(self, key: ExpertKey, hit: bool) -> None:
        pass

    def on_insert(self, key: ExpertKey) -> None:
        pass

    def on_evict(self, key: ExpertKey) -> None:
        pass

    def choose_victim(self, can_evict: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        return None

    def should_bypass(self, key: ExpertKey) -> bool:
        return True


DEFAULT_POLICY = "trace"  # what run and serve use unless told otherwise

POLICIES: dict[str, Callable[..., Policy]] = {
    "naive": NaivePolicy,
    "lru": _shaped("lru", LruPolicy),
    "lfu": _shaped("lfu", LfuPolicy),
    "trace": _trace_policy,
    "oracle": _oracle_policy,
}
LEARNING_POLICIES = frozenset({"trace"})
SHAPED_POLICIES = frozenset({"lru", "lfu"})  # take the model's shape (their C cores need it)
SHAPE_OPTIONS = ("num_layers", "num_experts", "top_k")


def check_policy_name(name: str) -> None:
    """Raise BadOption unless `name` is a known policy (without making one)."""
    from moeinf.errors import BadOption

    if name not in POLICIES:
        raise BadOption(f"unknown policy {name!r}; choose one of: {', '.join(sorted(POLICIES))}")


def make_policy(name: str, **options: Any) -> Policy:
    """The policy `name`. Options (e.g. `library=TraceLibrary`) go to learning policies only; the
    model's shape (`SHAPE_OPTIONS`) also to `lru` and `lfu`, which then run on their C cores."""
    check_policy_name(name)
    factory = POLICIES[name]
    if name in LEARNING_POLICIES:
        return factory(**options)
    if name in SHAPED_POLICIES:
        return factory(**{k: v for k, v in options.items() if k in SHAPE_OPTIONS})
    return factory()
