"""The `trace` policy on its C core (native/moeinf_trace_core.c): the decisions of
`trace_policy.TracePolicy`, made ~10x faster, for the runtime and the simulator alike.

The core is a CPython extension compiled on first use with the system C compiler (native_build.py, as
the kernels are) and cached by a hash of source, flags and interpreter. `make_trace_policy`
returns the native policy when the core loads and the model's shape is known, else the Python one;
MOEINF_NATIVE=0 turns it off. The Python class stays the reference: both are replayed side by side
in tests/test_trace_core.py and must fetch the same experts in the same order.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from moeinf import settings
from moeinf.native_build import compile_cached, find_compiler, native_source
from moeinf.runtime.expert_key import ExpertKey
from moeinf.runtime.next_use import HAZARD, NEXT_CHECK
from moeinf.runtime.policy import PolicyBase
from moeinf.runtime.trace_policy import TracePolicy

SOURCE_NAME = "moeinf_trace_core.c"
MODULE_NAME = "moeinf_trace_core"
VERSION = 1  # must equal TC_VERSION in the C source
# -ffp-contract=off: no fused multiply-adds, so every ET rounds as Python's float arithmetic does.
FLAGS = ("-O2", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-strict-aliasing")

_lock = threading.Lock()
_loaded: tuple[Any, str] | None = None  # (module or None, how it was found / why it is off)


def _import(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile_and_import() -> tuple[Any, str]:
    if not settings.native_enabled():
        return None, "turned off by MOEINF_NATIVE=0"
    here = Path(__file__).resolve().parent
    name = MODULE_NAME + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")
    if (here / name).is_file():  # built by the package build (setup.py)
        try:
            module = _import(here / name)
            if getattr(module, "VERSION", None) == VERSION:
                return module, "built at install"
        except ImportError:
            pass  # built for another interpreter or an older source: compile below
    source = native_source(SOURCE_NAME, here)
    if source is None:
        return None, f"source {SOURCE_NAME} not found next to the package"
    cc = find_compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc, clang or $CC) on PATH"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        return None, f"no Python headers (Python.h) in {include}"
    flags = (*FLAGS, f"-I{include}")
    try:
        try:
            path = compile_cached(source, cc, settings.native_dir(), flags=flags, libs=(), name=name)
        except OSError:  # an unwritable cache dir: the temp dir
            out = Path(tempfile.gettempdir()) / f"moeinf-native-{os.getuid()}"
            path = compile_cached(source, cc, out, flags=flags, libs=(), name=name)
        module = _import(path)
    except subprocess.CalledProcessError as e:
        first = (e.stderr or "").strip().splitlines()[:1]
        return None, f"compiling with {cc} failed: {first[0] if first else e.returncode}"
    except (OSError, ImportError, subprocess.SubprocessError) as e:
        return None, f"could not build or load the trace core: {e}"
    if getattr(module, "VERSION", None) != VERSION:
        return None, f"trace core version {getattr(module, 'VERSION', None)} != {VERSION}"
    return module, f"built with {cc}"


def load_core() -> Any:
    """The extension module, building it on the first call; None when unavailable (see `core_reason`)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _compile_and_import()
        return _loaded[0]


def core_reason() -> str:
    """How the core was obtained, or why it is unavailable."""
    load_core()
    assert _loaded is not None
    return _loaded[1]


def reset() -> None:
    """Forget the load decision (tests; after changing MOEINF_NATIVE)."""
    global _loaded
    with _lock:
        _loaded = None


_classes: dict[int, type] = {}


def native_class() -> type | None:
    """`NativeTracePolicy`, a subclass of the core's type (None without the core)."""
    module = load_core()
    if module is None:
        return None
    cls = _classes.get(id(module))
    if cls is None:
        cls = _classes[id(module)] = type(
            "NativeTracePolicy", (module.TraceCore, _NativeHooks, PolicyBase), {"__module__": __name__}
        )
    return cls


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
            follow = {lm: np.asarray(t, dtype=np.float64).ravel().tolist() for lm, t in ref._follow.items()}
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
        keytab = [ExpertKey(layer, e) for layer in range(self.L) for e in range(self.E)]
        self._setup(
            self.L,
            self.E,
            params,
            keytab,
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


DECISION_HOOKS = (
    "on_access",
    "on_accesses",
    "on_insert",
    "on_evict",
    "choose_victim",
    "replace",
    "should_bypass",
    "plan_prefetch",
    "on_router_lookahead",
)


def replays_natively(policy: Any) -> bool:
    """Whether the simulator may run `policy` through the core's own replay loop (`_simulate`): a
    native trace policy none of whose decision hooks a subclass overrides (those must be called)."""
    module = load_core()
    if module is None or not isinstance(policy, module.TraceCore):
        return False
    return all(getattr(type(policy), h) is getattr(module.TraceCore, h) for h in DECISION_HOOKS)


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
    shape_known = all(options.get(k) for k in ("num_layers", "num_experts", "top_k")) or library is not None
    cls = native_class() if shape_known else None
    if cls is None:
        return TracePolicy(**options)
    return cls(**options)
