"""Every environment variable moeinf reads, and the default paths derived from them.

Values are read when asked for (functions, not module constants) so tests and long-lived processes
see the current environment. The Hugging Face variables are read by huggingface_hub itself; they
are listed here so that one file documents everything the program honours.
"""

from __future__ import annotations

import os
from pathlib import Path

# name -> what it does (the README's table is generated from this by hand; keep them in step)
ENVIRONMENT: dict[str, str] = {
    "MOEINF_HOME": "root of the model store (default ~/.moeinf); models live in $MOEINF_HOME/models",
    "HF_ENDPOINT": "Hugging Face hub URL used by `pull` (default https://huggingface.co)",
    "HF_HOME": "huggingface_hub's home (token file, cache); honoured as huggingface_hub does",
    "HF_TOKEN": "access token for gated or private repos",
    "HF_HUB_OFFLINE": "set to 1 to forbid network access in huggingface_hub",
    "MOEINF_NATIVE": "set to 0 to turn the native CPU kernels and policy cores off (torch, Python policies)",
    "MOEINF_NATIVE_DIR": "build cache of the native kernels and policy cores ($XDG_CACHE_HOME/moeinf/native)",
    "CC": "C compiler for the native kernels and policy cores (default: cc, then gcc, then clang on PATH)",
    "MOEINF_API_KEY": "`moeinf serve` requires `Authorization: Bearer <key>` on every request (as --api-key)",
}


def home() -> Path:
    """The store root: $MOEINF_HOME, default ~/.moeinf."""
    value = os.environ.get("MOEINF_HOME", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".moeinf"


def hf_token() -> str | None:
    """$HF_TOKEN if set (else huggingface_hub falls back to the token saved under HF_HOME)."""
    return os.environ.get("HF_TOKEN") or None


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or "https://huggingface.co"


def native_enabled() -> bool:
    """False when $MOEINF_NATIVE is 0/false/off/no: the native kernels and policy cores are not even built."""
    return os.environ.get("MOEINF_NATIVE", "1").strip().lower() not in ("0", "false", "off", "no")


def native_dir() -> Path:
    """Build cache of the native kernel library: $MOEINF_NATIVE_DIR, else $XDG_CACHE_HOME/moeinf/native."""
    value = os.environ.get("MOEINF_NATIVE_DIR", "").strip()
    if value:
        return Path(value).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(cache).expanduser() if cache else Path.home() / ".cache") / "moeinf" / "native"


def c_compiler() -> str | None:
    """$CC if set (a program name or path), else None: the build picks cc, gcc or clang from PATH."""
    return os.environ.get("CC", "").strip() or None


def api_key() -> str | None:
    """$MOEINF_API_KEY if set and not blank: the key `moeinf serve` requires (--api-key overrides it)."""
    return os.environ.get("MOEINF_API_KEY", "").strip() or None
