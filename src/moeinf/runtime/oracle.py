"""The `oracle` policy: Belady's MIN over a known future, the yardstick for every real policy.

It evicts the resident expert whose next use lies furthest ahead. It needs the whole access
sequence in advance, so it exists only for trace replay (the simulator), never in `run`. It never
prefetches and never bypasses: the fewest demand fetches any replacement policy can achieve.
"""

from __future__ import annotations

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


class OraclePolicy(PolicyBase):
    """Belady's MIN. Build it from the trace to be replayed; the replay's on_access calls must follow
    `access_sequence` exactly (checked)."""

    name = "oracle"

    def __init__(self, experts: np.ndarray, num_experts: int) -> None:
        self._seq = access_sequence(experts, num_experts).tolist()
        self._next = next_use(np.asarray(self._seq, dtype=np.int64)).tolist()
        self._E = num_experts
        self._cursor = 0
        self._when: dict[ExpertKey, int] = {}  # key -> position of its next use
        self._resident: set[ExpertKey] = set()
        self._heap: list[tuple[int, ExpertKey]] = []  # (-next use, key), lazy invalidation

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
