"""The per-model trace library: a bounded set of expert activation matrices (EAMs), persisted.

Each entry is an EAM `[L, E]` (tokens routed to each expert) of one finished request, or of several
similar requests merged, with the number of tokens and requests it stands for. The library lives in
`<model dir>/traces/library.npz`, is loaded at start and rewritten atomically after each change.

Bounds: at most `max_entries` entries and `max_bytes` of EAM data. Rule that keeps it representative
when full (deterministic, tested): compare requests by the cosine similarity of their per-layer
normalised rows (each layer's row scaled to sum 1, layers concatenated: every layer weighs the same,
long and short requests compare by mix, not size).
  1. A new EAM at least `merge_similarity` close to a stored entry is merged into it (counts added):
     a near-duplicate adds weight, not an entry.
  2. Otherwise it is appended; while the library is over a bound, the most similar pair of entries
     (the most redundant information) is merged into one.
So distinct kinds of requests keep their own entries, frequent kinds gain weight, and a burst of
similar requests cannot push rare ones out.

Beside the EAMs, `routing` holds token-level routing counts (runtime/routing_counts.py: per-expert
next-token reuse, same-token cross-layer pairs) of every request added with its routing; they are
fixed-size sums, so they need no bound. numpy only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from moeinf.errors import InvalidTrace
from moeinf.runtime.expert_key import ExpertKey
from moeinf.runtime.policy import LruPolicy
from moeinf.runtime.routing_counts import RoutingCounts
from moeinf.runtime.trace import Trace

FILE_NAME = "library.npz"
FORMAT_VERSION = 1


def normalised_rows(eams: np.ndarray) -> np.ndarray:
    """[N, L, E] counts -> [N, L*E] unit vectors of per-layer normalised rows (zero rows stay zero)."""
    x = eams.astype(np.float64)
    rows = x / np.maximum(x.sum(axis=-1, keepdims=True), 1e-12)  # each layer sums to 1
    flat = rows.reshape(len(x), -1)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


class TraceLibrary:
    """See the module docstring. `directory=None` keeps it in memory only (simulator, tests)."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        *,
        directory: str | Path | None = None,
        max_entries: int = 256,
        max_bytes: int = 16 << 20,
        merge_similarity: float = 0.98,
        match_top: int = 4,
    ) -> None:
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.directory = Path(directory) if directory is not None else None
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.merge_similarity = merge_similarity
        self.match_top = match_top
        self.eams = np.zeros((0, num_layers, num_experts), dtype=np.float32)  # [N, L, E] counts
        self.tokens = np.zeros(0, dtype=np.int64)  # [N] tokens each entry stands for
        self.requests = np.zeros(0, dtype=np.int64)  # [N] requests merged into each entry
        self.updated = np.zeros(0, dtype=np.float64)  # [N] unix time of the last change
        self._unit: np.ndarray | None = None  # cached normalised_rows(self.eams)
        self._gram: np.ndarray | None = None  # cached [N, N] similarities of entries, diagonal -inf
        self.routing = RoutingCounts(num_layers, num_experts)  # token-level counts (add_routing)

    # --- bounds ------------------------------------------------------------------------------------

    @property
    def entry_bytes(self) -> int:
        return self.num_layers * self.num_experts * 4

    @property
    def capacity(self) -> int:
        """Entries allowed by both bounds (at least one)."""
        return max(1, min(self.max_entries, self.max_bytes // self.entry_bytes))

    def __len__(self) -> int:
        return len(self.eams)

    @property
    def nbytes(self) -> int:
        return int(self.eams.nbytes)

    # --- persistence -------------------------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        return self.directory / FILE_NAME if self.directory is not None else None

    @classmethod
    def open(
        cls, directory: str | Path, num_layers: int, num_experts: int, top_k: int, **options
    ) -> TraceLibrary:
        """The library in `directory`, loaded if it exists (a library of another shape is an error)."""
        lib = cls(num_layers, num_experts, top_k, directory=directory, **options)
        if lib.path is not None and lib.path.exists():
            lib._load(lib.path)
        return lib

    @classmethod
    def load_file(cls, path: str | Path, **options) -> TraceLibrary:
        """An in-memory library from a saved library file (as written by `save` / `export`)."""
        meta = _read_meta(Path(path))
        lib = cls(int(meta["num_layers"]), int(meta["num_experts"]), int(meta["top_k"]), **options)
        lib._load(Path(path))
        return lib

    @classmethod
    def from_trace(cls, trace: Trace, **options) -> TraceLibrary:
        """An in-memory library holding the requests of `trace` (added in order, bounds applied)."""
        lib = cls(trace.num_layers, trace.num_experts, trace.top_k, **options)
        for i in range(trace.num_requests):
            lib.add(trace.eam(i), save=False)
        lib.routing.add(trace.experts, trace.seq_offsets)
        return lib

    def _load(self, path: Path) -> None:
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                eams = data["eams"].astype(np.float32)
                tokens = data["tokens"].astype(np.int64)
                requests = data["requests"].astype(np.int64)
                updated = data["updated"].astype(np.float64)
                routing = RoutingCounts.from_arrays(data)
        except (OSError, KeyError, ValueError) as e:
            raise InvalidTrace(f"{path}: cannot read trace library ({e})") from None
        shape = (meta.get("num_layers"), meta.get("num_experts"), meta.get("top_k"))
        if shape != (self.num_layers, self.num_experts, self.top_k) or eams.shape[1:] != shape[:2]:
            raise InvalidTrace(
                f"{path}: trace library is for {shape[0]} layers x {shape[1]} experts, top-{shape[2]}; "
                f"the model has {self.num_layers} x {self.num_experts}, top-{self.top_k} "
                "(`moeinf trace clear` to start over)"
            )
        if not (len(eams) == len(tokens) == len(requests) == len(updated)):
            raise InvalidTrace(f"{path}: trace library arrays disagree in length")
        self.eams, self.tokens, self.requests, self.updated = eams, tokens, requests, updated
        if routing is not None:  # older files have none: start counting now
            if (routing.num_layers, routing.num_experts) != (self.num_layers, self.num_experts):
                raise InvalidTrace(f"{path}: routing counts do not match the library's shape")
            self.routing = routing
        self._unit = self._gram = None
        self._enforce_bounds()

    def save(self, path: str | Path | None = None) -> Path | None:
        """Write the library (atomically) to `path`, default its directory's file; None if in memory."""
        target = Path(path) if path is not None else self.path
        if target is None:
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": "moeinf-trace-library",
            "version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
        }
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                eams=self.eams,
                tokens=self.tokens,
                requests=self.requests,
                updated=self.updated,
                meta=np.array(json.dumps(meta)),
                **self.routing.to_arrays(),
            )
        tmp.replace(target)
        return target

    def clear(self) -> None:
        self.eams = self.eams[:0]
        self.tokens, self.requests, self.updated = self.tokens[:0], self.requests[:0], self.updated[:0]
        self.routing = RoutingCounts(self.num_layers, self.num_experts)
        self._unit = self._gram = None
        if self.path is not None and self.path.exists():
            self.path.unlink()

    # --- adding ------------------------------------------------------------------------------------

    def add(self, eam: np.ndarray, *, tokens: int | None = None, save: bool = True) -> int:
        """Add one request's EAM [L, E]; returns the index of the entry that now holds it."""
        eam = np.asarray(eam, dtype=np.float32)
        if eam.shape != (self.num_layers, self.num_experts):
            raise InvalidTrace(
                f"EAM shape {list(eam.shape)} does not match the library's "
                f"[{self.num_layers}, {self.num_experts}]"
            )
        if eam.sum() <= 0:
            return -1
        if tokens is None:
            tokens = int(round(float(eam.sum(axis=1).max()) / self.top_k))
        now = time.time()
        index = -1
        if len(self):
            sims = self._units() @ normalised_rows(eam[None])[0]  # [N]
            best = int(np.argmax(sims))
            if sims[best] >= self.merge_similarity:
                index = best
                self.eams[best] += eam
                self.tokens[best] += tokens
                self.requests[best] += 1
                self.updated[best] = now
                self._changed(best)
        if index < 0:
            self.eams = np.concatenate([self.eams, eam[None]])
            self.tokens = np.append(self.tokens, tokens)
            self.requests = np.append(self.requests, 1)
            self.updated = np.append(self.updated, now)
            self._appended()
            index = len(self) - 1
            index = self._enforce_bounds(index)
        if save:
            self.save()
        return index

    def add_routing(self, experts: np.ndarray, *, save: bool = True) -> None:
        """Add one request's token-level routing `experts` [T, L, K] (model layer indices, -1 for
        none) to the routing counts; its EAM goes through `add` as before."""
        self.routing.add(experts)
        if save:
            self.save()

    def routing_stats(self, min_tokens: int = 256):
        """The `trace` policy's statistics from the routing counts (`trace_policy.RoutingStats`), or
        None while fewer than `min_tokens` tokens were counted (too few to beat the averages)."""
        return self.routing.stats() if self.routing.tokens >= min_tokens else None

    def _units(self) -> np.ndarray:
        if self._unit is None:
            self._unit = normalised_rows(self.eams)
        return self._unit

    def _similarity_matrix(self) -> np.ndarray:
        """[N, N] cosine similarities between entries, -inf on the diagonal (kept up to date one
        entry at a time: a full product per request cost ~6 ms with 256 entries)."""
        if self._gram is None:
            u = self._units()
            self._gram = u @ u.T
            np.fill_diagonal(self._gram, -np.inf)
        return self._gram

    def _appended(self) -> None:
        """The last entry is new: one unit row and one row and column of similarities more."""
        if self._unit is None or len(self._unit) != len(self) - 1:
            self._unit = self._gram = None
            return
        row = normalised_rows(self.eams[-1:])  # row by row as in the batch: the same values
        self._unit = np.concatenate([self._unit, row])
        if self._gram is not None:
            col = self._unit @ row[0]
            col[-1] = -np.inf
            n = len(self)
            gram = np.empty((n, n))
            gram[:-1, :-1] = self._gram
            gram[-1], gram[:, -1] = col, col
            self._gram = gram

    def _changed(self, i: int) -> None:
        """Entry i's counts changed: its unit row, row and column of similarities."""
        if self._unit is None:
            return
        self._unit[i] = normalised_rows(self.eams[i : i + 1])[0]
        if self._gram is not None:
            col = self._unit @ self._unit[i]
            col[i] = -np.inf
            self._gram[i], self._gram[:, i] = col, col

    def _dropped(self, i: int) -> None:
        if self._unit is not None:
            self._unit = np.delete(self._unit, i, axis=0)
        if self._gram is not None:
            self._gram = np.delete(np.delete(self._gram, i, axis=0), i, axis=1)

    def _enforce_bounds(self, track: int = -1) -> int:
        """Merge the most similar pair until within bounds; returns where entry `track` ended up."""
        while len(self) > self.capacity:
            sims = self._similarity_matrix()
            i, j = np.unravel_index(int(np.argmax(sims)), sims.shape)
            keep, drop = (int(i), int(j)) if i < j else (int(j), int(i))
            self.eams[keep] += self.eams[drop]
            self.tokens[keep] += self.tokens[drop]
            self.requests[keep] += self.requests[drop]
            self.updated[keep] = max(self.updated[keep], self.updated[drop])
            mask = np.arange(len(self)) != drop
            self.eams, self.tokens = self.eams[mask], self.tokens[mask]
            self.requests, self.updated = self.requests[mask], self.updated[mask]
            self._dropped(drop)
            self._changed(keep if keep < drop else keep - 1)
            if track == drop:
                track = keep
            elif track > drop:
                track -= 1
        return track

    # --- prediction --------------------------------------------------------------------------------

    def similarities(self, eam: np.ndarray) -> np.ndarray:
        """Cosine similarity [N] of a (partial) EAM's per-layer normalised rows with every entry."""
        if not len(self):
            return np.zeros(0)
        return self._units() @ normalised_rows(np.asarray(eam, dtype=np.float32)[None])[0]

    def predict(self, eam: np.ndarray | None = None) -> np.ndarray:
        """Expected uses per token [L, E] of each expert: the `match_top` entries most similar to `eam`
        (weighted by similarity), or all entries by their tokens when `eam` is None or empty."""
        L, E = self.num_layers, self.num_experts
        if not len(self):
            return np.full((L, E), self.top_k / E)
        if eam is None or np.asarray(eam).sum() <= 0:
            return (self.eams.sum(axis=0) / max(int(self.tokens.sum()), 1)).astype(np.float64)
        sims = self.similarities(eam)
        top = np.argsort(-sims, kind="stable")[: self.match_top]
        w = np.maximum(sims[top], 1e-6)
        rates = self.eams[top] / np.maximum(self.tokens[top], 1)[:, None, None]  # [match_top, L, E] only
        return np.tensordot(w / w.sum(), rates, axes=1).astype(np.float64)

    def summary(self) -> list[dict]:
        """One dict per entry (for `moeinf trace list/show`)."""
        return [
            {
                "index": i,
                "requests": int(self.requests[i]),
                "tokens": int(self.tokens[i]),
                "updated": float(self.updated[i]),
            }
            for i in range(len(self))
        ]


def _read_meta(path: Path) -> dict:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "eams" not in data.files:
                raise InvalidTrace(f"{path}: not a trace library file")
            return json.loads(str(data["meta"]))
    except (OSError, ValueError) as e:
        raise InvalidTrace(f"{path}: cannot read trace library ({e})") from None


def library_dir(model_path: str | Path) -> Path:
    """Where a stored model's trace library lives: `<model dir>/traces/`."""
    return Path(model_path) / "traces"


def open_model_library(stored_model, **options) -> TraceLibrary:
    """The trace library of a `store.StoredModel` (created empty if absent). Layers are the model's
    layer indices, as in `ExpertKey`."""
    spec = stored_model.spec
    return TraceLibrary.open(
        library_dir(stored_model.path), spec.num_layers, spec.num_experts, spec.top_k, **options
    )


class LibraryRecorder(LruPolicy):
    """`trace` when every expert fits the budget: nothing is ever evicted, so no replacement decision
    is worth the trace policy's per-layer bookkeeping (~10% of a decode step on S1); the library still
    gets each finished request's EAM, as `TracePolicy` would add it. LRU underneath keeps it a valid
    policy should a slot ever be needed (it is not: the budget holds every expert)."""

    name = "trace"

    def __init__(self, library: TraceLibrary, learn: bool = True) -> None:
        super().__init__()
        self.library = library
        self.learn = learn
        self._count: dict[ExpertKey, int] = {}

    def on_request_start(self) -> None:
        self._count.clear()

    def on_access(self, key: ExpertKey, hit: bool) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        super().on_access(key, hit)

    def on_request_end(self) -> None:
        if not (self.learn and self._count):
            return
        eam = np.zeros((self.library.num_layers, self.library.num_experts), dtype=np.int64)
        for (layer, expert), n in self._count.items():
            eam[layer, expert] = n
        self.library.add(eam)
