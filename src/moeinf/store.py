"""The local model store under $MOEINF_HOME: complete models, unfinished pulls, locks, verification.

Layout: `models/<name>/` (manifest.yaml, dense.safetensors, experts/L###/E###.safetensors, tokenizer
and config files) holds only complete models: a pull builds in `partial/<name>/` and renames the
finished folder into `models/` in one step, so a killed pull never leaves anything `list` or `open`
accept. `locks/<name>.lock` (flock) serialises pulls and removals of one model across processes.
Torch-free.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moeinf import manifest as manifest_io
from moeinf import settings
from moeinf.errors import (
    CorruptModel,
    DiskFull,
    IncompleteModel,
    ModelNotFound,
    MoeinfError,
    StoreLocked,
)
from moeinf.manifest import MANIFEST, Manifest
from moeinf.names import resolve_name, validate_name

DENSE_FILE = "dense.safetensors"


def expert_file(layer: int, expert: int) -> str:
    """Store-relative path of one routed expert's file."""
    return f"experts/L{layer:03d}/E{expert:03d}.safetensors"


# verify progress: (store-relative path, bytes hashed so far in it, its size)
VerifyProgress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class StoredModel:
    """One complete model in the store."""

    name: str
    path: Path
    manifest: Manifest

    @property
    def spec(self):  # -> ModelSpec (kept unannotated so importing the store stays light)
        return self.manifest.spec

    @property
    def dense_path(self) -> Path:
        return self.path / DENSE_FILE

    def expert_path(self, layer: int, expert: int) -> Path:
        return self.path / expert_file(layer, expert)

    @property
    def tokenizer_dir(self) -> Path:
        return self.path

    @property
    def size_bytes(self) -> int:
        return self.manifest.size_bytes

    @property
    def modified(self) -> float:
        return (self.path / MANIFEST).stat().st_mtime

    def info(self) -> dict[str, Any]:
        """What `list --json` / `show --json` print: plain JSON-able facts about the model."""
        from moeinf.models.weights import dense_shapes

        spec, source = self.manifest.spec, self.manifest.source
        dense_params = sum(math.prod(shape) for shape in dense_shapes(spec).values())
        moe_layers = len(spec.moe_layers)
        itemsize = {"float32": 4}.get(spec.dtype, 2)
        return {
            "name": self.name,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "architecture": spec.family,
            "num_layers": spec.num_layers,
            "num_moe_layers": moe_layers,
            "num_experts": spec.num_experts,
            "top_k": spec.top_k,
            "num_shared_experts": spec.num_shared_experts,
            "hidden_size": spec.hidden_size,
            "expert_dim": spec.expert_dim,
            "dtype": spec.dtype,
            "context_length": spec.max_position_embeddings,
            "kv_values_per_token": spec.kv_values_per_token,
            "params_total": dense_params + moe_layers * spec.num_experts * spec.expert_params,
            "params_active": dense_params + moe_layers * spec.top_k * spec.expert_params,
            "bytes_per_expert": spec.expert_params * itemsize,
            "source": source.describe(),
            "repo": source.repo,
            "revision": source.revision,
            "commit": source.commit,
            "modified": datetime.fromtimestamp(self.modified, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }

    def verify(self, progress: VerifyProgress | None = None) -> list[str]:
        """Re-hash every file; return one problem line per missing, resized or corrupted file."""
        problems = []
        for rel, entry in self.manifest.files.items():
            path = self.path / rel
            if not path.is_file():
                problems.append(f"{rel}: missing")
                continue
            size = path.stat().st_size
            if size != entry.size:
                problems.append(f"{rel}: size {size} bytes, manifest says {entry.size}")
                continue

            def report(done: int, rel: str = rel, size: int = size) -> None:
                if progress:
                    progress(rel, done, size)

            if manifest_io.sha256_file(path, report) != entry.sha256:
                problems.append(f"{rel}: sha256 mismatch (corrupted)")
        return problems


class Store:
    """The model store rooted at `home` (default: settings.home(), i.e. $MOEINF_HOME or ~/.moeinf)."""

    def __init__(self, home: Path | str | None = None) -> None:
        self.home = Path(home) if home is not None else settings.home()

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    def partial_dir(self, name: str) -> Path:
        return self.home / "partial" / validate_name(name)

    def model_dir(self, name: str) -> Path:
        return self.models_dir / validate_name(name)

    # --- reading --------------------------------------------------------------------------------

    def list(self) -> list[StoredModel]:
        """Every complete, readable model, by name. Unreadable ones are skipped (`open` explains)."""
        if not self.models_dir.is_dir():
            return []
        models = []
        for folder in sorted(self.models_dir.iterdir()):
            if folder.name.startswith(".") or not (folder / MANIFEST).is_file():
                continue
            with contextlib.suppress(MoeinfError):
                models.append(self.open(folder.name))
        return models

    def exists(self, name: str) -> bool:
        return (self.model_dir(name) / MANIFEST).is_file()

    def open(self, ref: str) -> StoredModel:
        """The complete model named `ref` (a store name, or a source whose default name it is)."""
        name = resolve_name(ref)
        folder = self.model_dir(name)
        if not (folder / MANIFEST).is_file():
            if self.partial_dir(name).exists() or folder.exists():
                raise IncompleteModel(f"the pull of {name!r} did not finish: run `moeinf pull` again")
            raise ModelNotFound(f"model {name!r} not found: pull it first (`moeinf pull {name}`)")
        manifest = manifest_io.load(folder)  # UnsupportedStoreVersion / CorruptModel
        return StoredModel(name, folder, manifest)

    # --- writing --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(
        self, name: str, *, wait: bool = True, on_wait: Callable[[], None] | None = None
    ) -> Iterator[None]:
        """Hold the model's file lock. `wait=False` raises StoreLocked if another process holds it."""
        locks = self.home / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{validate_name(name)}.lock", "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise StoreLocked(
                        f"model {name!r} is being pulled or removed by another process"
                    ) from None
                if on_wait:
                    on_wait()
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def publish(self, name: str, build: Path) -> StoredModel:
        """Move a finished build folder (with its manifest) into models/ in one rename."""
        if not (build / MANIFEST).is_file():
            raise CorruptModel(f"internal error: build of {name!r} has no manifest")
        target = self.model_dir(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        _fsync_dir(build)
        old = None
        if target.exists():  # an unreadable older copy the caller chose to replace
            old = self.home / "partial" / f".old-{name}-{os.getpid()}"
            os.rename(target, old)
        os.rename(build, target)  # atomic on one filesystem
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old)
        return self.open(name)

    def remove(self, name: str) -> None:
        """Delete a model (and any unfinished pull of it) under its lock."""
        name = validate_name(name)
        folder, partial = self.model_dir(name), self.partial_dir(name)
        if not folder.exists() and not partial.exists():
            raise ModelNotFound(f"model {name!r} not found")
        with self.lock(name, wait=False):
            if folder.exists():
                # rename first so a half-deleted folder is never mistaken for a model
                doomed = self.home / "partial" / f".rm-{name}-{os.getpid()}"
                doomed.parent.mkdir(parents=True, exist_ok=True)
                os.rename(folder, doomed)
                shutil.rmtree(doomed)
            if partial.exists():
                shutil.rmtree(partial)

    def free_bytes(self) -> int:
        self.home.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.home).free

    def check_free(self, needed: int, what: str) -> None:
        """DiskFull if fewer than `needed` bytes (plus 1% slack) are free under the store."""
        free = self.free_bytes()
        if free < needed * 1.01:
            raise DiskFull(
                f"{what} needs {_gb(needed)} free in {self.home}, only {_gb(free)} available "
                "(set MOEINF_HOME to a bigger disk)"
            )


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
