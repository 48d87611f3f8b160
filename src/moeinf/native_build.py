"""Compiling moeinf's C sources (native/) on the user's machine, once per source, flags and compiler.

Shared by the kernel library (kernels/build.py, loaded with ctypes) and the trace policy's core
(runtime/trace_policy_native.py, a CPython extension). Results are cached in a directory keyed by a
hash of the source, the flags, the compiler and the machine, so a fresh venv and a changed source
rebuild exactly once (concurrent processes race harmlessly: write, then rename). No torch here.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from moeinf import settings


def native_source(name: str, installed_dir: Path) -> Path | None:
    """The C source `name`: native/ of the source tree this package runs from (editable installs,
    checkouts), else the copy the package build put in `installed_dir` (wheels, `pip install .`)."""
    tree = Path(__file__).resolve().parents[2] / "native" / name
    for candidate in (tree, installed_dir / name):
        if candidate.is_file():
            return candidate
    return None


def find_compiler() -> str | None:
    chosen = settings.c_compiler()
    if chosen:
        return shutil.which(chosen)
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out.splitlines()[0] if out else cc


def compile_cached(
    source: Path, cc: str, out_dir: Path, *, flags: tuple[str, ...], libs: tuple[str, ...], name: str
) -> Path:
    """Compile `source` into out_dir/<hash>/<name> unless it is there; return its path.

    Raises OSError / subprocess.CalledProcessError on failure (the compiler's stderr in the message).
    """
    code = source.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [code, " ".join(flags + libs).encode(), _compiler_id(cc).encode(), platform.machine().encode()]
        )
    ).hexdigest()[:16]
    target = out_dir / key / name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *flags, "-o", tmp, str(source), *libs], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
