"""`pull` as a service: fetch a checkpoint (hub or local folder) and reshard it into the store.

Order matters for failing early and cheaply: parse the source, list the repo, refuse pickle-only
repos, fetch config.json and refuse unknown architectures, check free disk, and only then fetch the
weights, one shard at a time (download, reshard, delete). Work happens in the store's partial folder
under the model's lock; progress survives a kill at shard granularity (and huggingface_hub resumes
a dropped connection inside a shard with `Range`). The finished folder appears in one rename.
Progress goes to a callback as PullEvents; nothing here prints.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from moeinf import hub
from moeinf.errors import (
    CorruptModel,
    DiskFull,
    InvalidCheckpoint,
    InvalidModelName,
    InvalidSpec,
    ModelExists,
    QuantizedCheckpoint,
    ReshardError,
    UnmappedTensor,
    UnsafeCheckpoint,
    UnsupportedArchitecture,
    UnsupportedStoreVersion,
)
from moeinf.manifest import FileEntry, Manifest, Source, save, sha256_file
from moeinf.names import ModelRef, parse_source, validate_name
from moeinf.store import Store, StoredModel
from moeinf.tensorfile import DTYPE_NAMES

if TYPE_CHECKING:
    from moeinf.models.spec import ModelSpec
    from moeinf.reshard import Resharder

DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "f32": "float32",
    "float32": "float32",
}
_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class PullEvent:
    """kind "status": a one-line message; kind "file": bytes of one file in a phase
    ("download", "reshard"); kind "done": the model is in the store."""

    kind: str
    message: str = ""
    file: str | None = None
    phase: str | None = None
    done: int = 0
    total: int | None = None


PullProgress = Callable[[PullEvent], None]


def normalise_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    try:
        return DTYPE_ALIASES[dtype.lower()]
    except KeyError:
        raise InvalidModelName(f"unknown dtype {dtype!r}: use bf16, fp16 or fp32") from None


def pull(
    source: str,
    *,
    name: str | None = None,
    store: Store | None = None,
    progress: PullProgress | None = None,
    dtype: str | None = None,
) -> StoredModel:
    """Bring `source` (alias, org/repo[@rev], local folder) into the store as `name`; return it.

    Pulling a model that is already complete is a no-op (a "status" event says so).
    """
    ref = parse_source(source)
    name = validate_name(name) if name else ref.default_name
    store = store or Store()
    emit = progress or (lambda event: None)
    target = normalise_dtype(dtype)
    with store.lock(name, on_wait=lambda: emit(PullEvent("status", f"waiting for another pull of {name}"))):
        if store.exists(name):
            try:
                model = store.open(name)
            except (UnsupportedStoreVersion, CorruptModel) as exc:  # rebuilt below, replaced on publish
                emit(PullEvent("status", f"replacing the stored {name}: {exc}"))
            else:
                if not _same_source(model.manifest.source, ref):
                    raise ModelExists(
                        f"a model named {name!r} from {model.manifest.source.describe()} exists: "
                        "`moeinf rm` it or pull with --name"
                    )
                emit(PullEvent("status", f"{name} is already pulled ({model.path}): nothing to do"))
                return model
        job = _Job(ref, name, store, emit, target)
        try:
            model = job.run_local() if ref.kind == "local" else job.run_hub()
        except _REFUSALS:
            shutil.rmtree(job.partial, ignore_errors=True)  # retrying cannot help: keep nothing
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull(
                    f"disk full while pulling {name}: free space, then pull again to resume"
                ) from exc
            raise
    emit(PullEvent("done", f"pulled {name} into {model.path}"))
    return model


# Failures a retry cannot fix; anything else (network, disk, a kill) leaves the partial pull to resume.
_REFUSALS = (
    UnsupportedArchitecture,
    InvalidSpec,
    InvalidCheckpoint,
    UnsafeCheckpoint,
    ReshardError,
    UnmappedTensor,
)


def _same_source(source: Source, ref: ModelRef) -> bool:
    if ref.kind == "local":
        return source.kind == "local" and source.path == str(ref.path)
    return source.kind == "hub" and source.repo == ref.repo


class _Job:
    """One pull: the partial folder (pull.json, download/, build/) and the steps that fill it."""

    def __init__(
        self, ref: ModelRef, name: str, store: Store, emit: PullProgress, target: str | None
    ) -> None:
        self.ref, self.name, self.store, self.emit, self.target = ref, name, store, emit, target
        self.partial = store.partial_dir(name)
        self.build = self.partial / "build"
        self.downloads = self.partial / "download"

    # --- sources --------------------------------------------------------------------------------

    def run_hub(self) -> StoredModel:
        from moeinf.models.adapters import adapter_for

        assert self.ref.repo is not None
        self.emit(PullEvent("status", f"resolving {self.ref.repo}@{self.ref.revision}"))
        remote = hub.resolve(self.ref.repo, self.ref.revision)
        choice = hub.choose_files(list(remote.sizes))  # pickle-only refused here, before any download
        self._prepare({"source": str(self.ref), "commit": remote.commit, "dtype": self.target})
        config = self._read_config(hub.download(remote, hub.CONFIG, self.downloads))
        adapter = adapter_for(config)  # unknown architectures stop here, before the weights
        spec = adapter.spec(config)
        expected: set[str] | None = None
        if choice.index:
            weights, expected = hub.index_weights(hub.download(remote, choice.index, self.downloads))
            choice = hub.choose_files(list(remote.sizes), weights)
        from moeinf.reshard import Resharder

        resharder = Resharder(adapter, spec, self.build, dtype=self.target)
        todo = [w for w in choice.weights if w not in resharder.done_shards]
        self._check_disk([remote.sizes[w] for w in todo], spec.dtype, largest_input=True)
        for meta in choice.metadata:
            self._keep(hub.download(remote, meta, self.downloads), meta)
        for shard in todo:
            path = hub.download(remote, shard, self.downloads, self._file_progress(shard, "download"))
            resharder.add_shard(path, name=shard, progress=self._file_progress(shard, "reshard"))
            path.unlink()  # peak extra disk: one shard
        source = Source(
            "hub", repo=remote.repo, revision=remote.revision, commit=remote.commit, alias=self.ref.alias
        )
        return self._finish(resharder, expected, spec, source)

    def run_local(self) -> StoredModel:
        from moeinf.models.adapters import adapter_for

        folder = self.ref.path
        assert folder is not None
        names = sorted(str(p.relative_to(folder)) for p in folder.iterdir() if p.is_file())
        choice = hub.choose_files(names)
        config = self._read_config(folder / hub.CONFIG)
        adapter = adapter_for(config)
        spec = adapter.spec(config)
        expected: set[str] | None = None
        if choice.index:
            weights, expected = hub.index_weights(folder / choice.index)
            choice = hub.choose_files(names, weights)
        self._prepare({"source": str(folder), "dtype": self.target})
        from moeinf.reshard import Resharder

        resharder = Resharder(adapter, spec, self.build, dtype=self.target)
        todo = [w for w in choice.weights if w not in resharder.done_shards]
        self._check_disk([(folder / w).stat().st_size for w in todo], spec.dtype, largest_input=False)
        for meta in choice.metadata:
            self._keep(folder / meta, meta)
        for shard in todo:
            resharder.add_shard(folder / shard, name=shard, progress=self._file_progress(shard, "reshard"))
        return self._finish(resharder, expected, spec, Source("local", path=str(folder)))

    # --- steps ----------------------------------------------------------------------------------

    def _prepare(self, state: dict) -> None:
        """Reuse the partial folder of an interrupted pull of the same source, else start afresh."""
        marker = self.partial / "pull.json"
        if marker.is_file():
            try:
                same = json.loads(marker.read_text()) == state
            except ValueError:
                same = False
            if same:
                self.emit(PullEvent("status", f"resuming the unfinished pull of {self.name}"))
                for stale in self.downloads.rglob("*.incomplete"):  # huggingface_hub's per-process temp files
                    stale.unlink()
                return
        if self.partial.exists():
            shutil.rmtree(self.partial)
        self.build.mkdir(parents=True)
        self.downloads.mkdir(parents=True)
        marker.write_text(json.dumps(state))

    @staticmethod
    def _read_config(path: Path) -> dict:
        """config.json, refusing quantized checkpoints before any weight is fetched."""
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidCheckpoint(f"unreadable config.json: {exc}") from exc
        if not isinstance(config, dict):
            raise InvalidCheckpoint("config.json is not a JSON object")
        quant = config.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
            raise QuantizedCheckpoint(
                f"the checkpoint is quantized ({method}); moeinf needs bf16/fp16/fp32 safetensors weights "
                "(look for a bf16 version of the model)"
            )
        return config

    def _check_disk(self, input_sizes: list[int], source_dtype: str, *, largest_input: bool) -> None:
        """Output (scaled by --dtype) + the dense merge + one downloaded shard must fit."""
        scale = _ITEMSIZE[self.target] / _ITEMSIZE.get(source_dtype, 2) if self.target else 1.0
        output = int(sum(input_sizes) * scale)
        extra = max(input_sizes, default=0) if largest_input else 0
        self.store.check_free(output + extra + max(input_sizes, default=0), f"pulling {self.name}")

    def _keep(self, path: Path, rel: str) -> None:
        shutil.copyfile(path, self.build / rel)

    def _file_progress(self, file: str, phase: str) -> Callable[[int, int | None], None]:
        def report(done: int, total: int | None) -> None:
            self.emit(PullEvent("file", file=file, phase=phase, done=done, total=total))

        return report

    def _finish(
        self, resharder: Resharder, expected: set[str] | None, spec: ModelSpec, source: Source
    ) -> StoredModel:
        self.emit(PullEvent("status", "checking every tensor is accounted for and writing dense weights"))
        result = resharder.finish(expected)
        stored_spec = dataclasses.replace(spec, dtype=DTYPE_NAMES.get(result.expert_dtype, spec.dtype))
        files = {rel: FileEntry(w.size, w.sha256) for rel, w in result.files.items()}
        for meta in sorted(hub.METADATA_FILES):
            path = self.build / meta
            if path.is_file():
                files[meta] = FileEntry(path.stat().st_size, sha256_file(path))
        manifest = Manifest(
            name=self.name,
            source=source,
            spec=stored_spec,
            files=dict(sorted(files.items())),
            created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            source_dtype=spec.dtype,
            stats={
                "source_tensors": result.source_tensors,
                "dense_tensors": result.dense_tensors,
                "expert_files": result.expert_files,
                "ignored_tensors": result.ignored,
            },
        )
        save(manifest, self.build)
        model = self.store.publish(self.name, self.build)
        shutil.rmtree(self.partial, ignore_errors=True)
        return model
