"""The budgeted expert cache: an `ExpertProvider` over fixed slot pools, fed by asynchronous transfers.

On CPU one tier: RAM slots are the compute tier, filled from the store by reader threads. On CUDA two
tiers: GPU slots (compute) in front of pinned RAM slots, the latter filled from the store and copied
up on a dedicated stream. A policy (runtime.policy) picks victims and prefetches; this module owns
the mechanism: slot states, pins, priorities, cancellation and statistics. Output is never changed:
the model gets exactly the stored weights, only sooner or later.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from moeinf.runtime.cache_stats import CacheStats
from moeinf.runtime.expert_key import ExpertKey
from moeinf.runtime.expert_provider import ExpertWeights
from moeinf.runtime.expert_store import DATA_OFFSET, ExpertLayout, ExpertReader
from moeinf.runtime.policy import Policy, batched_access
from moeinf.runtime.slot_pool import SlotPool, torch_dtype
from moeinf.runtime.slot_tier import FILLING, READY, Tier
from moeinf.runtime.trace import routing_array
from moeinf.runtime.transfer import DEMAND, PREFETCH, CopyStream, Job, TransferQueue


class ExpertCache:
    """Budgeted provider of routed experts; see the module docstring."""

    def __init__(
        self,
        expert_path: Callable[[int, int], Path],
        layout: ExpertLayout,
        *,
        slots: int,
        policy: Policy,
        device: torch.device,
        dtype: torch.dtype,
        host_slots: int = 0,
        host_policy: Policy | None = None,
        workers: int = 4,
        direct_io: bool = True,
        bulk_threshold: int | None = None,
        scratch_slots: int = 2,
    ) -> None:
        self.expert_path = expert_path
        self.layout = layout
        self.device = device
        self.policy = policy
        self._on_accesses = batched_access(policy)  # one policy call per layer call where it has one
        self.stats = CacheStats()
        self._cv = threading.Condition()
        self._prefetched: set[ExpertKey] = set()  # prefetched, not yet used
        raw = dtype == torch_dtype(layout.dtype)
        self.cuda = device.type == "cuda"
        if self.cuda:
            if host_slots < 1 or host_policy is None:
                raise ValueError("a CUDA cache needs a host tier")
            host = SlotPool(
                host_slots,
                layout,
                device=torch.device("cpu"),
                dtype=torch_dtype(layout.dtype),
                raw=True,
                pin=True,
            )
            self.host: Tier | None = Tier(host, host_policy)
            self.copies = CopyStream(device)
            direct_io = direct_io and host.buffer.data_ptr() % 4096 == 0
        else:
            self.host = None
        # A request for more than `bulk_threshold` experts of one layer (a prefill) is served without
        # evicting: free slots first, then the scratch slots.
        self.bulk_threshold = bulk_threshold
        pool = SlotPool(slots + scratch_slots, layout, device=device, dtype=dtype, raw=raw)
        self.tier = Tier(pool, policy, scratch=scratch_slots)
        self.tier.on_evict = self._evicted
        self.reader = ExpertReader(layout, direct=direct_io)
        self._staging = threading.local()  # per worker: a page-aligned buffer for reads that need conversion
        self._queue = TransferQueue(self._fill, workers=workers)
        self._routing_sink: tuple[Callable[[np.ndarray], None], int] | None = None  # record_routing
        self._routing_log: list[tuple[int, list[int]]] = []  # this request's (layer, experts) steps

    # --- the provider ------------------------------------------------------------------------------

    def all_ready(self, layer: int, expert_ids: Sequence[int]) -> bool:
        """Whether every one of these experts is resident and filled now (a hint: no side effects)."""
        tier = self.tier
        with self._cv:
            for e in expert_ids:
                slot = tier.slot_of.get(ExpertKey(layer, int(e)))
                if slot is None or tier.state[slot] != READY or tier.error[slot] is not None:
                    return False
            return True

    def experts(
        self, layer: int, expert_ids: Sequence[int], *, hold: bool = False
    ) -> Iterator[tuple[int, ExpertWeights]]:
        keys = list(dict.fromkeys(ExpertKey(layer, int(e)) for e in expert_ids))
        held: list[ExpertKey] = []  # handed over, still pinned (hold=True) until the iterator closes
        stats = self.stats.layer(layer)
        tier = self.tier
        pending: list[ExpertKey] = []  # pinned in the tier: ready or in flight
        deferred: deque[ExpertKey] = deque()  # missing, waiting for a slot
        current: ExpertKey | None = None
        bulk = self.bulk_threshold is not None and len(keys) > self.bulk_threshold
        # Once per call: current_stream(device) cost ~50 us per expert use on an H100 machine.
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        if self._routing_sink is not None and len(keys) == self.bulk_threshold:
            self._routing_log.append((layer, [k.expert for k in keys]))  # one decode token's layer
        with self._cv:
            self._on_accesses(keys, [k for k in keys if k not in tier.slot_of])
            for key in keys:
                slot = tier.slot_of.get(key)
                stats.requests += 1
                if slot is not None:
                    stats.hits += 1
                    tier.pins[slot] += 1
                    job = tier.job[slot]
                    if job is not None and tier.state[slot] == FILLING:
                        self._queue.promote(job, DEMAND)
                    pending.append(key)
                    if key in self._prefetched:
                        self._prefetched.discard(key)
                        stats.prefetch_used += 1
                else:
                    stats.misses += 1
                    deferred.append(key)
            self._start(deferred, pending, bulk)
            plan = [k for k in self.policy.plan_prefetch(layer, [k.expert for k in keys]) if k not in keys]
            if plan:
                self._prefetch_locked(plan)
        try:
            while pending or deferred:
                with self._cv:
                    self._start(deferred, pending, bulk)
                    current = next((k for k in pending if tier.state[tier.slot_of[k]] == READY), None)
                    if current is None:
                        current = next((k for k in pending if tier.error[tier.slot_of[k]] is not None), None)
                    if current is None:
                        # Wait for a transfer to land (ours, or a prefetch whose slot we then take).
                        t0 = time.perf_counter()
                        self._cv.wait()
                        stats.stall_s += time.perf_counter() - t0
                        continue
                    pending.remove(current)
                    slot = tier.slot_of[current]
                    error = tier.error[slot]
                    if error is not None:
                        tier.pins[slot] -= 1
                        tier.release(current)
                        current = None
                        raise error
                    ready_event = tier.ready_event[slot]
                if ready_event is not None:  # the copy may still be in flight: compute waits for it
                    stream.wait_event(ready_event)
                yield current.expert, tier.pool.weights(slot)
                if hold:
                    held.append(current)
                else:
                    with self._cv:
                        self._unpin_locked(current, stream)
                current = None
        finally:
            with self._cv:
                for key in ([current] if current is not None else []) + pending + held:
                    self._unpin_locked(key, stream)

    def prefetch(self, keys: Iterable[ExpertKey], priority: int = PREFETCH) -> int:
        """Start fetching `keys` that are not resident or in flight, as far as free or evictable slots allow.

        Never waits and never evicts a pinned expert. Returns the number of fetches started.
        """
        with self._cv:
            return self._prefetch_locked(list(keys), priority)

    def cancel_prefetches(self, keys: Iterable[ExpertKey] | None = None) -> int:
        """Cancel queued (not yet started) prefetches, of `keys` or all; their slots become free."""
        with self._cv:
            wanted = set(keys) if keys is not None else None
            candidates = [k for k in self.tier.slot_of if wanted is None or k in wanted]
            return sum(self._cancel_locked(key) for key in candidates)

    @property
    def wants_lookahead(self) -> bool:
        """Whether the policy uses next-layer router predictions (see `lookahead`)."""
        return self.policy.uses_lookahead

    def lookahead(self, layer: int, expert_ids: Sequence[int]) -> None:
        """The decoder's early guess at `layer`'s routing for the current token, for the policy."""
        with self._cv:
            self.policy.on_router_lookahead(layer, [int(e) for e in expert_ids])

    def start_request(self) -> None:
        with self._cv:
            self.policy.on_request_start()
            self._routing_log.clear()

    def end_request(self) -> None:
        with self._cv:
            log, self._routing_log = self._routing_log, []
        if self._routing_sink is not None and log:  # first: the policy's learning below saves both
            sink, num_layers = self._routing_sink
            sink(routing_array(log, num_layers, self.bulk_threshold or 1))
        with self._cv:
            self.policy.on_request_end()

    def record_routing(self, sink: Callable[[np.ndarray], None], num_layers: int) -> None:
        """Hand each finished request's decode routing to `sink` as [T, num_layers, K] expert ids (-1:
        none), e.g. the trace library's routing counts. Decode steps only: a prefill's request names
        the experts of many tokens at once, not which token used which."""
        self._routing_sink = (sink, num_layers)

    def close(self) -> None:
        self._queue.close()

    def resident(self) -> set[ExpertKey]:
        with self._cv:
            return {k for k, s in self.tier.slot_of.items() if self.tier.state[s] == READY}

    # --- internals (call with the lock held unless said otherwise) ---------------------------------

    def _start(self, deferred: deque[ExpertKey], pending: list[ExpertKey], bulk: bool) -> None:
        """Give deferred demand misses slots as they become available and queue their reads."""
        tier = self.tier
        while deferred:
            key = deferred[0]
            slot = tier.free.pop() if tier.free else None
            # Evict only for a decode-sized request the policy wants to keep; else use a scratch slot.
            if slot is None and not bulk and not self.policy.should_bypass(key):
                slot = tier.take()
            if slot is None and tier.scratch_free:
                slot = tier.scratch_free.pop()
                self.stats.layer(key.layer).bypassed += 1
            if slot is None:
                if not self._cancel_one_prefetch():
                    return
                continue
            key = deferred.popleft()
            self.tier.assign(slot, key)
            self.tier.pins[slot] += 1
            self.tier.job[slot] = self._queue.submit((key, slot), DEMAND)
            pending.append(key)

    def _prefetch_locked(self, keys: list[ExpertKey], priority: int = PREFETCH) -> int:
        started = 0
        for key in keys:
            if key in self.tier.slot_of:
                continue
            slot = self.tier.take()
            if slot is None:
                break
            self.tier.assign(slot, key)
            self.tier.job[slot] = self._queue.submit((key, slot), priority)
            self._prefetched.add(key)
            self.stats.layer(key.layer).prefetch_issued += 1
            started += 1
        return started

    def _cancel_locked(self, key: ExpertKey) -> bool:
        tier = self.tier
        slot = tier.slot_of[key]
        job = tier.job[slot]
        if tier.state[slot] != FILLING or tier.pins[slot] or job is None or not self._queue.cancel(job):
            return False
        tier.release(key)
        if key in self._prefetched:
            self._prefetched.discard(key)
            self.stats.layer(key.layer).prefetch_wasted += 1
        return True

    def _cancel_one_prefetch(self) -> bool:
        return any(self._cancel_locked(k) for k in list(self._prefetched) if k in self.tier.slot_of)

    def _unpin_locked(self, key: ExpertKey, stream=None) -> None:
        """Drop one pin; on CUDA mark the slot's last use on the compute `stream` (everything the
        model queued with these weights so far), which a later copy into the slot waits for."""
        tier = self.tier
        slot = tier.slot_of.get(key)
        if slot is None:
            return
        tier.pins[slot] -= 1
        if stream is not None and tier.state[slot] == READY:
            # One event per slot, re-recorded at each use (a copy into the slot, which starts only when
            # it is not READY, has already waited on its record); a new event per use cost more.
            event = tier.used_event[slot]
            if event is None:
                event = tier.used_event[slot] = torch.cuda.Event()
            event.record(stream)
        if tier.transient(slot) and tier.pins[slot] == 0 and tier.state[slot] == READY:
            tier.release(key)
        self._cv.notify_all()

    def _evicted(self, key: ExpertKey) -> None:
        if key in self._prefetched:
            self._prefetched.discard(key)
            self.stats.layer(key.layer).prefetch_wasted += 1

    # --- transfers (worker threads, lock NOT held) -------------------------------------------------

    def _fill(self, job: Job) -> None:
        key, slot = job.payload
        stats = self.stats.layer(key.layer)
        try:
            if self.cuda:
                self._fill_device(job, key, slot, stats)
            else:
                self._read(key, self.tier.pool, slot)
                with self._cv:
                    stats.bytes_read += self.layout.data_bytes
            error = None
        except BaseException as e:  # handed to the waiting model thread, which raises it
            error = e
        with self._cv:
            if self.tier.job[slot] is job:  # still the fill this job was queued for
                self.tier.error[slot] = error
                self.tier.state[slot] = READY if error is None else FILLING
                self.tier.job[slot] = None
                if error is not None and self.tier.pins[slot] == 0:
                    self.tier.release(key)  # a failed prefetch: forget it; a demand will raise
            self._cv.notify_all()

    def _read(self, key: ExpertKey, pool: SlotPool, slot: int) -> None:
        path = self.expert_path(key.layer, key.expert)
        if pool.raw:
            self.reader.read_into(path, pool.memory(slot))
            return
        staging = getattr(self._staging, "pool", None)
        if staging is None:
            staging = self._staging.pool = SlotPool(
                1, self.layout, device=torch.device("cpu"), dtype=torch_dtype(self.layout.dtype), raw=True
            )
        self.reader.read_into(path, staging.memory(0))
        for dst, src in zip(pool.weights(slot), staging.weights(0), strict=True):
            dst.copy_(src)  # converts the stored dtype to the compute dtype

    def _fill_device(self, job: Job, key: ExpertKey, slot: int, stats) -> None:
        host = self.host
        assert host is not None
        with self._cv:
            hslot = host.slot_of.get(key)
            if hslot is None:
                while (hslot := host.take()) is None:
                    self._cv.wait()
                host.assign(hslot, key)
                fresh = True
            else:
                fresh = False
                host.policy.on_access(key, True)
            host.pins[hslot] += 1
        try:
            if fresh:
                self._read(key, host.pool, hslot)
                with self._cv:
                    host.state[hslot] = READY
                    stats.bytes_read += self.layout.data_bytes
            dst_pool = self.tier.pool
            if dst_pool.raw:
                dst, src = dst_pool.raw_bytes(slot), host.pool.raw_bytes(hslot)
            else:
                n = 3 * self.layout.hidden * self.layout.expert_dim * dst_pool.itemsize
                dst = dst_pool.buffer[slot * dst_pool.slot_bytes :][:n]
                start = hslot * host.pool.slot_bytes + DATA_OFFSET
                src = host.pool.buffer[start : start + self.layout.data_bytes].view(host.pool.dtype)
                dst = dst.view(dst_pool.dtype)
            with self._cv:
                after = self.tier.used_event[slot]
            event = self.copies.copy(dst, src, after=after)
            with self._cv:
                # Ready now: the compute stream waits on `event`; the model need not wait for the copy.
                self.tier.ready_event[slot] = event
                self.tier.state[slot] = READY
                stats.bytes_h2d += self.layout.data_bytes
                self._cv.notify_all()
            event.synchronize()  # this worker only: the host slot may be reused once the copy is done
            with self._cv:
                if self.tier.ready_event[slot] is event:
                    self.tier.ready_event[slot] = None  # landed: later uses need not wait on it
        except BaseException:
            with self._cv:
                if fresh and host.state[hslot] != READY:
                    host.pins[hslot] -= 1
                    host.release(key)
                    hslot = None
            raise
        finally:
            with self._cv:
                if hslot is not None and host.slot_of.get(key) == hslot:
                    host.pins[hslot] -= 1
                self._cv.notify_all()
