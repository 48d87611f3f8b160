"""Routing traces: the `.npz` file format, its validation, and per-request expert activation matrices.

A trace holds, per decoded token and layer, the routed expert ids (`experts [T, L, K]`, -1 where a
token has no routed layer), optional router weights (`probs [T, L, K]`), request boundaries
(`seq_offsets [S+1]`) and a JSON `meta` string with at least num_layers, num_experts and top_k.
routing_hooks.RoutingRecorder builds one from routing as it happens (run/bench); the simulator,
the trace library and routing replay read it. numpy only.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeinf.errors import InvalidTrace

REQUIRED_META = ("num_layers", "num_experts", "top_k")
PER_REQUEST_META = ("sequences", "prefill_tokens")  # meta lists with one item per request


@dataclass
class Trace:
    """A validated routing trace; see the module docstring for the fields."""

    experts: np.ndarray  # [T, L, K] int16, -1 = no routed expert
    seq_offsets: np.ndarray  # [S+1] int64, 0 ... T
    meta: dict = field(default_factory=dict)
    probs: np.ndarray | None = None  # [T, L, K] float32

    def __post_init__(self) -> None:
        validate(self)

    @property
    def num_layers(self) -> int:
        return int(self.meta["num_layers"])

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_requests(self) -> int:
        return len(self.seq_offsets) - 1

    def request_slice(self, i: int) -> slice:
        return slice(int(self.seq_offsets[i]), int(self.seq_offsets[i + 1]))

    def eam(self, i: int) -> np.ndarray:
        """Expert activation matrix [L, E] of request `i`: tokens routed to each expert."""
        return eam(self.experts[self.request_slice(i)], self.num_experts)

    def select(self, requests: list[int] | np.ndarray) -> Trace:
        """A new trace holding the given requests, in the given order."""
        idx = [int(i) for i in requests]
        parts = [self.experts[self.request_slice(i)] for i in idx]
        lengths = [len(p) for p in parts]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(lengths)
        L, K = self.experts.shape[1:]
        experts = np.concatenate(parts) if parts else np.zeros((0, L, K), np.int16)
        probs = None
        if self.probs is not None:
            pp = [self.probs[self.request_slice(i)] for i in idx]
            probs = np.concatenate(pp) if pp else np.zeros((0, L, K), np.float32)
        meta = dict(self.meta)
        for key in PER_REQUEST_META:
            if isinstance(meta.get(key), list) and len(meta[key]) == self.num_requests:
                meta[key] = [meta[key][i] for i in idx]
        return Trace(experts, offsets, meta, probs)

    def decode_only(self) -> Trace:
        """The trace without each request's prompt tokens, where meta `prefill_tokens` (written by
        `moeinf run --record-trace`) says how many there are; requests left empty are dropped."""
        prefill = self.meta.get("prefill_tokens")
        if not isinstance(prefill, list) or len(prefill) != self.num_requests:
            return self
        keep = np.ones(self.num_tokens, dtype=bool)
        lengths = []
        for i, n in enumerate(prefill):
            part = self.request_slice(i)
            n = min(int(n), part.stop - part.start)
            keep[part.start : part.start + n] = False
            lengths.append(part.stop - part.start - n)
        kept = [i for i, n in enumerate(lengths) if n]
        offsets = np.concatenate([[0], np.cumsum([lengths[i] for i in kept])]).astype(np.int64)
        meta = {k: v for k, v in self.meta.items() if k != "prefill_tokens"}
        for key in PER_REQUEST_META:  # the others stay aligned with the requests kept
            if isinstance(meta.get(key), list) and len(meta[key]) == self.num_requests:
                meta[key] = [meta[key][i] for i in kept]
        probs = self.probs[keep] if self.probs is not None else None
        return Trace(self.experts[keep], offsets, meta, probs)


def concat_traces(traces: Sequence[Trace]) -> Trace:
    """One trace with the requests of `traces` in order (e.g. a server's rotated files). All must have
    the same layers x experts x top-k; weights are kept when every part has them; per-request meta
    lists are kept when every part has them, other meta comes from the first part."""
    if len(traces) == 1:
        return traces[0]
    first = traces[0]
    shape = (first.num_layers, first.num_experts, first.top_k)
    for t in traces[1:]:
        if (t.num_layers, t.num_experts, t.top_k) != shape:
            raise InvalidTrace(
                f"traces of different shapes cannot be joined: {shape} and "
                f"{(t.num_layers, t.num_experts, t.top_k)} (layers, experts, top-k)"
            )
    offsets = [np.asarray([0], dtype=np.int64)]
    base = 0
    for t in traces:
        offsets.append(t.seq_offsets[1:] + base)
        base += t.num_tokens
    meta = dict(first.meta)
    for key in PER_REQUEST_META:
        parts = [t.meta.get(key) for t in traces]
        if all(isinstance(p, list) and len(p) == t.num_requests for p, t in zip(parts, traces, strict=True)):
            meta[key] = [item for p in parts for item in p]
        else:
            meta.pop(key, None)
    probs = None
    if all(t.probs is not None for t in traces):
        probs = np.concatenate([t.probs for t in traces])
    return Trace(np.concatenate([t.experts for t in traces]), np.concatenate(offsets), meta, probs)


def eam(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Expert activation matrix [L, E] (int64 counts) of a token block `experts [T, L, K]`."""
    T, L, K = experts.shape
    flat = experts.reshape(T, L * K).astype(np.int64)
    layer = np.repeat(np.arange(L, dtype=np.int64), K)  # [L*K]
    valid = flat >= 0  # [T, L*K]
    index = (layer[None, :] * num_experts + flat)[valid]
    return np.bincount(index, minlength=L * num_experts).reshape(L, num_experts)


def validate(trace: Trace) -> None:
    """Raise InvalidTrace unless the arrays and meta are consistent."""
    for key in REQUIRED_META:
        value = trace.meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidTrace(f"trace meta needs a positive integer {key!r} (got {value!r})")
    x = trace.experts
    if x.ndim != 3 or x.shape[1:] != (trace.num_layers, trace.top_k):
        raise InvalidTrace(
            f"trace experts must be [T, {trace.num_layers}, {trace.top_k}] (num_layers, top_k); "
            f"got {list(x.shape)}"
        )
    if not np.issubdtype(x.dtype, np.integer):
        raise InvalidTrace(f"trace experts must be integers (got {x.dtype})")
    if x.size and (x.min() < -1 or x.max() >= trace.num_experts):
        raise InvalidTrace(f"trace expert ids must be -1 or in [0, {trace.num_experts})")
    off = trace.seq_offsets
    if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != len(x) or np.any(np.diff(off) < 0):
        raise InvalidTrace("trace seq_offsets must rise from 0 to the number of tokens")
    if trace.probs is not None and trace.probs.shape != x.shape:
        raise InvalidTrace(f"trace probs must have the shape of experts {list(x.shape)}")
    # A layer of a token routes to distinct experts; a duplicate would be fetched once, counted twice.
    if x.size:
        s = np.sort(x, axis=2)
        if np.any((s[:, :, 1:] == s[:, :, :-1]) & (s[:, :, 1:] >= 0)):
            raise InvalidTrace("trace has a token whose layer lists the same expert twice")


def read_trace(path: str | Path) -> Trace:
    """Load and validate a trace file."""
    path = Path(path)
    if path.is_file() and not zipfile.is_zipfile(path):  # numpy would call it pickled data
        raise InvalidTrace(f"{path}: not a routing trace (the trace format is an .npz archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            files = set(data.files)
            missing = {"experts", "seq_offsets", "meta"} - files
            if missing:
                raise InvalidTrace(f"{path}: not a routing trace (missing {', '.join(sorted(missing))})")
            experts = data["experts"].astype(np.int16)
            offsets = data["seq_offsets"].astype(np.int64)
            meta_raw = str(data["meta"])
            probs = data["probs"].astype(np.float32) if "probs" in files else None
    except (OSError, ValueError) as e:
        raise InvalidTrace(f"{path}: cannot read trace ({e})") from None
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError:
        raise InvalidTrace(f"{path}: trace meta is not JSON") from None
    if not isinstance(meta, dict):
        raise InvalidTrace(f"{path}: trace meta must be a JSON object")
    return Trace(experts, offsets, meta, probs)


def write_trace(trace: Trace, path: str | Path) -> Path:
    """Write a trace (compressed), atomically: a reader never sees a half-written file."""
    validate(trace)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "experts": trace.experts.astype(np.int8 if trace.num_experts <= 127 else np.int16),
        "seq_offsets": trace.seq_offsets.astype(np.int64),
        "meta": np.array(json.dumps(trace.meta)),
    }
    if trace.probs is not None:
        arrays["probs"] = trace.probs.astype(np.float16)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    tmp.replace(path)
    return path


def make_trace(
    requests: list[np.ndarray], *, num_experts: int, probs: list[np.ndarray] | None = None, **meta
) -> Trace:
    """Build a trace from per-request `[T_i, L, K]` arrays."""
    if not requests:
        raise InvalidTrace("a trace needs at least one request")
    L, K = requests[0].shape[1:]
    offsets = np.zeros(len(requests) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in requests])
    full = {"num_layers": int(L), "num_experts": int(num_experts), "top_k": int(K), **meta}
    p = np.concatenate(probs).astype(np.float32) if probs is not None else None
    return Trace(np.concatenate(requests).astype(np.int16), offsets, full, p)


def routing_array(steps: Sequence[tuple[int, Sequence[int]]], num_layers: int, top_k: int) -> np.ndarray:
    """(layer, experts) steps in call order -> [T, num_layers, top_k] ids (-1 where none): a new token
    starts whenever the layer does not increase (each token sweeps the MoE layers in order)."""
    tokens: list[dict[int, Sequence[int]]] = []
    previous = None
    for layer, experts in steps:
        if previous is None or layer <= previous:
            tokens.append({})
        tokens[-1][layer] = experts
        previous = layer
    out = np.full((len(tokens), num_layers, top_k), -1, dtype=np.int16)
    for t, layers in enumerate(tokens):
        for layer, experts in layers.items():
            out[t, layer, : len(experts)] = experts[:top_k]
    return out
