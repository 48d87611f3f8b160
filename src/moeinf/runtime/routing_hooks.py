"""Routing hooks: see or replace the router's choices in every MoE layer of the decoder.

The MoE block calls `hook.on_route(moe_index, weights, ids)` right after `route()` and uses what it
returns. `RoutingRecorder` keeps the choices of each request (the trace and its expert activation
matrix); `RoutingReplay` forces choices read from a trace file, so a random-weight model of any size
reproduces a real model's expert access pattern; `TraceFileRecorder` writes what it records to a
trace file after every request (`moeinf run --record-trace`). T tokens, K top-k, L routed layers.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from moeinf.errors import DiskFull, InvalidTrace, MoeinfError
from moeinf.runtime.trace import Trace, make_trace, write_trace


class RoutingHook(Protocol):
    replaces_routing: bool  # True: the model's own router no longer decides (replay)

    def on_route(
        self, moe_index: int, weights: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """weights, ids: [T, K] for the `moe_index`-th MoE layer of this forward; returns what to use."""
        ...


class RoutingRecorder:
    """Records ids (and weights) per token and MoE layer; one trace entry per request."""

    replaces_routing = False

    def __init__(self, num_moe_layers: int, num_experts: int, top_k: int) -> None:
        self.num_moe_layers, self.num_experts, self.top_k = num_moe_layers, num_experts, top_k
        self._ids: list[list[np.ndarray]] = [[] for _ in range(num_moe_layers)]  # per layer: [T_i, K] blocks
        self._weights: list[list[np.ndarray]] = [[] for _ in range(num_moe_layers)]
        self.requests: list[np.ndarray] = []  # finished requests: [T, L, K]
        self.request_probs: list[np.ndarray] = []

    def on_route(
        self, moe_index: int, weights: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._ids[moe_index].append(ids.to("cpu", torch.int16).numpy())
        self._weights[moe_index].append(weights.to("cpu", torch.float32).numpy())
        return weights, ids

    def current(self) -> np.ndarray:
        """The routing of the request so far: [T, L, K] (T = tokens the decoder processed)."""
        if not self._ids[0]:
            return np.zeros((0, self.num_moe_layers, self.top_k), np.int16)
        return np.stack([np.concatenate(blocks) for blocks in self._ids], axis=1)

    def current_eam(self) -> np.ndarray:
        """Expert activation matrix [L, E] of the request so far."""
        from moeinf.runtime.trace import eam

        return eam(self.current(), self.num_experts)

    def end_request(self) -> np.ndarray | None:
        """Close the current request; returns its [T, L, K] routing (None if it routed nothing)."""
        routing = self.current()
        probs = np.stack([np.concatenate(b) for b in self._weights], axis=1) if self._weights[0] else None
        self._ids = [[] for _ in range(self.num_moe_layers)]
        self._weights = [[] for _ in range(self.num_moe_layers)]
        if len(routing) == 0:
            return None
        self.requests.append(routing)
        self.request_probs.append(probs)
        return routing

    def trace(self, **meta) -> Trace:
        """All finished requests as one trace (the format of runtime/trace.py)."""
        return make_trace(self.requests, num_experts=self.num_experts, probs=self.request_probs, **meta)


class TraceFileRecorder(RoutingRecorder):
    """A `RoutingRecorder` that is also told of request boundaries (`Engine.request_listeners`) and
    rewrites `path` after every request with all requests so far: every token the model processed,
    prompt and generated, with the router's weights; meta `prefill_tokens` gives each request's prompt
    part: the tokens generation says it prefilled (`prompt_done`; a long prompt runs in several
    forwards of `PREFILL_CHUNK` tokens), else its first forward. Written atomically: an interrupted
    run leaves the last complete file. With `rotate_bytes` (a server), once the file's routing reaches
    that size it is left complete and the next requests go to `<stem>-2.npz`, `-3`...: memory and the
    rewrite per request stay bounded."""

    def __init__(
        self,
        path,
        num_moe_layers: int,
        num_experts: int,
        top_k: int,
        *,
        on_error: Callable[[MoeinfError], None] | None = None,
        rotate_bytes: int | None = None,
        **meta,
    ) -> None:
        super().__init__(num_moe_layers, num_experts, top_k)
        self.path = self.first_path = Path(path).expanduser()
        self.meta = meta
        self.on_error = on_error  # a write that fails goes there (a server logs it), else it is raised
        # int16 ids and float32 weights per token, layer and choice
        self._rotate_tokens = (
            None if rotate_bytes is None else max(1, rotate_bytes // (num_moe_layers * top_k * 6))
        )
        self._part = 1
        self.prefill_tokens: list[int] = []
        self._first = 0  # tokens of the request's first forward
        self._prompt: int | None = None  # tokens prefilled, as told by `prompt_done`

    def on_route(
        self, moe_index: int, weights: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if moe_index == 0 and not self._ids[0]:
            self._first = ids.shape[0]
        return super().on_route(moe_index, weights, ids)

    def prompt_done(self, tokens: int) -> None:
        """The request's prompt is in: `tokens` were run through the model (a reused prefix is not)."""
        self._prompt = tokens

    def start_request(self) -> None:
        pass

    def end_request(self) -> np.ndarray | None:
        routing = super().end_request()
        prompt, self._prompt = self._prompt, None
        if routing is not None:
            self.prefill_tokens.append(self._first if prompt is None else prompt)
            try:
                write_trace(self.trace(**self.meta, prefill_tokens=self.prefill_tokens), self.path)
            except OSError as e:
                kind = DiskFull if e.errno == errno.ENOSPC else MoeinfError
                error = kind(f"cannot write the routing trace {self.path}: {e.strerror}")
                if self.on_error is None:
                    raise error from None
                self.on_error(error)
            if self._rotate_tokens is not None and sum(map(len, self.requests)) >= self._rotate_tokens:
                self._part += 1
                first = self.first_path
                self.path = first.with_name(f"{first.stem}-{self._part}{first.suffix}")
                self.requests.clear()
                self.request_probs.clear()
                self.prefill_tokens.clear()
        return routing


class RoutingReplay:
    """Replaces the router's choices with a trace's, token after token, wrapping at the trace's end.

    A trace of L layers matches a model whose number of MoE layers is L; experts and top-k must match.
    Without recorded weights each chosen expert gets weight 1/K.
    """

    replaces_routing = True

    def __init__(self, trace: Trace, *, num_moe_layers: int, num_experts: int, top_k: int) -> None:
        got = (trace.num_layers, trace.num_experts, trace.top_k)
        want = (num_moe_layers, num_experts, top_k)
        if got != want:
            raise InvalidTrace(
                f"routing trace is {got[0]} layers x {got[1]} experts, top-{got[2]}; this model has "
                f"{want[0]} MoE layers x {want[1]} experts, top-{want[2]}"
            )
        if (trace.experts < 0).any():
            raise InvalidTrace("routing replay needs every token routed in every layer (no -1 ids)")
        self.ids = torch.from_numpy(trace.experts.astype(np.int64))  # [N, L, K]
        if trace.probs is not None:
            self.weights = torch.from_numpy(trace.probs.astype(np.float32))  # [N, L, K]
        else:
            self.weights = torch.full(self.ids.shape, 1.0 / top_k)
        self.cursor = 0
        self._rows: torch.Tensor | None = None

    def seek(self, token: int) -> None:
        self.cursor = token % len(self.ids)

    def on_route(
        self, moe_index: int, weights: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if moe_index == 0:  # a new forward: take the next T trace tokens
            n = len(self.ids)
            self._rows = (torch.arange(ids.shape[0]) + self.cursor) % n  # [T]
            self.cursor = (self.cursor + ids.shape[0]) % n
        rows = self._rows
        assert rows is not None
        new_ids = self.ids[rows, moe_index].to(ids.device)  # [T, K]
        new_weights = self.weights[rows, moe_index].to(device=weights.device, dtype=weights.dtype)
        return new_weights, new_ids


class HookChain:
    """Several hooks in order (replay first, then the recorder sees what was used)."""

    def __init__(self, hooks: Sequence[RoutingHook]) -> None:
        self.hooks = list(hooks)
        self.replaces_routing = any(h.replaces_routing for h in self.hooks)

    def on_route(
        self, moe_index: int, weights: torch.Tensor, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for hook in self.hooks:
            weights, ids = hook.on_route(moe_index, weights, ids)
        return weights, ids
