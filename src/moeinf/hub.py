"""The Hugging Face hub, through huggingface_hub only: resolve a repo, choose its files, download them.

`resolve` pins a revision to a commit and lists the repo's files with sizes; `choose_files` keeps
what moeinf needs (config, generation config, tokenizer files, chat template, safetensors weights and
their index) and refuses pickle-only repos; `download` fetches one file into a local folder with
progress reported through a callback (huggingface_hub resumes dropped connections with `Range`).
huggingface_hub honours HF_ENDPOINT, HF_HOME and HF_TOKEN itself. Every hub failure becomes a
one-line MoeinfError (repo not found, gated, no network, disk full). Remote code is never run.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeinf import settings
from moeinf.errors import (
    DiskFull,
    DownloadError,
    GatedRepo,
    InvalidCheckpoint,
    NetworkError,
    RepoNotFound,
    RevisionNotFound,
    UnsafeCheckpoint,
)

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
# Copied into the store next to the weights (contract 1); absent ones are skipped.
METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")

# (bytes done, bytes total or None) for one file
FileProgress = Callable[[int, "int | None"], None]


@dataclass(frozen=True)
class RemoteRepo:
    repo: str
    revision: str
    commit: str
    sizes: dict[str, int]  # path in repo -> size in bytes


@dataclass(frozen=True)
class FileChoice:
    metadata: tuple[str, ...]  # METADATA_FILES present in the repo
    index: str | None  # the safetensors index, if the repo has one
    weights: tuple[str, ...]  # *.safetensors to fetch (from the index when there is one)


def choose_files(names: list[str], index_weights: list[str] | None = None) -> FileChoice:
    """Pick the files moeinf needs from a repo (or folder) listing; refuse pickle-only checkpoints.

    Only top-level files count. With an index, the weights are the files it names (`index_weights`,
    once the index has been read); otherwise every top-level *.safetensors except Mistral's
    `consolidated*` duplicates.
    """
    top = [n for n in names if "/" not in n]
    if CONFIG not in top:
        raise InvalidCheckpoint("the checkpoint has no config.json")
    metadata = tuple(n for n in METADATA_FILES if n in top)
    index = INDEX if INDEX in top else None
    if index_weights is not None:
        weights = tuple(sorted(set(index_weights)))
        missing = [w for w in weights if w not in top]
        if missing:
            raise InvalidCheckpoint(f"the index names {missing[0]}, which the checkpoint does not have")
    else:
        weights = tuple(
            sorted(n for n in top if fnmatch.fnmatch(n, "*.safetensors") and not n.startswith("consolidated"))
        )
    if not weights and index is None:
        if any(fnmatch.fnmatch(n, p) for n in names for p in PICKLE_PATTERNS):
            raise UnsafeCheckpoint(
                "the checkpoint only has pickle weights (*.bin/*.pt), which moeinf refuses to load; "
                "use a safetensors version of the model"
            )
        raise InvalidCheckpoint("the checkpoint has no *.safetensors weights")
    return FileChoice(metadata, index, weights)


def index_weights(index_path: Path) -> tuple[list[str], set[str]]:
    """The weight files and tensor keys a model.safetensors.index.json lists."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidCheckpoint(f"unreadable {index_path.name}: {exc}") from exc
    return sorted(set(weight_map.values())), set(weight_map)


@contextlib.contextmanager
def hub_errors(repo: str) -> Iterator[None]:
    """Translate huggingface_hub / network / disk failures into one-line MoeinfErrors."""
    import httpx2
    from huggingface_hub import errors as hf

    endpoint = settings.hf_endpoint()
    try:
        yield
    except hf.GatedRepoError as exc:
        raise GatedRepo(
            f"{repo} is gated: accept its licence on {endpoint}/{repo}, then set HF_TOKEN"
        ) from exc
    except hf.RevisionNotFoundError as exc:
        raise RevisionNotFound(f"{repo} has no such revision") from exc
    except hf.RepositoryNotFoundError as exc:
        raise RepoNotFound(
            f"repository {repo} not found on {endpoint} (private repos need HF_TOKEN)"
        ) from exc
    except hf.RemoteEntryNotFoundError as exc:
        raise InvalidCheckpoint(f"{repo} lacks a file it lists: {exc.response.url}") from exc
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled, httpx2.TransportError) as exc:
        raise NetworkError(f"cannot reach {endpoint}: {_first_line(exc)}") from exc
    except hf.HfHubHTTPError as exc:
        raise DownloadError(f"the hub answered an error for {repo}: {_first_line(exc)}") from exc
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFull(f"disk full while downloading {repo}") from exc
        if "Consistency check failed" in str(exc):
            raise DownloadError(f"download of {repo} was cut short; run the pull again") from exc
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return next((line for line in text if line.strip()), type(exc).__name__)


def _api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=settings.hf_endpoint(), token=settings.hf_token())


def resolve(repo: str, revision: str = "main") -> RemoteRepo:
    """Pin `revision` to a commit and list the repo's files with their sizes."""
    api = _api()
    with hub_errors(repo):
        info = api.model_info(repo, revision=revision)
        commit = info.sha
        if not commit:
            raise DownloadError(f"the hub gave no commit for {repo}@{revision}")
        sizes = {
            entry.path: int(entry.size)
            for entry in api.list_repo_tree(repo, revision=commit, recursive=True)
            if getattr(entry, "size", None) is not None
        }
    return RemoteRepo(repo, revision, commit, sizes)


class _CallbackBar:
    """Stands in for tqdm inside huggingface_hub's http_get: forwards byte counts to a callback."""

    callback: FileProgress | None = None

    def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **kwargs: Any) -> None:
        self.total, self.n = total, initial
        self._report()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._report()

    def _report(self) -> None:
        if self.callback is not None:
            self.callback(self.n, self.total)

    def close(self) -> None:
        pass

    def __enter__(self) -> _CallbackBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def download(
    remote: RemoteRepo, filename: str, local_dir: Path, progress: FileProgress | None = None
) -> Path:
    """Fetch one file of the pinned commit into `local_dir` (a no-op if already there and intact)."""
    from huggingface_hub import hf_hub_download

    bar = type("Bar", (_CallbackBar,), {"callback": staticmethod(progress) if progress else None})
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # no retry chatter under our bars
    with hub_errors(remote.repo):
        path = hf_hub_download(
            remote.repo,
            filename,
            revision=remote.commit,
            local_dir=local_dir,
            token=settings.hf_token(),
            endpoint=settings.hf_endpoint(),
            tqdm_class=bar,  # type: ignore[arg-type]
        )
    return Path(path)
