"""The `trace` policy: evict by expected time to next use (ET), learned from this request and the library.

Every token sweeps the layers in order, so in a pool shared by all layers the expert needed soonest
is one of the layer about to run, and LRU evicts exactly those. This policy keeps, for each resident
expert, its ET in layer steps (how it is estimated: runtime/next_use.py) and evicts the one with the
largest ET (never one of the running layer: `can_evict`). The prior rates come from the trace
library: the stored EAMs closest to the request's partial EAM by cosine similarity of per-layer
normalised rows, re-matched every `rematch_every` tokens, weighted as `prior_weight` tokens. At run
time the next layer's router applied early (`on_router_lookahead`) raises the next-visit
probability of the experts it predicts. Before an expert of a layer still ahead in this token is
evicted, its ET is re-estimated with the running layer's experts (same-token co-occurrence); a
lower ET re-files it. A demand miss whose own ET after this use is larger than the victim's
bypasses the cache (a scratch slot, no eviction). The prefetch plan names experts of the next layer
whose next-visit probability is high and whose ET is below the current victim's, a few at most, so
prefetches never push out more useful experts and leave the transfer channel to demand fetches.

Speed: an ET is recomputed at each use, then at its layer's visits r = 1, 2, 3, 4, 6, 8, 12, ...
tokens later (the hazard flattens), and kept in a max-heap with lazy deletion. Pure Python: the
reference; runtime/trace_policy_native.py makes the same decisions in C.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Container, Sequence

import numpy as np

from moeinf.runtime.expert_key import ExpertKey
from moeinf.runtime.next_use import HAZARD_A, MAX_R, NEXT_CHECK, NextUseEstimates
from moeinf.runtime.policy import PolicyBase
from moeinf.runtime.routing_counts import RoutingStats
from moeinf.runtime.trace_library import TraceLibrary


class TracePolicy(NextUseEstimates, PolicyBase):
    """See the module docstring. `library` (optional) supplies priors and receives finished requests."""

    name = "trace"
    uses_lookahead = True

    def __init__(
        self,
        library: TraceLibrary | None = None,
        *,
        num_layers: int | None = None,
        num_experts: int | None = None,
        top_k: int | None = None,
        bypass: bool = True,
        bypass_margin: float = 0.0,
        prefetch: int = 2,
        prefetch_threshold: float = 0.8,
        prior_weight: float = 5.0,
        decay: float = 0.9,
        rematch_every: int = 32,
        learn: bool = True,
        lookahead_p: float = 0.8,
        streak_lag: int = 4,
        routing: RoutingStats | None = None,
        follow: bool = True,
        own_reuse: bool = True,
        cross: bool = True,
    ) -> None:
        self.library = library
        if library is not None:
            num_layers = num_layers or library.num_layers
            num_experts = num_experts or library.num_experts
            top_k = top_k or library.top_k
        self.L = num_layers or 0  # 0 until known: inferred from the first token's layers
        self.E = num_experts or 0
        self.K = top_k or 0
        self.bypass = bypass
        # Margin, threshold (>= the lookahead's 0.8) and re-match: swept in BENCHMARKS.md, issue 8.
        self.bypass_margin = bypass_margin  # in tokens: bypass only when later than the victim by this
        self.prefetch = prefetch
        self.prefetch_threshold = prefetch_threshold
        self.kappa = prior_weight  # tokens' worth of weight given to the prior rate
        self.decay = decay  # per token, of the recent-use rate
        self._pow = [decay**i for i in range(MAX_R + 1)]
        self._span = [(1 - decay**n) / (1 - decay) for n in range(MAX_R + 1)]  # sum of decay^i, i < n
        self.rematch_every = rematch_every
        self.learn = learn
        self.streak_lag = streak_lag
        self.lookahead_p = lookahead_p  # next-visit probability of an expert the early router predicts
        self._ahead: dict[ExpertKey, int] = {}  # router lookahead: key -> token of the predicted visit
        self._ahead_layer = -1
        self._resident: set[ExpertKey] = set()
        self._stored: dict[ExpertKey, float] = {}  # key -> ET of its live heap entry
        self._heap: list[tuple[float, ExpertKey]] = []  # (-ET, key): lower bounds of ET
        self._last: dict[ExpertKey, int] = {}  # global token index of the last use (survives requests)
        self._count: dict[ExpertKey, int] = {}  # uses in this request
        self._ew: dict[ExpertKey, float] = {}  # decayed use count as of the last use
        self._prior: list[list[float]] = []  # [L][E] prior rate per token, from the library
        # Uniform prior K / E until a library says better; 1/8 when the shape is not known yet.
        self._default_rate = (self.K / self.E) if self.K and self.E else 0.125
        self._t = 0  # global token index of the running token
        self._c = -1  # layer of the running / last layer call
        self._max_layer = -1
        self._max_expert = -1
        self._n = 0  # tokens of this request so far (including the running one)
        self._in_layer = False  # between the first on_access of a layer call and its plan_prefetch
        self._running: list[ExpertKey] = []
        self._due = False  # the running layer's missed checks are not processed yet
        self._checks: dict[tuple[int, int], list[ExpertKey]] = {}  # (layer, token) -> ETs to recompute
        self._inserted: dict[ExpertKey, int] = {}  # token of insertion, for experts never used
        self._layer_keys: dict[int, list[ExpertKey]] = {}  # layer -> experts of its previous visit
        self._ahead_due: list[ExpertKey] = []
        # Token-level statistics of recorded routing (`routing_statistics`), when given.
        self._reuse: list[list[float]] | None = None  # [L][E] reuse ratio to the average hazard
        self._follow: dict | None = None  # (l, m) -> [E][E] P(f at m | e at l)
        self._checked: dict[ExpertKey, tuple[int, int]] = {}  # lazy follow: (token, layer) of the check
        self._follow_due: dict[int, list[ExpertKey]] = {}  # layer -> keys whose ET a follow check lowered
        # Cross-token predictor (`RoutingStats.cross`): per layer c a [(X + 1) * E + 1, E] table, row
        # k * E + e for expert e at layer c - k, intercept last (kept this compact: a table over all
        # L * E features would take L * (L * E + 1) * E floats, 1.8 GB for DeepSeek-V3's shape).
        self._cross: list[np.ndarray] | None = None
        self._xd = 0  # layers back the predictor reads
        self._xflat: list[int] = []  # this token's routing so far, as a * E - e for expert e at layer a
        self._xpos: dict[int, int] = {}  # layer run in this token -> its first position in _xflat
        self._xnow: dict[int, list[float]] = {}  # layer passed in this token -> P(e at it, next token)
        if routing is not None:
            if cross and routing.cross is not None:
                self._cross = [np.asarray(t, dtype=np.float64) for t in routing.cross]
                E = routing.cross[0].shape[1]
                self._xd = (routing.cross[0].shape[0] - 1) // E - 1
            if own_reuse:
                self._reuse = [[r / HAZARD_A for r in row] for row in routing.reuse]
            if follow:
                self._follow = routing.follow

    # --- request boundaries ------------------------------------------------------------------------

    def on_request_start(self) -> None:
        self._count.clear()
        self._n = 0
        self._set_prior(None)

    def on_request_end(self) -> None:
        if self.learn and self.library is not None and self._count:
            self.library.add(self.request_eam())

    def request_eam(self) -> np.ndarray:
        """This request's expert activation matrix [L, E] so far."""
        L, E = max(self.L, self._max_layer + 1), self.E or 1 + max((k[1] for k in self._count), default=0)
        out = np.zeros((L, E), dtype=np.int64)
        for (layer, expert), n in self._count.items():
            out[layer, expert] = n
        return out

    def _set_prior(self, eam: np.ndarray | None) -> None:
        """Prior rates from the library (matched to `eam` if given), else uniform K / E."""
        self._default_rate = (self.K / self.E) if self.K and self.E else 0.125
        self._prior = []
        if self.library is not None and len(self.library):
            self._prior = self.library.predict(eam).tolist()  # [L][E] rate per token
        self._rebuild()

    # --- the hooks ---------------------------------------------------------------------------------

    def on_access(self, key: ExpertKey, hit: bool) -> None:
        layer = key[0]
        if not self._in_layer:
            self._start_layer(layer)
        self._running.append(key)
        if key[1] > self._max_expert:
            self._max_expert = key[1]
        t = self._t
        last = self._last
        seen = last.get(key)
        last[key] = t
        count = self._count
        count[key] = count.get(key, 0) + 1
        if seen is None:
            self._ew[key] = 1.0
        else:
            r = t - seen
            self._ew[key] = self._ew[key] * self._pow[r if r < MAX_R else MAX_R] + 1.0
        # A use right after a use changes the ET by about one sweep: skipping the push keeps such
        # streak experts a little more protected (their ET lags, by `streak_lag` tokens at most) and
        # saves most of the work per access.
        if key in self._resident and (seen != t - 1 or self._stored[key] < (t - self.streak_lag) * self.L):
            self._push(key)

    def on_accesses(self, keys: Sequence[ExpertKey], missed: Container[ExpertKey]) -> None:
        """`on_access` for each key in order, inlined (the simulator's fast path)."""
        if not keys:
            return
        if not self._in_layer:
            self._start_layer(keys[0][0])
        if self._cross is not None:  # before the pushes below, so that their ETs use it
            self._predict_next(keys)
        self._running.extend(keys)
        t, last, count, ew, pw = self._t, self._last, self._count, self._ew, self._pow
        resident, stored = self._resident, self._stored
        lag_floor = (t - self.streak_lag) * self.L
        for key in keys:
            if key[1] > self._max_expert:
                self._max_expert = key[1]
            seen = last.get(key)
            last[key] = t
            count[key] = count.get(key, 0) + 1
            if seen is None:
                ew[key] = 1.0
            else:
                r = t - seen
                ew[key] = ew[key] * pw[r if r < MAX_R else MAX_R] + 1.0
            if key in resident and (seen != t - 1 or stored[key] < lag_floor):
                self._push(key)

    def _start_layer(self, layer: int) -> None:
        self._in_layer = True
        if self._c >= 0:
            self._layer_keys[self._c] = list(self._running)
        if layer <= self._c:  # the sweep restarted: a new token
            self._new_token()
        elif self._n == 0:
            self._n = 1
        self._c = layer
        if layer > self._max_layer:
            self._max_layer = layer
        self._running.clear()
        self._due = True
        if layer == self._ahead_layer:
            self._ahead_due = [k for k in self._ahead if k in self._resident]
            self._ahead.clear()
            self._ahead_layer = -1
        if self._follow_due:  # ETs lowered by this token's routing so far are spent now
            lowered = self._follow_due.pop(layer, None)
            if lowered:
                self._ahead_due.extend(k for k in lowered if k in self._resident)

    def _new_token(self) -> None:
        self._xnow.clear()  # the predictions were for this (now running) token
        self._xflat.clear()
        self._xpos.clear()
        self._t += 1
        self._n += 1
        if not self.L:
            self.L = self._max_layer + 1
            self._rebuild()
        if self.library is not None and self.rematch_every and self._n % self.rematch_every == 0:
            self._set_prior(self.request_eam())

    def _refresh_layer(self) -> None:
        """The running layer did not use some experts it was expected to: recompute their ETs."""
        self._due = False
        c = self._c
        if (
            self._cross is not None
            and c not in self._xnow
            and self._running
            and self._predict_next(self._running)
        ):
            for key in self._running:  # per-key on_access (run time): predicted only now, re-file
                if key in self._resident:
                    self._push(key)
        due = self._checks.pop((self._c, self._t), None)
        prev = self._layer_keys.get(self._c)
        if prev:
            due = prev if due is None else due + prev
        if self._ahead_due:  # unused looked-ahead experts lose their protection (see on_router_lookahead)
            due = self._ahead_due if due is None else due + self._ahead_due
            self._ahead_due = []
        if not due:
            return
        if len(due) > 1:
            due = dict.fromkeys(due)  # a key both checked and of the previous visit: computed once
        t, last, resident, stored, heap = self._t, self._last, self._resident, self._stored, self._heap
        for key in due:
            seen = last.get(key, -1)
            if seen >= t or key not in resident:
                continue  # used now (its own check is scheduled) or gone
            et = stored[key] = self._et(key)
            heapq.heappush(heap, (-et, key))
            r = t - seen if seen >= 0 else t - self._inserted.get(key, t)
            nxt = NEXT_CHECK[r] if r <= MAX_R else 0
            if nxt:
                self._schedule(key, t + nxt - r)

    def _schedule(self, key: ExpertKey, token: int) -> None:
        slot = (key[0], token)
        due = self._checks.get(slot)
        if due is None:
            self._checks[slot] = [key]
        else:
            due.append(key)

    def _push(self, key: ExpertKey) -> None:
        et = self._et(key)
        self._stored[key] = et
        heapq.heappush(self._heap, (-et, key))

    def on_insert(self, key: ExpertKey) -> None:
        self._resident.add(key)
        self._push(key)
        if key not in self._last:  # a prefetch of an expert never used: check it at its next visits
            self._inserted[key] = self._t
            self._schedule(key, self._t + 1)

    def on_evict(self, key: ExpertKey) -> None:
        self._resident.discard(key)
        self._stored.pop(key, None)
        self._inserted.pop(key, None)

    def choose_victim(self, can_evict: Callable[[ExpertKey], bool]) -> ExpertKey | None:
        if self._due:
            self._refresh_layer()
        top = self._top(can_evict)
        return top[1] if top is not None else None

    def should_bypass(self, key: ExpertKey) -> bool:
        if not self.bypass or not self.L:
            return False
        if self._due:
            self._refresh_layer()
        top = self._top(self._not_running)
        if top is None:
            return False
        # After this use the key's next visit is the next token: compare its ET then with the victim's.
        return self._et(key) > top[0] + self.bypass_margin * self.L

    def plan_prefetch(self, layer: int, expert_ids: Sequence[int]) -> list[ExpertKey]:
        if self._due:
            self._refresh_layer()
        self._in_layer = False
        if not self.prefetch or not self.L:
            return []
        nxt = layer + 1
        if nxt >= self.L:
            return []
        candidates = []
        # Candidates: what the next layer used at its previous visit (reuse is the strongest signal)
        # and, at run time, what its router predicts from this token's hidden state.
        pool = self._layer_keys.get(nxt, [])
        if self._ahead_layer == nxt:
            pool = list(dict.fromkeys([*self._ahead, *pool]))
        for key in pool:
            if key not in self._resident and self._p_next(key) >= self.prefetch_threshold:
                candidates.append((self._et(key), key))
        if not candidates:
            return []
        top = self._top(self._not_running)
        if top is None:
            return []
        candidates.sort()
        return [key for et, key in candidates[: self.prefetch] if et < top[0]]

    def on_router_lookahead(self, layer: int, expert_ids: Sequence[int]) -> None:
        # Replaces the pending guess: in the decoder's order (layer l + 1's guess during layer l's attention)
        # unused guessed experts keep their lowered ET until re-checked (fewer fetches: BENCHMARKS, issue 8).
        tv = self._t if layer > self._c else self._t + 1
        self._ahead = {ExpertKey(layer, int(e)): tv for e in expert_ids}
        self._ahead_layer = layer
        for key in self._ahead:
            if key in self._resident:  # protect them now: their ET just dropped
                self._push(key)

    # --- expected time of next use -----------------------------------------------------------------

    def _not_running(self, key: ExpertKey) -> bool:
        return key not in self._running

    def _top(self, can_evict: Callable[[ExpertKey], bool]) -> tuple[float, ExpertKey] | None:
        """(ET, key) of the evictable resident with the largest ET (as last computed)."""
        heap, stored, resident = self._heap, self._stored, self._resident
        follow = self._follow if self._running else None
        stamp = (self._t, self._c)
        held = []
        found = None
        while heap:
            neg, key = heap[0]
            if key not in resident or stored.get(key) != -neg:
                heapq.heappop(heap)  # superseded
                continue
            if can_evict(key):
                if follow is not None and key[0] > self._c and self._checked.get(key) != stamp:
                    # Before evicting an expert of a layer still ahead in this token, ask what this
                    # token's routing so far says about it; a lower ET re-files it.
                    self._checked[key] = stamp
                    et = self._et_follow(key)
                    if et is not None and et < -neg:
                        stored[key] = et
                        heapq.heapreplace(heap, (-et, key))
                        self._follow_due.setdefault(key[0], []).append(key)
                        continue
                found = (-neg, key)
                break
            held.append(heapq.heappop(heap))
        for entry in held:
            heapq.heappush(heap, entry)
        if len(heap) > 4 * len(resident) + 64:
            self._heap = [(-et, key) for key, et in stored.items()]
            heapq.heapify(self._heap)
        return found

    def _rebuild(self) -> None:
        """Fresh heap from the residents (after the prior or the position scale changed)."""
        self._stored = {key: self._et(key) for key in self._resident}
        self._heap = [(-et, key) for key, et in self._stored.items()]
        heapq.heapify(self._heap)
