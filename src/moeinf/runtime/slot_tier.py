"""Residency bookkeeping of one slot pool: which expert is in which slot, in what state, pinned by whom.

The expert cache holds the lock while it calls into a Tier; a Tier asks its policy for victims and
tells it about inserts and evictions. No I/O and no threads here.
"""

from __future__ import annotations

from collections.abc import Callable

from moeinf.runtime.expert_key import ExpertKey
from moeinf.runtime.policy import Policy
from moeinf.runtime.slot_pool import SlotPool
from moeinf.runtime.transfer import Job

EMPTY, FILLING, READY = 0, 1, 2


class Tier:
    """Residency bookkeeping of one slot pool. Callers hold the cache's lock.

    The last `scratch` slots are transient: they serve a miss once and are freed after use, without
    evicting anything and unseen by the policy (a bulk prefill must not flush the decode working set).
    """

    def __init__(self, pool: SlotPool, policy: Policy, scratch: int = 0) -> None:
        self.pool = pool
        self.policy = policy
        n = pool.slots
        self.regular = n - scratch
        self.slot_of: dict[ExpertKey, int] = {}
        self.key_of: list[ExpertKey | None] = [None] * n
        self.state = [EMPTY] * n
        self.pins = [0] * n
        self.job: list[Job | None] = [None] * n
        self.error: list[BaseException | None] = [None] * n
        self.used_event: list[object | None] = [None] * n  # CUDA: last compute use of the slot
        self.ready_event: list[object | None] = [None] * n  # CUDA: the copy that filled the slot
        self.free = list(range(self.regular - 1, -1, -1))
        self.scratch_free = list(range(n - 1, self.regular - 1, -1))
        self.on_evict: Callable[[ExpertKey], None] | None = None

    def transient(self, slot: int) -> bool:
        return slot >= self.regular

    def evictable(self, key: ExpertKey) -> bool:
        slot = self.slot_of[key]
        return self.state[slot] == READY and self.pins[slot] == 0 and not self.transient(slot)

    def take(self) -> int | None:
        """A free slot, evicting the policy's victim if needed; None if every slot is busy."""
        if self.free:
            return self.free.pop()
        victim = self.policy.choose_victim(self.evictable)
        if victim is None:
            return None
        if self.on_evict is not None:
            self.on_evict(victim)
        return self.drop(victim)

    def assign(self, slot: int, key: ExpertKey) -> None:
        self.slot_of[key] = slot
        self.key_of[slot] = key
        self.state[slot] = FILLING
        self.error[slot] = None
        if not self.transient(slot):
            self.policy.on_insert(key)

    def drop(self, key: ExpertKey) -> int:
        slot = self.slot_of.pop(key)
        self.key_of[slot] = None
        self.state[slot] = EMPTY
        self.job[slot] = None
        if not self.transient(slot):
            self.policy.on_evict(key)
        return slot

    def release(self, key: ExpertKey) -> None:
        slot = self.drop(key)
        (self.scratch_free if self.transient(slot) else self.free).append(slot)
