"""The `trace` policy on its C core (native/moeinf_policy_core.c, loaded by runtime/policy_core.py):
the decisions of `trace_policy.TracePolicy`, ~10x faster, for the runtime and the simulator alike.

`make_trace_policy` returns the native policy when the core loads and the model's shape is known, else
the Python one. The Python class stays the reference: tests/test_policy_core.py replays both side by
side, and they must fetch the same experts in the same order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeinf.runtime.next_use import HAZARD, NEXT_CHECK
from moeinf.runtime.policy import SHAPE_OPTIONS
from moeinf.runtime.policy_core import core_class, core_reason, keytab
from moeinf.runtime.trace_policy import TracePolicy


def native_class() -> type | None:
    """`NativeTracePolicy`, a subclass of the core's TraceCore type (None without the cores)."""
    return core_class("TraceCore", "NativeTracePolicy", _NativeHooks)


class _NativeHooks:
    """The Python half of `NativeTracePolicy`: set-up from a reference `TracePolicy` (one place for
    every option and table), the trace library (priors, learning) and request boundaries. The
    decision hooks (on_accesses, replace, choose_victim, should_bypass, plan_prefetch, ...) are the
    core's."""

    name = "trace"
    uses_lookahead = True

    def __init__(self, library=None, **options: Any) -> None:
        ref = TracePolicy(library, **options)
        if not (ref.L and ref.E and ref.K):
            raise ValueError(
                "the native trace policy needs the model's shape (num_layers, num_experts, top_k)"
            )
        self.library, self.learn = ref.library, ref.learn
        self.L, self.E, self.K = ref.L, ref.E, ref.K
        reuse = None if ref._reuse is None else [r for row in ref._reuse for r in row]
        follow = None
        if ref._follow is not None:
            follow = {lm: np.ascontiguousarray(t, dtype=np.float64).ravel() for lm, t in ref._follow.items()}
        cross = (
            None if ref._cross is None else [np.ascontiguousarray(t, np.float64).ravel() for t in ref._cross]
        )
        params = (
            ref.bypass,
            float(ref.bypass_margin),
            int(ref.prefetch),
            float(ref.prefetch_threshold),
            float(ref.kappa),
            int(ref.rematch_every or 0),
            int(ref.streak_lag),
            float(ref.lookahead_p),
            float(ref._default_rate),
            ref.library is not None,
        )
        self._setup(
            self.L,
            self.E,
            params,
            keytab(self.L, self.E),
            ref._pow,
            ref._span,
            HAZARD,
            NEXT_CHECK,
            reuse,
            follow,
            cross,
            ref._xd,
        )  # the prior stays uniform until on_request_start, as in TracePolicy

    def on_request_start(self) -> None:
        self._start_request()
        self._set_prior(None)

    def on_request_end(self) -> None:
        if self.learn and self.library is not None:
            eam = self.request_eam()
            if eam.any():
                self.library.add(eam)

    def request_eam(self) -> np.ndarray:
        """This request's expert activation matrix [L, E] so far."""
        return np.asarray(self._counts(), dtype=np.int64).reshape(self.L, self.E)

    def _set_prior(self, eam: np.ndarray | None) -> None:
        prior = None
        if self.library is not None and len(self.library):
            prior = np.asarray(self.library.predict(eam)).reshape(-1).tolist()
        self._load_prior(prior)

    def _rematch(self) -> None:  # called by the core every `rematch_every` tokens of a request
        self._set_prior(self.request_eam())


def describe_engine(policy: Any) -> str:
    """One line for `--verbose`: which implementation of the trace policy runs, and why."""
    cls = native_class()
    if cls is not None and isinstance(policy, cls):
        return f"trace policy: C core ({core_reason()})"
    if cls is not None:
        return "trace policy: Python (the model's shape was not given to the C core)"
    return f"trace policy: Python (C core unavailable: {core_reason()})"


def make_trace_policy(**options: Any):
    """The trace policy: native when the core loads and the shape is known (from the options or the
    library), else `TracePolicy`."""
    library = options.get("library")
    shape_known = all(options.get(k) for k in SHAPE_OPTIONS) or library is not None
    cls = native_class() if shape_known else None
    if cls is None:
        return TracePolicy(**options)
    return cls(**options)
