"""Building and loading the native kernel library (native/moeinf_kernels.c) with ctypes.

A regular install (`pip install .`) compiles the library at build time (setup.py) and ships the
source beside it. Otherwise (editable installs, no compiler at build time, a library built for another
machine) it is compiled on first use with the system C compiler into a cache directory keyed by a
hash of the source, the flags and the compiler, so a fresh CI venv and a changed source rebuild
exactly once (concurrent processes race harmlessly: write, then rename).
Without a compiler, without the source, or with MOEINF_NATIVE=0, `load()` returns None and says why;
callers then use torch. No torch here.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from moeinf import settings
from moeinf.native_build import compile_cached, find_compiler, native_source

SOURCE_NAME = "moeinf_kernels.c"
LIBRARY_NAME = "libmoeinf_kernels.so"
FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-pthread")
LIBS = ("-lm",)
VERSION = 2  # must equal MK_VERSION in the C source


@dataclass(frozen=True)
class Native:
    """The loaded library and where it came from."""

    lib: ctypes.CDLL
    path: Path


@dataclass(frozen=True)
class _State:
    native: Native | None
    reason: str  # why it is off, or how it was found


_lock = threading.Lock()
_state: _State | None = None


def source_path() -> Path | None:
    """The kernels' C source (native/ of the source tree, else the copy beside this module)."""
    return native_source(SOURCE_NAME, Path(__file__).resolve().parent)


def prebuilt_path() -> Path | None:
    """The library compiled by the package build (setup.py), when the install has one."""
    candidate = Path(__file__).resolve().parent / LIBRARY_NAME
    return candidate if candidate.is_file() else None


def build(source: Path, cc: str, out_dir: Path) -> Path:
    """Compile the kernel library into out_dir/<hash>/ unless it is there; return its path."""
    return compile_cached(source, cc, out_dir, flags=FLAGS, libs=LIBS, name=LIBRARY_NAME)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.mk_version.restype = i32
    lib.mk_simd.restype = i32
    lib.mk_set_simd.argtypes = [i32]
    lib.mk_set_simd.restype = i32
    lib.mk_linear.argtypes = [p, i64, i64, p, i32, i64, p, p, i32]
    lib.mk_linear.restype = i32
    lib.mk_expert_forward.argtypes = [p, i64, i64, i64, p, p, p, i32, p, i32, p, i32]
    lib.mk_expert_forward.restype = i32
    lib.mk_moe_forward.argtypes = [p, i64, i64, i64, p, p, p, i32, p, p, i32]
    lib.mk_moe_forward.restype = i32


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    return lib


def _load() -> _State:
    if not settings.native_enabled():
        return _State(None, "turned off by MOEINF_NATIVE=0")
    prebuilt = prebuilt_path()
    if prebuilt is not None:
        try:
            lib = _open(prebuilt)
            if lib.mk_version() == VERSION:
                return _State(Native(lib, prebuilt), "built at install")
        except (OSError, AttributeError):
            pass  # built for another machine or an older version: compile from source below
    source = source_path()
    if source is None:
        return _State(None, f"source {SOURCE_NAME} not found next to the package")
    cc = find_compiler()
    if cc is None:
        return _State(None, "no C compiler (cc, gcc, clang or $CC) on PATH")
    try:
        try:
            path = build(source, cc, settings.native_dir())
        except OSError:  # an unwritable cache dir (read-only home on some CI runners): use the temp dir
            path = build(source, cc, Path(tempfile.gettempdir()) / f"moeinf-native-{os.getuid()}")
        lib = _open(path)
    except subprocess.CalledProcessError as e:
        first = (e.stderr or "").strip().splitlines()[:1]
        return _State(None, f"compiling with {cc} failed: {first[0] if first else e.returncode}")
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        return _State(None, f"could not build or load the library: {e}")
    if lib.mk_version() != VERSION:
        return _State(None, f"library version {lib.mk_version()} != {VERSION}")
    return _State(Native(lib, path), f"built with {cc}")


def load() -> Native | None:
    """The library, building it on the first call; None when unavailable (see `reason()`)."""
    global _state
    with _lock:
        if _state is None:
            _state = _load()
        return _state.native


def reason() -> str:
    """Why the library is unavailable, or how it was obtained."""
    load()
    assert _state is not None
    return _state.reason


def reset() -> None:
    """Forget the load decision (tests; after changing MOEINF_NATIVE)."""
    global _state
    with _lock:
        _state = None
