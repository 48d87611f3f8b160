"""Token-level routing counts kept with a model's trace library: what the `trace` policy's reuse and
cross-layer statistics (`trace_policy.RoutingStats`) are computed from.

Counts, not ratios, so that requests recorded at run time, traces imported from files and library
files merge by addition: per (layer, expert) uses, next-token reuses within a request and uses
that have a next token; per layer distance d (1..max_distance) the same-token pairs (e at layer l,
f at layer l + d). Fixed size (L x E and D x L x E x E, D bounded by `pair_distance`), whatever the
number of requests. Layers are the model's layer indices (a dense layer's rows stay zero). numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from moeinf.errors import InvalidTrace

MAX_DISTANCE = 8  # layers ahead for same-token pairs (precision falls slowly with distance on gpt-oss)
MAX_PAIR_CELLS = 1 << 20  # D x L x E x E: 8 MB of counts, and the policy's tables stay small in Python
KEYS = ("tokens", "uses", "reuses", "with_next", "pairs")


def pair_distance(num_layers: int, num_experts: int, wanted: int = MAX_DISTANCE) -> int:
    """Layers ahead to count same-token pairs for: up to `wanted`, fewer for wide models (DeepSeek-V3's
    61 x 256 experts gets none, Qwen3-MoE's 48 x 128 one), so the counts stay bounded."""
    per_distance = max(1, num_layers * num_experts * num_experts)
    return max(0, min(wanted, num_layers - 1, MAX_PAIR_CELLS // per_distance))


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
        for d in range(1, self.max_distance + 1):
            for lo in range(L - d):
                a, b = x[:, lo, :], x[:, lo + d, :]  # [T, K] each
                ok = (a[:, :, None] >= 0) & (b[:, None, :] >= 0)
                pairs = (a[:, :, None] * E + b[:, None, :])[ok]
                self.pairs[d - 1, lo] += np.bincount(pairs, minlength=E * E).reshape(E, E)

    def merge(self, other: RoutingCounts) -> None:
        if (other.num_layers, other.num_experts, other.max_distance) != (
            self.num_layers,
            self.num_experts,
            self.max_distance,
        ):
            raise InvalidTrace("routing counts of another shape cannot be merged")
        for key in KEYS:
            setattr(self, key, getattr(self, key) + getattr(other, key))

    def stats(self, shrink: float = 20.0):
        """The `trace` policy's statistics (`trace_policy.RoutingStats`): next-token reuse per expert,
        shrunk towards its layer's mean by `shrink` uses (rare experts keep the layer's value), and
        P(f at layer m | e at layer l) of the same token, shrunk towards f's rate at m by `shrink`."""
        from moeinf.runtime.trace_policy import RoutingStats

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
        return RoutingStats(reuse=reuse.tolist(), follow=follow)

    @classmethod
    def from_trace(cls, trace, max_distance: int | None = None) -> RoutingCounts:
        """The counts of a whole `runtime.trace.Trace` (its requests kept apart)."""
        counts = cls(trace.num_layers, trace.num_experts, max_distance)
        counts.add(trace.experts, trace.seq_offsets)
        return counts

    # --- persistence: arrays stored beside the library's own in one .npz ---------------------------

    def to_arrays(self, prefix: str = "routing_") -> dict[str, np.ndarray]:
        return {prefix + key: np.asarray(getattr(self, key)) for key in KEYS}

    @classmethod
    def from_arrays(cls, data: Mapping[str, np.ndarray], prefix: str = "routing_") -> RoutingCounts | None:
        """Counts saved by `to_arrays`, or None when `data` has none (an older library file)."""
        if prefix + "pairs" not in data:
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
        return counts
