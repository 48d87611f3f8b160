"""Cache policies: who is evicted, what is prefetched. Pure Python over `ExpertKey`, no torch.

The cache calls the hooks below; the same objects run unchanged in the trace simulator. `lru` and
`lfu` are the baselines; smarter policies (trace-guided, oracle) implement the same protocol.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

from moeinf.runtime.expert_key import ExpertKey


class Policy(Protocol):
    name: str

    def on_request_start(self) -> None: ...

    def on_request_end(self) -> None: ...

    def on_access(self, key: ExpertKey, hit: bool) -> None:
        """The model used `key` (hit: it was resident or in flight when asked for)."""

    def on_insert(self, key: ExpertKey) -> None:
        """`key` took a slot (demand fetch or prefetch)."""

    def on_evict(self, key: ExpertKey) -> None:
        """`key` left its slot."""

    def choose_victim(self, can_evict: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        """The resident key to evict among those `can_evict` accepts, or None if there is none."""

    def plan_prefetch(self, layer: int, expert_ids: Sequence[int]) -> list[ExpertKey]:
        """Keys to fetch ahead, called after `layer` routed to `expert_ids`. Most urgent first."""


class LruPolicy:
    """Evict the resident expert used least recently."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()  # oldest first

    def on_request_start(self) -> None:
        pass

    def on_request_end(self) -> None:
        pass

    def on_access(self, key: ExpertKey, hit: bool) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_insert(self, key: ExpertKey) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_evict(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def choose_victim(self, can_evict: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        return next((key for key in self._order if can_evict(key)), None)

    def plan_prefetch(self, layer: int, expert_ids: Sequence[int]) -> list[ExpertKey]:
        return []


class LfuPolicy:
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

    def on_request_start(self) -> None:
        pass

    def on_request_end(self) -> None:
        pass

    def on_access(self, key: ExpertKey, hit: bool) -> None:
        self._tick += 1
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = self._tick

    def on_insert(self, key: ExpertKey) -> None:
        self._resident.add(key)
        self._last.setdefault(key, self._tick)

    def on_evict(self, key: ExpertKey) -> None:
        self._resident.discard(key)

    def choose_victim(self, can_evict: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        candidates = [key for key in self._resident if can_evict(key)]
        if not candidates:
            return None
        return min(candidates, key=lambda k: (self._count.get(k, 0), self._last.get(k, 0), k))

    def plan_prefetch(self, layer: int, expert_ids: Sequence[int]) -> list[ExpertKey]:
        return []


POLICIES: dict[str, Callable[[], Policy]] = {"lru": LruPolicy, "lfu": LfuPolicy}


def make_policy(name: str) -> Policy:
    from moeinf.errors import BadOption

    try:
        return POLICIES[name]()
    except KeyError:
        raise BadOption(f"unknown policy {name!r}; choose one of: {', '.join(sorted(POLICIES))}") from None
