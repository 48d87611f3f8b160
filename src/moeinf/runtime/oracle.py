"""The `oracle` policy: Belady's MIN over a known future, the yardstick for every real policy.

It evicts the resident expert whose next use lies furthest ahead. It needs the whole access
sequence in advance, so it exists only for trace replay: `OraclePolicy` in the simulator (told the
access sequence), `ReplayOracle` in the runtime under routing replay (told the trace rows the replay
will route; `moeinf bench --routing-trace`), never in `run`. It never prefetches and never bypasses:
the fewest demand fetches any replacement policy can achieve.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Container, Sequence

import numpy as np

from moeinf.runtime.expert_key import ExpertKey
from moeinf.runtime.policy import PolicyBase

NEVER = 1 << 62


def access_sequence(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Flat ids `layer * E + expert` of every access of `experts [T, L, K]`, in the order the cache sees
    them: token by token, layer by layer, slot by slot, skipping -1."""
    T, L, K = experts.shape
    ids = np.arange(L, dtype=np.int64)[None, :, None] * num_experts + experts.astype(np.int64)  # [T, L, K]
    return ids[experts >= 0]


def next_use(seq: np.ndarray) -> np.ndarray:
    """For each position i, the next position j > i with seq[j] == seq[i] (NEVER if none)."""
    n = len(seq)
    order = np.argsort(seq, kind="stable")  # positions grouped by id, ascending within a group
    nxt = np.full(n, NEVER, dtype=np.int64)
    same = seq[order[1:]] == seq[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


class BeladyMin(PolicyBase):
    """The victim choice of Belady's MIN: residents in a max-heap of their next use's position
    (`_when`, set by the subclass at each use), lazily invalidated."""

    name = "oracle"

    def __init__(self) -> None:
        self._when: dict[ExpertKey, int] = {}  # key -> position of its next use
        self._resident: set[ExpertKey] = set()
        self._heap: list[tuple[int, ExpertKey]] = []  # (-next use, key), lazy invalidation

    def on_insert(self, key: ExpertKey) -> None:
        self._resident.add(key)
        self._push(self._when.get(key, NEVER), key)

    def _push(self, when: int, key: ExpertKey) -> None:
        heap = self._heap
        heapq.heappush(heap, (-when, key))
        if len(heap) > 4 * len(self._resident) + 64:  # stale entries of past uses sink and stay: drop them
            heap[:] = [(-self._when.get(k, NEVER), k) for k in self._resident]
            heapq.heapify(heap)

    def on_evict(self, key: ExpertKey) -> None:
        self._resident.discard(key)

    def choose_victim(self, can_evict: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        heap, when, resident = self._heap, self._when, self._resident
        held = []
        victim = None
        while heap:
            neg, key = heap[0]
            if key not in resident or when.get(key, NEVER) != -neg:
                heapq.heappop(heap)  # stale entry
                continue
            if can_evict(key):
                victim = key
                break
            held.append(heapq.heappop(heap))
        for entry in held:
            heapq.heappush(heap, entry)
        return victim


class OraclePolicy(BeladyMin):
    """Belady's MIN. Build it from the trace to be replayed; the replay's on_access calls must follow
    `access_sequence` exactly (checked)."""

    def __init__(self, experts: np.ndarray, num_experts: int) -> None:
        super().__init__()
        self._seq = access_sequence(experts, num_experts).tolist()
        self._next = next_use(np.asarray(self._seq, dtype=np.int64)).tolist()
        self._E = num_experts
        self._cursor = 0

    def on_access(self, key: ExpertKey, hit: bool) -> None:
        i = self._cursor
        if i >= len(self._seq) or self._seq[i] != key[0] * self._E + key[1]:
            raise ValueError(f"oracle replay diverged from its trace at access {i} ({key})")
        self._cursor = i + 1
        when = self._next[i]
        self._when[key] = when
        if key in self._resident:
            self._push(when, key)

    def on_accesses(self, keys: Sequence[ExpertKey], missed: Container[ExpertKey]) -> None:
        i, seq, nxt, E = self._cursor, self._seq, self._next, self._E
        when, resident = self._when, self._resident
        for key in keys:
            if i >= len(seq) or seq[i] != key[0] * E + key[1]:
                raise ValueError(f"oracle replay diverged from its trace at access {i} ({key})")
            w = when[key] = nxt[i]
            i += 1
            if key in resident:
                self._cursor = i
                self._push(w, key)
        self._cursor = i


class ReplayOracle(BeladyMin):
    """Belady's MIN in the runtime, under routing replay. `plan(rows)` tells it the trace rows the
    replay will route, in order (every request's prefill and decode steps); chained as a routing hook
    right after the `RoutingReplay`, it follows the replay forward by forward (checking that the ids
    are the planned rows') and gives each used expert the position of its next use in the plan:
    `(planned row x layers + layer) x top-k + slot`, the simulator's access order (so ties between
    equally distant uses break the same way). Trace layer i is the model's i-th MoE layer, whose index
    in the model (what `ExpertKey.layer` holds) `plan` is told.

    `prefetch_layers` > 0 (a yardstick for prefetching, not Belady's MIN any more): after each layer
    call, fetch ahead the experts of the next `prefetch_layers` layer steps that are not resident, when
    the victim's next use is later; what perfect knowledge of the coming routing would let reads overlap.
    """

    replaces_routing = False  # as a routing hook it only watches

    def __init__(self, experts: np.ndarray, num_experts: int, *, prefetch_layers: int = 0) -> None:
        super().__init__()
        self.prefetch_layers = prefetch_layers
        self._experts = np.asarray(experts)  # [N, L, K] the replayed trace
        self._E = num_experts
        self._L = self._experts.shape[1]
        self._rows: np.ndarray | None = None  # [S] planned trace rows
        self._end = 0  # planned rows routed so far: the running forward's last row is _end - 1
        self._positions: list[int] = []  # positions of each expert's planned uses, grouped by flat id
        self._starts: list[int] = []  # flat id f -> its group in _positions: [_starts[f], _starts[f + 1])
        self._layers: list[int] = list(range(self._L))  # trace layer -> the model's layer index
        self._index: dict[int, int] = {m: i for i, m in enumerate(self._layers)}  # and back

    def plan(self, rows: np.ndarray, layers: Sequence[int] | None = None) -> None:
        """The trace rows the replay will route from now on, in order; `layers`: the model's MoE layer
        indices (default 0..L-1: every layer is a MoE layer)."""
        if layers is not None:
            if len(layers) != self._L:
                raise ValueError(f"{len(layers)} MoE layers for a trace of {self._L}")
            self._layers = [int(m) for m in layers]
            self._index = {m: i for i, m in enumerate(self._layers)}
        rows = np.asarray(rows, dtype=np.int64)
        L, E = self._L, self._E
        planned = self._experts[rows].astype(np.int64)  # [S, L, K]
        flat = (np.arange(L, dtype=np.int64)[None, :, None] * E + planned).reshape(-1)  # [S * L * K]
        position = np.arange(flat.size, dtype=np.int64)  # (row * L + layer) * K + slot
        order = np.argsort(flat, kind="stable")  # by flat id, then by position
        self._positions = position[order].tolist()
        self._starts = np.searchsorted(flat[order], np.arange(L * E + 1)).tolist()
        self._rows, self._end = rows, 0

    def on_route(self, moe_index: int, weights, ids):
        """Routing hook: advance with the replay, checking the ids are the planned rows'."""
        if self._rows is None:
            raise RuntimeError("ReplayOracle.plan(rows) must be called before the replay starts")
        if moe_index == 0:
            self._end += ids.shape[0]
        start = self._end - ids.shape[0]
        want = self._experts[self._rows[start : self._end], moe_index]  # [T, K]
        if self._end > len(self._rows) or not np.array_equal(ids.cpu().numpy(), want):
            raise RuntimeError(
                f"the oracle's plan does not match the routing replay at planned row {start}, MoE layer "
                f"{moe_index}: the oracle needs the exact rows the replay routes"
            )
        return weights, ids

    def _next_use(self, key: ExpertKey) -> int:
        """The position of `key`'s first use in a planned row after the running forward's rows."""
        f = self._index[key[0]] * self._E + key[1]
        end = self._end * self._L * self._experts.shape[2]  # the first position of the next row
        j = bisect.bisect_left(self._positions, end, self._starts[f], self._starts[f + 1])
        return self._positions[j] if j < self._starts[f + 1] else NEVER

    def on_access(self, key: ExpertKey, hit: bool) -> None:
        when = self._when[key] = self._next_use(key)
        if key in self._resident:
            self._push(when, key)

    def on_accesses(self, keys: Sequence[ExpertKey], missed: Container[ExpertKey]) -> None:
        for key in keys:
            self.on_access(key, key not in missed)

    def plan_prefetch(self, layer: int, expert_ids: Sequence[int]) -> list[ExpertKey]:
        if not self.prefetch_layers or self._rows is None:
            return []
        L, K = self._L, self._experts.shape[2]
        plan: list[ExpertKey] = []
        step = (self._end - 1) * L + self._index[layer]  # the running (planned row, MoE layer), flattened
        for ahead in range(step + 1, step + 1 + self.prefetch_layers):
            row, lay = divmod(ahead, L)
            if row >= len(self._rows):
                break
            for k, e in enumerate(self._experts[self._rows[row], lay].tolist()):
                key = ExpertKey(self._layers[lay], e)
                use = ahead * K + k
                if key not in self._resident and key not in plan and self._victim_later(use):
                    self._when[key] = use  # what on_insert files it under
                    plan.append(key)
        return plan

    def _victim_later(self, use: int) -> bool:
        """Whether the resident expert MIN would evict now is next used after position `use`."""
        heap, when, resident = self._heap, self._when, self._resident
        while heap and (heap[0][1] not in resident or when.get(heap[0][1], NEVER) != -heap[0][0]):
            heapq.heappop(heap)  # stale entry
        return not heap or -heap[0][0] > use
