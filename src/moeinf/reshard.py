"""Reshard a hub checkpoint into the store layout: `dense.safetensors` + one file per routed expert.

Input shards are consumed one at a time (`Resharder.add_shard`), so the caller may download a shard,
reshard it and delete it before fetching the next: peak extra disk is one shard, and RAM stays at a
copy buffer (or one tensor when `dtype` converts). Every input tensor is accounted for: the adapter
maps it to a dense name, a routed-expert projection, or an explicit ignore; `finish` proves the
result complete (every dense name the spec implies, every expert of every MoE layer, every tensor
the index lists) or fails naming the tensor. dense.safetensors grows in place (its header room is
reserved up front and filled last), so no dense copy is ever merged. Progress is saved after each
shard in `.reshard/`, so a killed pull resumes at the next shard; expert projections split across
shards wait there too.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeinf.errors import InvalidCheckpoint, ReshardError
from moeinf.models.adapters import Adapter, DenseTensor, ExpertTensor, IgnoredTensor
from moeinf.models.spec import ModelSpec
from moeinf.models.weights import EXPERT_PROJS, dense_shapes, expert_shapes
from moeinf.store import DENSE_FILE, expert_file
from moeinf.tensorfile import (
    DTYPE_CODES,
    AppendableTensorFile,
    HeaderError,
    OutTensor,
    TensorInfo,
    Writer,
    WrittenFile,
    copy_range,
    read_header,
    reserve_data_start,
    write_tensor_file,
)

WORK_DIR = ".reshard"
_FLOAT_CODES = ("F32", "F16", "BF16")

# (bytes done, bytes total) within the shard being resharded
ShardProgress = Callable[[int, int], None]


@dataclass
class ReshardResult:
    files: dict[str, WrittenFile]  # store-relative path -> size, sha256 (dense + experts)
    source_tensors: int
    dense_tensors: int
    expert_files: int
    ignored: dict[str, str] = field(default_factory=dict)  # hub key -> why it is not stored
    expert_dtype: str = ""


def _convert(src: TensorInfo, target: str) -> Writer:
    """A writer that reads one whole tensor and writes it converted to `target` (a safetensors code)."""

    def write(out: Any) -> None:
        import torch

        codes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        if src.nbytes == 0:
            return
        with open(src.path, "rb") as f:
            f.seek(src.start)
            buf = bytearray(f.read(src.nbytes))
        tensor = torch.frombuffer(buf, dtype=codes[src.dtype]).to(codes[target])
        out.write(memoryview(tensor.view(torch.uint8).numpy()))

    return write


class Resharder:
    """Builds the store layout in `out_dir` from shards handed over one by one.

    `dtype` ("bfloat16"/"float16"/"float32" or None to keep) converts floating-point tensors.
    """

    def __init__(self, adapter: Adapter, spec: ModelSpec, out_dir: Path, *, dtype: str | None = None) -> None:
        self.adapter, self.spec, self.out = adapter, spec, Path(out_dir)
        self.work = self.out / WORK_DIR
        self.target = DTYPE_CODES[dtype] if dtype else None
        self._dense_shapes = dense_shapes(spec)
        self._expert_shapes = expert_shapes(spec)
        self._state_path = self.work / "state.json"
        if self._state_path.is_file():
            self.state = json.loads(self._state_path.read_text())
            if self.state.get("target") != self.target:
                raise ReshardError("an unfinished reshard used another --dtype; remove it and pull again")
        else:
            self.state = {
                "target": self.target,
                "shards": {},  # shard name -> hub keys it held
                "dense": {},  # canonical name -> hub key
                "dense_entries": [],  # dense.safetensors so far: [name, dtype, shape, begin, end]
                "dense_length": 0,
                "experts": {},  # expert file -> [size, sha256]
                "pending": {},  # expert file -> proj -> {key, dtype, shape, file}
                "ignored": {},
                "expert_dtype": None,
            }
        self._seen = {key for keys in self.state["shards"].values() for key in keys}
        # dense.safetensors grows in place, shard by shard (no per-shard parts to merge later)
        self.out.mkdir(parents=True, exist_ok=True)
        self._dense = AppendableTensorFile(
            self.out / DENSE_FILE,
            reserve_data_start(self._dense_shapes),
            self.state["dense_entries"],
            self.state["dense_length"],
        )

    @property
    def done_shards(self) -> set[str]:
        return set(self.state["shards"])

    # --- one shard ------------------------------------------------------------------------------

    def add_shard(
        self, path: Path, *, name: str | None = None, progress: ShardProgress | None = None
    ) -> None:
        """Reshard every tensor of one safetensors shard (a no-op if `name` was already done)."""
        name = name or path.name
        if name in self.state["shards"]:
            return
        try:
            tensors, _ = read_header(path)
        except (HeaderError, OSError) as exc:
            raise InvalidCheckpoint(f"cannot read weights file {name}: {exc}") from exc
        self.work.mkdir(parents=True, exist_ok=True)
        dense: list[tuple[str, TensorInfo]] = []
        pieces: dict[str, dict[str, TensorInfo]] = {}  # expert file -> proj -> tensor in this shard
        for key, info in tensors.items():
            if key in self._seen:
                raise ReshardError(f"checkpoint tensor {key!r} appears in more than one shard")
            mapped = self.adapter.map_tensor(key, self.spec)  # UnmappedTensor names the key
            if isinstance(mapped, IgnoredTensor):
                self.state["ignored"][key] = mapped.reason
            elif isinstance(mapped, DenseTensor):
                self._check_dense(key, mapped.name, info)
                dense.append((mapped.name, info))
            elif isinstance(mapped, ExpertTensor):
                rel = expert_file(mapped.layer, mapped.expert)
                self._check_expert(key, rel, mapped.proj, info, pieces)
                pieces.setdefault(rel, {})[mapped.proj] = info
            else:  # an adapter returning something else is a programming error
                raise TypeError(f"adapter returned {mapped!r} for {key!r}")

        total = sum(t.nbytes for t in tensors.values())
        done = 0
        if dense:
            self._dense.append(self._out(cname, info) for cname, info in dense)
            self.state["dense_entries"], self.state["dense_length"] = self._dense.entries, self._dense.length
            done += sum(info.nbytes for _, info in dense)
            if progress:
                progress(done, total)
        consumed: list[Path] = []
        for rel, here in pieces.items():
            waiting = self.state["pending"].get(rel, {})
            if len(here) + len(waiting) == len(EXPERT_PROJS):
                parts = {**{p: self._pending_info(rel, p, w) for p, w in waiting.items()}, **here}
                self._write_expert(rel, parts)
                consumed += [self.work / w["file"] for w in waiting.values()]
                self.state["pending"].pop(rel, None)
            else:  # the rest of this expert lives in a later shard: keep our part
                for proj, info in here.items():
                    self._park(rel, proj, info)
            done += sum(info.nbytes for info in here.values())
            if progress:
                progress(done, total)
        self.state["shards"][name] = sorted(tensors)
        self._seen.update(tensors)
        self._save_state()
        if progress:
            progress(total, total)
        for stale in consumed:  # only after the state no longer points at them
            stale.unlink(missing_ok=True)

    def _check_dense(self, key: str, cname: str, info: TensorInfo) -> None:
        if cname in self.state["dense"]:
            raise ReshardError(
                f"checkpoint tensors {self.state['dense'][cname]!r} and {key!r} both map to {cname}"
            )
        want = self._dense_shapes.get(cname)
        if want is None or tuple(want) != info.shape:
            raise ReshardError(f"checkpoint tensor {key!r} has shape {list(info.shape)}, expected {want}")
        self.state["dense"][cname] = key

    def _check_expert(
        self, key: str, rel: str, proj: str, info: TensorInfo, pieces: dict[str, dict[str, TensorInfo]]
    ) -> None:
        want = self._expert_shapes[proj]
        if tuple(want) != info.shape:
            raise ReshardError(
                f"checkpoint tensor {key!r} has shape {list(info.shape)}, expected {list(want)}"
            )
        if (
            rel in self.state["experts"]
            or proj in pieces.get(rel, {})
            or proj in self.state["pending"].get(rel, {})
        ):
            raise ReshardError(f"checkpoint tensor {key!r} duplicates {proj} of {rel}")
        if info.dtype not in _FLOAT_CODES:
            raise ReshardError(
                f"checkpoint tensor {key!r} has dtype {info.dtype}; experts must be F32, F16 or BF16"
            )

    def _out(self, name: str, info: TensorInfo) -> OutTensor:
        if self.target and info.dtype in _FLOAT_CODES and info.dtype != self.target:
            count = info.nbytes // (4 if info.dtype == "F32" else 2)
            nbytes = count * (4 if self.target == "F32" else 2)
            return OutTensor(name, self.target, info.shape, nbytes, _convert(info, self.target))
        return OutTensor(name, info.dtype, info.shape, info.nbytes, copy_range(info))

    def _write_expert(self, rel: str, parts: dict[str, TensorInfo]) -> None:
        tensors = [self._out(proj, parts[proj]) for proj in EXPERT_PROJS]  # order: gate, up, down
        dtypes = {t.dtype for t in tensors}
        expected = self.state["expert_dtype"] or tensors[0].dtype
        if dtypes != {expected}:
            raise ReshardError(
                f"{rel}: expert tensors have dtypes {sorted(dtypes)}, expected {expected} throughout"
            )
        self.state["expert_dtype"] = expected
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        written = write_tensor_file(path, tensors)
        self.state["experts"][rel] = [written.size, written.sha256]

    def _park(self, rel: str, proj: str, info: TensorInfo) -> None:
        """Copy one projection out of the current shard (which may be deleted next) into .reshard/."""
        file = f"pending-{rel.replace('/', '-')}-{proj}.bin"
        with open(self.work / file, "wb") as out:
            copy_range(info)(out)
            out.flush()
            os.fsync(out.fileno())
        entry = {"dtype": info.dtype, "shape": list(info.shape), "file": file, "nbytes": info.nbytes}
        self.state["pending"].setdefault(rel, {})[proj] = entry

    def _pending_info(self, rel: str, proj: str, entry: dict[str, Any]) -> TensorInfo:
        path = self.work / entry["file"]
        return TensorInfo(path, proj, entry["dtype"], tuple(entry["shape"]), 0, entry["nbytes"])

    def _save_state(self) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self._state_path)

    # --- completion -----------------------------------------------------------------------------

    def finish(self, expected_keys: Iterable[str] | None = None) -> ReshardResult:
        """Prove the reshard complete, write dense.safetensors, drop the work folder."""
        if expected_keys is not None:
            missing = sorted(set(expected_keys) - self._seen)
            if missing:
                raise ReshardError(f"checkpoint tensor {missing[0]!r} is listed in the index but in no shard")
        for rel, waiting in sorted(self.state["pending"].items()):
            lacking = [p for p in EXPERT_PROJS if p not in waiting]
            raise ReshardError(f"checkpoint lacks {lacking[0]} of routed expert {rel}")
        for layer in self.spec.moe_layers:
            for expert in range(self.spec.num_experts):
                if expert_file(layer, expert) not in self.state["experts"]:
                    raise ReshardError(f"checkpoint lacks routed expert {expert} of layer {layer}")
        missing_dense = [name for name in self._dense_shapes if name not in self.state["dense"]]
        if missing_dense:
            raise ReshardError(f"checkpoint lacks tensor {missing_dense[0]}")

        files = {rel: WrittenFile(size, sha) for rel, (size, sha) in self.state["experts"].items()}
        files[DENSE_FILE] = self._dense.finish()
        shutil.rmtree(self.work, ignore_errors=True)
        return ReshardResult(
            files=dict(sorted(files.items())),
            source_tensors=len(self._seen),
            dense_tensors=len(self.state["dense"]),
            expert_files=len(self.state["experts"]),
            ignored=dict(self.state["ignored"]),
            expert_dtype=self.state["expert_dtype"],
        )


def shard_files(checkpoint: Path) -> tuple[list[str], set[str] | None]:
    """The weight files of a local hub-format folder, and the tensor keys its index lists (if any)."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return sorted(set(weight_map.values())), set(weight_map)
    files = sorted(p.name for p in checkpoint.glob("*.safetensors") if not p.name.startswith("consolidated"))
    return files, None


def reshard(
    checkpoint: Path,
    out_dir: Path,
    adapter: Adapter,
    spec: ModelSpec,
    *,
    dtype: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ReshardResult:
    """Reshard a complete local checkpoint folder (all shards present) into `out_dir`."""
    files, expected = shard_files(checkpoint)
    if not files:
        raise InvalidCheckpoint(f"{checkpoint} holds no *.safetensors weights")
    resharder = Resharder(adapter, spec, out_dir, dtype=dtype)
    for name in files:

        def report(done: int, total: int, name: str = name) -> None:
            if progress:
                progress(name, done, total)

        resharder.add_shard(checkpoint / name, name=name, progress=report)
    return resharder.finish(expected)
