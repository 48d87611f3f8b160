"""Token-level routing counts kept with a model's trace library: what the `trace` policy's reuse and
cross-layer statistics (`trace_policy.RoutingStats`) are computed from.

Counts, not ratios, so that requests recorded at run time, traces imported from files and library
files merge by addition: per (layer, expert) uses, next-token reuses within a request and uses
that have a next token; per layer distance d (1..max_distance) the same-token pairs (e at layer l,
f at layer l + d); for the cross-token predictor (`cross_weights`) the same-layer pairs of a token,
the cross-token pairs (e at layer l - k of a token, f at layer l of the next token, k <= X) and the
uses at tokens that have a previous one. Fixed size (L x E, D x L x E x E, (X + 2) x L x E x E; D
and X bounded by `pair_distance` / `cross_distance`), whatever the number of requests. Layers are the
model's layer indices (a dense layer's rows stay zero). numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from moeinf.errors import InvalidTrace

if TYPE_CHECKING:
    from moeinf.runtime.trace import Trace

CHUNK = 8192  # tokens per one-hot block in `add` (8192 x 24 x 32 float32: 25 MB)
MAX_DISTANCE = 8  # layers ahead for same-token pairs (precision falls slowly with distance on gpt-oss)
MAX_PAIR_CELLS = 1 << 20  # D x L x E x E: 8 MB of counts, and the policy's tables stay small in Python
KEYS = ("tokens", "uses", "reuses", "with_next", "pairs")
CROSS_KEYS = ("cross_tokens", "same", "next_pairs", "with_prev")
CROSS_DISTANCE = 4  # layers back (0 = the layer itself) whose routing predicts the next token's
CROSS_RIDGE = 100.0  # ridge penalty of the cross-token predictor, in tokens
CROSS_MIN_TOKENS = 1000  # fewer counted tokens: no cross-token prediction (it would be mostly penalty)


def pair_distance(num_layers: int, num_experts: int, wanted: int = MAX_DISTANCE) -> int:
    """Layers ahead to count same-token pairs for: up to `wanted`, fewer for wide models (DeepSeek-V3's
    61 x 256 experts gets none, Qwen3-MoE's 48 x 128 one), so the counts stay bounded."""
    per_distance = max(1, num_layers * num_experts * num_experts)
    return max(0, min(wanted, num_layers - 1, MAX_PAIR_CELLS // per_distance))


def cross_distance(num_layers: int, num_experts: int, pair_dist: int, wanted: int = CROSS_DISTANCE) -> int:
    """Layers back for the cross-token predictor: up to `wanted` and the pair distance (its features'
    correlations are those pairs), -1 (none) when its (X + 2) x L x E x E counts would be too large."""
    per_distance = max(1, num_layers * num_experts * num_experts)
    x = min(wanted, pair_dist, MAX_PAIR_CELLS // per_distance - 2)
    return x if x >= 0 else -1


@dataclass
class RoutingStats:
    """Token-level statistics of recorded routing, for the `trace` policy's predictions."""

    reuse: list[list[float]]  # [L][E] P(used again by the next token | used now)
    follow: dict[tuple[int, int], list[list[float]]]  # (l, m), l < m: [E][E] P(f at m | e at l), same token
    # [L][k * E + e][f]: weight of e at layer l - k of a token for P(f at l, next token); last row:
    # intercept (`cross_weights`); None without enough counts.
    cross: list[np.ndarray] | None = None


def routing_statistics(trace: Trace, shrink: float = 20.0, max_distance: int | None = None) -> RoutingStats:
    """The statistics of a whole trace (the evaluation's folds, tests): the same counts and the same
    solver as the run-time library's (`RoutingCounts.stats`), with the same bound on the pair distance
    unless `max_distance` is given (8 for gpt-oss's 24 x 32; none for DeepSeek-V3's width)."""
    return RoutingCounts.from_trace(trace, max_distance=max_distance).stats(shrink)


class RoutingCounts:
    """Counts of routing events; `add(experts, seq_offsets)` accumulates token-level routing."""

    def __init__(self, num_layers: int, num_experts: int, max_distance: int | None = None) -> None:
        L, E = num_layers, num_experts
        D = pair_distance(L, E) if max_distance is None else max(0, min(max_distance, L - 1))
        self.num_layers, self.num_experts, self.max_distance = L, E, D
        self.tokens = 0
        self.uses = np.zeros((L, E))  # tokens routed to e at l
        self.reuses = np.zeros((L, E))  # ... and to e at l again at the next token of the request
        self.with_next = np.zeros((L, E))  # uses at a token that has a next token in its request
        self.pairs = np.zeros((D, L, E, E))  # [d-1, l, e, f]: e at l and f at l + d, same token
        X = cross_distance(L, E, D)
        self.cross_distance = X
        self.cross_tokens = 0  # tokens counted in the three arrays below (0 in older library files)
        n = L if X >= 0 else 0
        self.same = np.zeros((n, E, E))  # [l, e, f]: e and f both at l, same token (diagonal: uses)
        self.next_pairs = np.zeros((X + 1, n, E, E))  # [k, l, e, f]: e at l - k, f at l of the next token
        self.with_prev = np.zeros((n, E))  # uses at a token that has a previous token in its request

    def __bool__(self) -> bool:
        return self.tokens > 0

    def add(self, experts: np.ndarray, seq_offsets: Sequence[int] | None = None) -> None:
        """Accumulate routing `experts` [T, L, K] (ids, -1 for none); `seq_offsets` [S + 1] split it
        into requests (default: one request)."""
        x = np.asarray(experts, dtype=np.int64)
        L, E = self.num_layers, self.num_experts
        if x.ndim != 3 or x.shape[1] != L:
            raise InvalidTrace(f"routing of shape {list(x.shape)} does not match [T, {L}, K]")
        if x.size and int(x.max()) >= E:
            raise InvalidTrace(f"routing names expert {int(x.max())}, the model has {E}")
        T = x.shape[0]
        if T == 0:
            return
        offsets = np.asarray(seq_offsets if seq_offsets is not None else [0, T], dtype=np.int64)
        onehot = np.zeros((T, L, E + 1), dtype=np.int8)  # column E collects the -1 padding
        np.put_along_axis(onehot, np.where(x >= 0, x, E), 1, axis=2)
        onehot = onehot[:, :, :E]  # [T, L, E]
        last = np.zeros(T, dtype=bool)  # the last token of each request has no next token
        last[offsets[1:] - 1] = True
        self.tokens += T
        self.uses += onehot.sum(axis=0)
        self.with_next += onehot[~last].sum(axis=0)
        self.reuses += (onehot[:-1] & onehot[1:])[~last[:-1]].sum(axis=0)
        if self.cross_distance >= 0:
            self.cross_tokens += T
            first = np.zeros(T, dtype=bool)
            first[offsets[:-1]] = True
            self.with_prev += onehot[~first].sum(axis=0)
        # Pair counts as products of one-hot blocks (float32 sums of 0/1 stay exact below 2^24; each
        # block has CHUNK tokens at most): one matrix product per layer instead of a bincount per pair.
        for s in range(0, T if self.max_distance or self.cross_distance >= 0 else 0, CHUNK):
            self._add_same_token(onehot[s : s + CHUNK].astype(np.float32))
        if self.cross_distance >= 0:
            with_next = np.nonzero(~last[:-1])[0]  # token t has a next token t + 1 in its request
            for s in range(0, len(with_next), CHUNK):
                t = with_next[s : s + CHUNK]
                self._add_next_token(onehot[t].astype(np.float32), onehot[t + 1].astype(np.float32))

    def _add_same_token(self, x: np.ndarray) -> None:
        """x [C, L, E] one-hot routing of C tokens: pairs (e at l, f at l + d) and, with the cross-token
        counts, `same` (e and f both at l)."""
        L, E, D = self.num_layers, self.num_experts, self.max_distance
        for lo in range(L):
            d = min(D, L - 1 - lo)
            a = x[:, lo]  # [C, E]
            if d:
                ahead = a.T @ x[:, lo + 1 : lo + 1 + d].reshape(len(x), d * E)  # [E, d * E]
                self.pairs[:d, lo] += ahead.reshape(E, d, E).transpose(1, 0, 2)
            if self.cross_distance >= 0:
                self.same[lo] += a.T @ a

    def _add_next_token(self, a: np.ndarray, b: np.ndarray) -> None:
        """a, b [N, L, E]: tokens and their next ones; next_pairs[k, l] += (e at l - k in a, f at l in b)."""
        L, E, X = self.num_layers, self.num_experts, self.cross_distance
        for lo in range(L):
            k = min(X, lo)
            window = a[:, lo - k : lo + 1].reshape(len(a), (k + 1) * E)  # layers lo - k .. lo
            block = (window.T @ b[:, lo]).reshape(k + 1, E, E)  # [j, e, f]: e at lo - k + j
            self.next_pairs[: k + 1, lo] += block[::-1]  # j = k - (distance back)

    def merge(self, other: RoutingCounts) -> None:
        if (other.num_layers, other.num_experts, other.max_distance, other.cross_distance) != (
            self.num_layers,
            self.num_experts,
            self.max_distance,
            self.cross_distance,
        ):
            raise InvalidTrace("routing counts of another shape cannot be merged")
        for key in KEYS + CROSS_KEYS:
            setattr(self, key, getattr(self, key) + getattr(other, key))

    def stats(self, shrink: float = 20.0):
        """The `trace` policy's statistics (`RoutingStats`): next-token reuse per expert,
        shrunk towards its layer's mean by `shrink` uses (rare experts keep the layer's value), and
        P(f at layer m | e at layer l) of the same token, shrunk towards f's rate at m by `shrink`."""
        layer_mean = self.reuses.sum(axis=1, keepdims=True) / np.maximum(
            self.with_next.sum(axis=1, keepdims=True), 1
        )  # [L, 1]
        reuse = (self.reuses + shrink * layer_mean) / np.maximum(self.with_next + shrink, 1e-12)  # [L, E]
        rate = self.uses / max(self.tokens, 1)  # [L, E]
        follow = {}
        for d in range(1, self.max_distance + 1):
            for lo in range(self.num_layers - d):
                hi = lo + d
                p = (self.pairs[d - 1, lo] + shrink * rate[hi][None, :]) / np.maximum(
                    self.uses[lo][:, None] + shrink, 1e-12
                )  # [E, E]
                follow[lo, hi] = p.tolist()
        cross = None
        if self.cross_distance >= 0 and self.cross_tokens == self.tokens:  # all tokens counted
            args = (self.uses, self.same, self.pairs, self.with_prev, self.next_pairs)
            cross = cross_weights(self.tokens, *args)
        return RoutingStats(reuse=reuse.tolist(), follow=follow, cross=cross)

    @classmethod
    def from_trace(cls, trace, max_distance: int | None = None) -> RoutingCounts:
        """The counts of a whole `runtime.trace.Trace` (its requests kept apart)."""
        counts = cls(trace.num_layers, trace.num_experts, max_distance)
        counts.add(trace.experts, trace.seq_offsets)
        return counts

    # --- persistence: arrays stored beside the library's own in one .npz ---------------------------

    def to_arrays(self, prefix: str = "routing_") -> dict[str, np.ndarray]:
        return {prefix + key: np.asarray(getattr(self, key)) for key in KEYS + CROSS_KEYS}

    @classmethod
    def from_arrays(cls, data: Mapping[str, np.ndarray], prefix: str = "routing_") -> RoutingCounts | None:
        """Counts saved by `to_arrays`, or None when `data` has none or lacks the cross-token counts
        (an older library file): counting then starts afresh, so that the cross-token predictor, which
        needs every counted token in all arrays, comes back once new requests are counted."""
        if prefix + "pairs" not in data or prefix + "next_pairs" not in data:
            return None
        pairs = np.asarray(data[prefix + "pairs"], dtype=np.float64)
        if pairs.ndim != 4 or pairs.shape[2] != pairs.shape[3]:
            raise InvalidTrace(f"routing pair counts of shape {list(pairs.shape)}")
        D, L, E, _ = pairs.shape
        counts = cls(L, E, D)
        counts.tokens = int(np.asarray(data[prefix + "tokens"]))
        for key in ("uses", "reuses", "with_next"):
            value = np.asarray(data[prefix + key], dtype=np.float64)
            if value.shape != (L, E):
                raise InvalidTrace(f"routing {key} of shape {list(value.shape)}, expected [{L}, {E}]")
            setattr(counts, key, value)
        counts.pairs = pairs
        counts.cross_tokens = int(np.asarray(data[prefix + "cross_tokens"]))
        for key in ("same", "next_pairs", "with_prev"):
            value = np.asarray(data[prefix + key], dtype=np.float64)
            if value.shape != getattr(counts, key).shape:
                raise InvalidTrace(f"routing {key} of shape {list(value.shape)}")
            setattr(counts, key, value)
        return counts


def cross_weights(
    tokens: int,
    uses: np.ndarray,
    same: np.ndarray,
    pairs: np.ndarray,
    with_prev: np.ndarray,
    next_pairs: np.ndarray,
    ridge: float = CROSS_RIDGE,
    min_tokens: int = CROSS_MIN_TOKENS,
) -> list[np.ndarray] | None:
    """The cross-token predictor: for each layer l a linear model (ridge regression, solved from the
    counts) of P(f is routed at layer l by the next token) from the one-hot routing of this token at
    layers l, l - 1, ..., l - X. Table [l][k * E + e, f] (numpy) = weight of (e at l - k); row (X + 1) * E is
    the intercept. None with fewer than `min_tokens` tokens. The normal equations take the features'
    products over all tokens and their products with the next token over tokens that have one (the
    last token of each request apart, the same population)."""
    if tokens < min_tokens:
        return None
    X = next_pairs.shape[0] - 1
    L, E = uses.shape
    F = (X + 1) * E + 1
    out = []
    for m in range(L):  # the predicted layer
        G = np.zeros((F, F))
        Y = np.zeros((F, E))
        G[-1, -1] = tokens
        Y[-1] = with_prev[m]
        for k in range(min(X, m) + 1):
            a = m - k
            rk = slice(k * E, (k + 1) * E)
            G[rk, rk] = same[a]
            G[rk, -1] = G[-1, rk] = uses[a]
            Y[rk] = next_pairs[k, m]
            for j in range(k):  # layer m - j is after a = m - k: pairs[k - j - 1, a] is [e at a, f at m - j]
                rj = slice(j * E, (j + 1) * E)
                G[rk, rj] = pairs[k - j - 1, a]
                G[rj, rk] = pairs[k - j - 1, a].T
        G[np.arange(F - 1), np.arange(F - 1)] += ridge  # the intercept is not penalised
        out.append(np.linalg.solve(G, Y))
    return out
