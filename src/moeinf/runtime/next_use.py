"""The `trace` policy's estimate of when a resident expert is next used (the ET), from recency, use
rates and the routing statistics; `trace_policy.TracePolicy` keeps the state and the heap.

For expert (l, e), in layer steps (token * L + layer):

    ET = next visit of layer l + L * (1 - p) / q

where p is the probability that the next visit of layer l uses e and q its long-run rate per token.
p comes from recency: the measured reuse hazard falls with the tokens r since the last use (0.46 at
r=1, 0.25 at r=2, ~0.46 r^-0.69 on the shared gpt-oss trace), scaled by the expert's own next-token
reuse when routing statistics are given (0.06 to 0.79 within one layer of gpt-oss), and raised to q
when q is larger; q blends the expert's recent use rate (uses decayed per token) with a prior rate
from the trace library. For the layers already passed in this token, whose next visit is the next
token, p is a cross-token prediction: a linear model per layer (ridge regression on the library's
counts, `routing_counts.cross_weights`) of P(e at layer l, next token) from this token's routing at
layers l-4..l (top-4 precision 0.56 on gpt-oss, against 0.45 for the previous token's choice). For
an expert of a layer still ahead in this token, `_et_follow` averages p with P(e at its layer | the
running layer's experts) of the same token (top-4 precision 0.59 one layer ahead on gpt-oss, 0.51
twelve ahead). At run time the router lookahead's predictions get `lookahead_p`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moeinf.runtime.expert_key import ExpertKey

# Reuse hazard P(use at the next visit | r tokens since the last use) ~ A * r^-B (measured, see above).
HAZARD_A = 0.46
HAZARD_B = 0.69
HAZARD = [1.0] + [HAZARD_A * r**-HAZARD_B for r in range(1, 4097)]
MAX_R = 4096


def check_points() -> list[int]:
    """For each r, the next recency (tokens since the last use) at which the ET is recomputed."""
    points, r = [1, 2, 3], 4
    while r <= MAX_R:
        points += [r, r * 3 // 2]
        r *= 2
    nxt, j = [], 0
    for r in range(MAX_R + 1):
        while j < len(points) and points[j] <= r:
            j += 1
        nxt.append(points[j] if j < len(points) else 0)
    return nxt


NEXT_CHECK = check_points()


class NextUseEstimates:
    """The ET half of `TracePolicy` (a mixin): reads the state the policy keeps (`_t`, `_c`, `_n`,
    `_last`, `_ew`, `_prior`, `_reuse`, `_xnow`, `_ahead`, `_running`, `_cross`, `_follow`...) and
    changes only `_xflat`, `_xpos` and `_xnow` (the running token's cross-token predictions)."""

    def _predict_next(self, keys: Sequence[ExpertKey]) -> bool:
        """The cross-token prediction for the running layer's next visit, from this token's routing at
        this layer (`keys`) and the layers before it; False for a layer without a table."""
        c = self._c
        if c >= len(self._cross):
            return False
        table = self._cross[c]  # [(X + 1) * E + 1, E]: row k * E + e for e at layer c - k, intercept last
        flat, pos = self._xflat, self._xpos
        start = pos[c] = len(flat)
        E = table.shape[1]
        flat += [c * E - k[1] for k in keys]  # a * E - e for e at layer a: its row is c * E - that
        for a in range(c - self._xd, c):  # the earliest layer of the window that ran in this token
            if a in pos:
                start = pos[a]
                break
        cE = c * E
        rows = [cE - w for w in flat[start:]]
        rows.append(len(table) - 1)  # the intercept
        self._xnow[c] = np.add.reduce(table.take(rows, 0)).tolist()  # numpy: 2x faster than zip here
        return True

    def _p_next(self, key: ExpertKey) -> float:
        """Probability that the next visit of the key's layer uses it (as in `_et`)."""
        return self._estimate(key)[1]

    def _estimate(self, key: ExpertKey) -> tuple[int, float, float]:
        """(token of the next visit of the key's layer, probability that this visit uses the key, its
        long-run use rate per token)."""
        layer, e = key
        t = self._t
        tv = t if layer > self._c else t + 1  # token of the layer's next visit
        seen = self._last.get(key)
        prior = self._prior
        rate = prior[layer][e] if prior else self._default_rate
        n = self._n
        span = self._span[n if n < MAX_R else MAX_R] + self.kappa
        if seen is None:
            p = 0.0
            q = self.kappa * rate / span
        else:
            r = tv - seen
            if r > MAX_R:
                r = MAX_R
            p = HAZARD[r]
            if self._reuse is not None:  # this expert's own reuse instead of the average's
                p *= self._reuse[layer][e]
                if p > 0.99:
                    p = 0.99
            q = (self._ew[key] * self._pow[r] + self.kappa * rate) / span
        if q > p:
            p = q
        if tv != t:
            pred = self._xnow.get(layer)
            if pred is not None:
                # A layer already passed in this token: its next visit is the next token, which the
                # cross-token predictor forecasts from this token's routing (top-4 precision 0.56 on
                # gpt-oss, against 0.45 for reuse); on a dev subset replacing p beat averaging.
                p = pred[e]
                if p < 0.01:
                    p = 0.01
                elif p > 0.99:
                    p = 0.99
        if self._ahead and self._ahead.get(key) == tv and self.lookahead_p > p:
            p = self.lookahead_p
        return tv, p, q

    def _et(self, key: ExpertKey) -> float:
        """Expected layer step of the next use of `key`, seen from the running layer."""
        L = self.L or (self._max_layer + 1)
        tv, p, q = self._estimate(key)
        if q < 1e-3:
            q = 1e-3
        return tv * L + key[0] + L * (1.0 - p) / q

    def _et_follow(self, key: ExpertKey) -> float | None:
        """The ET of `key` (of a layer ahead in this token) with its next-visit probability informed by
        the running layer's experts (None without statistics for that layer pair)."""
        table = self._follow.get((self._c, key[0])) if self._follow is not None else None
        if table is None:
            return None
        e = key[1]
        running = self._running
        pf = sum(table[k[1]][e] for k in running) / len(running)
        tv, p, q = self._estimate(key)
        p = 0.5 * (p + pf)  # averaged: on a dev subset as good as max, replace or naive Bayes
        if q < 1e-3:
            q = 1e-3
        L = self.L or (self._max_layer + 1)
        return tv * L + key[0] + L * (1.0 - p) / q
