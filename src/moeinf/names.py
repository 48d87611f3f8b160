"""Model references and store names: the only place user-typed model names are parsed.

A *source* (what `pull` takes) is a catalog alias (`mixtral`, `mixtral:8x22b`), a hub repo
(`org/repo`, `org/repo@revision`, `org/repo:revision`) or a local directory (`./ckpt`, `/abs/ckpt`,
`~/ckpt`, or any existing directory). A *store name* names a pulled model (`mixtral`,
`mixtral:8x22b`, `mixtral-8x7b-instruct-v0.1`): lowercase, safe as a folder name, no `..`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from moeinf.errors import InvalidModelName, UnknownAlias

_MAX_NAME = 96
_STORE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*(:[a-z0-9][a-z0-9._-]*)?$")
# Hugging Face repo id part: letters, digits, '-', '_', '.'; no leading/trailing '-' or '.'; no '--'/'..'
_REPO_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?$")
# git branch, tag or commit sha; '/' allowed (refs/pr/1), no '..', no spaces or control characters
_REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$")


@dataclass(frozen=True)
class CatalogEntry:
    """An alias: a hub repo at a revision, or (`package`) a checkpoint shipped inside a Python package."""

    alias: str
    repo: str | None
    revision: str
    family: str
    description: str = ""
    package: str | None = None


@dataclass(frozen=True)
class ModelRef:
    """A parsed source. kind: "hub" (repo, revision) or "local" (path); alias set when from the catalog."""

    kind: str
    repo: str | None = None
    revision: str = "main"
    path: Path | None = None
    alias: str | None = None

    @property
    def default_name(self) -> str:
        """The store name a pull of this source gets unless --name says otherwise."""
        if self.alias is not None:
            return self.alias
        if self.kind == "local":
            assert self.path is not None
            return sanitize_name(self.path.name)
        assert self.repo is not None
        return sanitize_name(self.repo.split("/")[1])

    def __str__(self) -> str:
        if self.kind == "local":
            return str(self.path)
        return f"{self.repo}@{self.revision}"


@lru_cache(maxsize=1)
def catalog() -> dict[str, CatalogEntry]:
    """The packaged alias catalog (moeinf/catalog.yaml)."""
    import yaml

    text = resources.files("moeinf").joinpath("catalog.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    entries = {}
    for alias, fields in data["aliases"].items():
        entries[str(alias)] = CatalogEntry(
            alias=str(alias),
            repo=fields.get("repo"),
            revision=str(fields.get("revision", "main")),
            family=fields["family"],
            description=fields.get("description", ""),
            package=fields.get("package"),
        )
    return entries


def _check_text(text: str, what: str, *, spaces: bool = False) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InvalidModelName(f"empty {what}")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InvalidModelName(f"{what} {text!r} contains control characters")
    if not spaces and (text != text.strip() or any(c.isspace() for c in text)):
        raise InvalidModelName(f"{what} {text!r} contains whitespace")
    return text


def validate_name(name: str) -> str:
    """Check (and lowercase) a store name; raise InvalidModelName with the reason."""
    _check_text(name, "model name")
    lowered = name.lower()
    if len(lowered) > _MAX_NAME:
        raise InvalidModelName(f"model name {name!r} is longer than {_MAX_NAME} characters")
    if ".." in lowered or "/" in lowered or "\\" in lowered:
        raise InvalidModelName(f"model name {name!r} may not contain '/', '\\' or '..'")
    if not _STORE_NAME.match(lowered):
        raise InvalidModelName(
            f"invalid model name {name!r}: use letters, digits, '.', '_', '-' and at most one ':tag'"
        )
    return lowered


def sanitize_name(text: str) -> str:
    """Turn a repo or folder name into a valid store name (lowercase, odd characters to '-')."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    cleaned = re.sub(r"\.{2,}", ".", cleaned)[:_MAX_NAME].rstrip("-._")
    return validate_name(cleaned or "model")


def _validate_revision(revision: str, ref: str) -> str:
    if not revision:
        raise InvalidModelName(f"empty revision in {ref!r}")
    if (
        len(revision) > 255
        or not _REVISION.match(revision)
        or ".." in revision
        or "//" in revision
        or revision.endswith(("/", ".lock", "."))
    ):
        raise InvalidModelName(f"invalid revision {revision!r} in {ref!r}")
    return revision


def _validate_repo(repo: str, ref: str) -> str:
    parts = repo.split("/")
    if len(parts) != 2:
        raise InvalidModelName(f"invalid hub repo {ref!r}: expected org/repo")
    for part in parts:
        if not part or len(part) > _MAX_NAME or not _REPO_PART.match(part) or "--" in part or ".." in part:
            raise InvalidModelName(f"invalid hub repo {ref!r}: bad name part {part!r}")
    return repo


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~", ".\\")) or text in (".", "..")


def parse_source(source: str) -> ModelRef:
    """Parse what the user gave `pull`: alias, org/repo[@rev], or a local directory."""
    _check_text(source, "model source", spaces=True)
    if _looks_like_path(source):
        path = Path(os.path.expanduser(source))  # "~nosuchuser" stays as is, no exception
        if not path.is_dir():
            raise InvalidModelName(f"no such directory: {source}")
        return ModelRef(kind="local", path=path.resolve())
    _check_text(source, "model source")
    entries = catalog()
    if source.lower() in entries or source.lower().removesuffix(":latest") in entries:
        entry = entries.get(source.lower()) or entries[source.lower().removesuffix(":latest")]
        if entry.package is not None:
            folder = Path(str(resources.files(entry.package)))
            return ModelRef(kind="local", path=folder, alias=entry.alias)
        return ModelRef(kind="hub", repo=entry.repo, revision=entry.revision, alias=entry.alias)
    if "/" in source:
        if Path(source).is_dir() and (Path(source) / "config.json").is_file():
            return ModelRef(kind="local", path=Path(source).resolve())
        repo, revision = source, "main"
        for sep in ("@", ":"):
            if sep in source:
                repo, revision = source.split(sep, 1)
                revision = _validate_revision(revision, source)
                break
        return ModelRef(kind="hub", repo=_validate_repo(repo, source), revision=revision)
    if Path(source).is_dir():
        return ModelRef(kind="local", path=Path(source).resolve())
    known = ", ".join(sorted(entries))
    raise UnknownAlias(f"unknown model {source!r}: use an alias ({known}), org/repo or a local directory")


def resolve_name(ref: str) -> str:
    """The store name `ref` refers to: a store name itself, or the default name of a source."""
    _check_text(ref, "model name", spaces=True)
    if "/" in ref or ref.startswith(("~", ".")):
        try:
            return parse_source(ref).default_name
        except (InvalidModelName, UnknownAlias):
            raise InvalidModelName(
                f"invalid model name {ref!r}: not a store name, org/repo or existing folder"
            ) from None
    return validate_name(ref.removesuffix(":latest"))
