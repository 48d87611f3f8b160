"""Loading the policies' C cores (native/moeinf_policy_core.c) and the native `lru` and `lfu` policies.

The cores are a CPython extension compiled on first use with the system C compiler (native_build.py,
as the kernels are; or at install by setup.py), cached by a hash of source, flags and interpreter.
MOEINF_NATIVE=0 turns them off. Each native policy decides exactly as its Python class in
runtime/policy.py or runtime/trace_policy.py (tests/test_policy_core.py replays both); the simulator
runs an unmodified native policy through the core's own replay loop (`replays_natively`).
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

from moeinf import settings
from moeinf.native_build import compile_cached, find_compiler, native_source
from moeinf.runtime.expert_key import ExpertKey
from moeinf.runtime.policy import PolicyBase

SOURCE_NAME = "moeinf_policy_core.c"
MODULE_NAME = "moeinf_policy_core"
VERSION = 2  # must equal PC_VERSION in the C source
# -ffp-contract=off: no fused multiply-adds, so every ET rounds as Python's float arithmetic does.
FLAGS = ("-O2", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-strict-aliasing")
# The hooks that decide; a subclass overriding one of them is simulated hook by hook.
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

_lock = threading.Lock()
_loaded: tuple[Any, str] | None = None  # (module or None, how it was found / why it is off)
_classes: dict[tuple[int, str], type] = {}


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
        return None, f"could not build or load the policy cores: {e}"
    if getattr(module, "VERSION", None) != VERSION:
        return None, f"policy core version {getattr(module, 'VERSION', None)} != {VERSION}"
    return module, f"built with {cc}"


def load_core() -> Any:
    """The extension module, building it on the first call; None when unavailable (see `core_reason`)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _compile_and_import()
        return _loaded[0]


def core_reason() -> str:
    """How the cores were obtained, or why they are unavailable."""
    load_core()
    assert _loaded is not None
    return _loaded[1]


def reset() -> None:
    """Forget the load decision (tests; after changing MOEINF_NATIVE)."""
    global _loaded
    with _lock:
        _loaded = None


def core_class(core: str, name: str, hooks: type) -> type | None:
    """The policy class on the core type `core` (e.g. "LruCore") with the Python half `hooks`; None
    without the cores."""
    module = load_core()
    if module is None:
        return None
    key = (id(module), core)
    cls = _classes.get(key)
    if cls is None:
        cls = _classes[key] = type(name, (getattr(module, core), hooks, PolicyBase), {"__module__": __name__})
    return cls


def replays_natively(policy: Any) -> bool:
    """Whether the simulator may run `policy` through its core's replay loop (`_simulate`): a native
    policy none of whose decision hooks a subclass overrides (those must be called)."""
    module = load_core()
    if module is None:
        return False
    for core in (module.TraceCore, module.LruCore, module.LfuCore):
        if isinstance(policy, core):
            # each hook from the core, or PolicyBase's no-op where the core has none (no bypass, no plan)
            return all(_owner(type(policy), h) in (core, PolicyBase) for h in DECISION_HOOKS)
    return False


def _owner(cls: type, name: str) -> type | None:
    """The class in `cls`'s MRO that defines `name`."""
    return next((c for c in cls.__mro__ if name in c.__dict__), None)


def keytab(num_layers: int, num_experts: int) -> list[ExpertKey]:
    """The ExpertKey of every flat id layer * E + expert (what the cores hand back)."""
    return [ExpertKey(layer, e) for layer in range(num_layers) for e in range(num_experts)]


class _Shaped:
    """The Python half of the native `lru` and `lfu`: the shape, which the cores need up front."""

    def __init__(self, *, num_layers: int, num_experts: int, top_k: int | None = None) -> None:
        self.L, self.E = int(num_layers), int(num_experts)
        self._setup(self.L, self.E, keytab(self.L, self.E))


class _LruHooks(_Shaped):
    name = "lru"


class _LfuHooks(_Shaped):
    name = "lfu"


def make_native(name: str, **shape: Any):
    """The native `lru` or `lfu` for a model of this shape (num_layers, num_experts), or None when
    the cores are unavailable or the shape is not given."""
    if not (shape.get("num_layers") and shape.get("num_experts")):
        return None
    core, hooks = {"lru": ("LruCore", _LruHooks), "lfu": ("LfuCore", _LfuHooks)}[name]
    cls = core_class(core, f"Native{name.capitalize()}Policy", hooks)
    return None if cls is None else cls(**shape)
