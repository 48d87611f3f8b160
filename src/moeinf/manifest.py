"""The store's manifest.yaml: format version, source, model spec, and every file's size and sha256.

A model folder is complete exactly when it holds a manifest of this format version; readers refuse
other versions (UnsupportedStoreVersion: pull again) and malformed manifests (CorruptModel).
Torch-free: `moeinf list` reads manifests without loading any model code beyond the spec.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeinf.errors import CorruptModel, InvalidSpec, UnsupportedStoreVersion
from moeinf.models.spec import ModelSpec

FORMAT_VERSION = 1
MANIFEST = "manifest.yaml"


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Source:
    """Where a model came from: a hub repo pinned to a commit, or a local folder."""

    kind: str  # "hub" | "local"
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None
    path: str | None = None
    alias: str | None = None

    def describe(self) -> str:
        if self.kind == "local":
            return str(self.path)
        text = f"{self.repo}@{self.revision}"
        return text + (f" ({self.commit[:12]})" if self.commit and self.commit != self.revision else "")


@dataclass(frozen=True)
class Manifest:
    name: str
    source: Source
    spec: ModelSpec
    files: dict[str, FileEntry]  # store-relative path -> size, sha256
    created: str  # ISO 8601 UTC
    source_dtype: str
    stats: dict[str, Any] = field(default_factory=dict)  # reshard accounting (tensors seen, ignored, ...)
    format_version: int = FORMAT_VERSION

    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def size_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "created": self.created,
            "family": self.spec.family,
            "dtype": self.spec.dtype,
            "source_dtype": self.source_dtype,
            "source": {k: v for k, v in vars(self.source).items() if v is not None},
            "spec": self.spec.to_dict(),
            "stats": self.stats,
            "files": {path: {"size": e.size, "sha256": e.sha256} for path, e in sorted(self.files.items())},
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST) -> Manifest:
        if not isinstance(data, dict):
            raise CorruptModel(f"{where} is not a manifest")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise UnsupportedStoreVersion(
                f"{where} has store format {version!r}, this moeinf reads {FORMAT_VERSION}: "
                "run `moeinf pull` again"
            )
        try:
            return cls(
                name=str(data["name"]),
                source=Source(**data["source"]),
                spec=ModelSpec.from_dict(data["spec"]),
                files={p: FileEntry(int(e["size"]), str(e["sha256"])) for p, e in data["files"].items()},
                created=str(data["created"]),
                source_dtype=str(data.get("source_dtype", data["spec"]["dtype"])),
                stats=dict(data.get("stats") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError, InvalidSpec) as exc:
            raise CorruptModel(f"{where} is malformed ({exc}): remove the model and pull it again") from exc


def _yaml() -> tuple[Any, Any, Any]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: big manifests load fast
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    return yaml, loader, dumper


def save(manifest: Manifest, folder: Path) -> Path:
    yaml, _, dumper = _yaml()
    path = folder / MANIFEST
    text = yaml.dump(manifest.to_dict(), Dumper=dumper, sort_keys=False, default_flow_style=False)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    tmp.replace(path)
    return path


def load(folder: Path) -> Manifest:
    """Read `folder/manifest.yaml` (FileNotFoundError if absent)."""
    yaml, loader, _ = _yaml()
    path = folder / MANIFEST
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        raise CorruptModel(f"{path} is not valid YAML: remove the model and pull it again") from exc
    return Manifest.from_dict(data, where=str(path))


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """Hash a file in 8 MiB reads; `progress` gets the bytes read so far."""
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress(done)
    return digest.hexdigest()
