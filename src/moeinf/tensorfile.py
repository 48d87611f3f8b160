"""Raw safetensors headers: read one, and write files whose tensor data starts 4096-byte aligned.

The format is an 8-byte little-endian header length, a JSON header (`name -> {dtype, shape,
data_offsets}` relative to the data start, plus optional `__metadata__`), then the data. The
`safetensors` library cannot align the data start, so the store writes files here: the JSON is
padded with spaces (which the format allows) until the data begins at a multiple of `ALIGN`.
Tensor bytes are streamed from byte ranges of other files, so no tensor is ever held whole in RAM
unless a dtype conversion asks for it. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

ALIGN = 4096
CHUNK = 16 << 20  # bytes per read while copying a tensor
MAX_HEADER = 100 << 20  # the safetensors library's own limit

ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}  # spec dtype name -> safetensors code
DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}


class HeaderError(ValueError):
    """Not a readable safetensors file (callers turn this into their own MoeinfError)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: absolute byte range [start, end) of `path`."""

    path: Path
    name: str
    dtype: str  # safetensors code: "BF16", "F32", ...
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors of a safetensors file (in file order) and its `__metadata__`."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise HeaderError(f"{path.name}: too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER or 8 + header_len > size:
            raise HeaderError(f"{path.name}: header length {header_len} is invalid")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HeaderError(f"{path.name}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise HeaderError(f"{path.name}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = []
    for name, entry in header.items():
        try:
            dtype, shape = entry["dtype"], tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise HeaderError(f"{path.name}: malformed entry for tensor {name!r}") from exc
        count = 1
        for n in shape:
            count *= n
        if dtype not in ITEMSIZE or end - begin != count * ITEMSIZE[dtype] or data_start + end > size:
            raise HeaderError(f"{path.name}: tensor {name!r} has inconsistent dtype, shape or offsets")
        tensors.append(TensorInfo(path, name, dtype, shape, data_start + begin, data_start + end))
    tensors.sort(key=lambda t: t.start)
    return {t.name: t for t in tensors}, metadata


# A writer puts exactly `nbytes` bytes of one tensor into the open output file.
Writer = Callable[[BinaryIO], None]


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    write: Writer


def copy_range(src: TensorInfo) -> Writer:
    """A writer that streams `src`'s bytes in CHUNK-sized reads."""

    def write(out: BinaryIO) -> None:
        with open(src.path, "rb") as f:
            f.seek(src.start)
            left = src.nbytes
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise HeaderError(f"{src.path.name}: unexpected end of file in tensor {src.name!r}")
                out.write(chunk)
                left -= len(chunk)

    return write


def from_bytes(data: bytes | memoryview) -> Writer:
    return lambda out: out.write(data)


class _HashingFile:
    """A write-only file that hashes what passes through (so the manifest needs no second read)."""

    def __init__(self, f: BinaryIO) -> None:
        self._f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.size


@dataclass(frozen=True)
class WrittenFile:
    size: int
    sha256: str


def write_tensor_file(
    path: Path, tensors: Iterable[OutTensor], *, metadata: dict[str, str] | None = None, align: int = ALIGN
) -> WrittenFile:
    """Write `tensors` back to back, in the given order, data starting at a multiple of `align`.

    Returns size and sha256 of the file. Written to `path` directly (fsynced); callers build in a
    temporary folder.
    """
    tensors = list(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    data_start = -(-(8 + len(text)) // align) * align
    text += b" " * (data_start - 8 - len(text))
    with open(path, "wb") as raw:
        out = _HashingFile(raw)
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for t in tensors:
            before = out.tell()
            t.write(out)  # type: ignore[arg-type]
            if out.tell() - before != t.nbytes:
                raise HeaderError(
                    f"{path.name}: wrote {out.tell() - before} bytes for {t.name!r}, not {t.nbytes}"
                )
        raw.flush()
        os.fsync(raw.fileno())
    return WrittenFile(out.size, out.sha256.hexdigest())


class AppendableTensorFile:
    """A safetensors file written tensor by tensor across sessions, its header written last.

    The data region starts at `reserve_data_start(names_shapes)`: room for the largest header those
    tensors can need (any dtype code, 15-digit offsets), so tensors can be appended as they arrive
    and the exact header, space-padded, fills the reserved room at the end. `entries` and `length`
    are the caller's to persist; reopening with them truncates anything written after that point.
    """

    def __init__(self, path: Path, data_start: int, entries: list | None = None, length: int = 0) -> None:
        self.path, self.data_start = path, data_start
        self.entries: list[list] = [list(e) for e in entries or []]  # [name, dtype, shape, begin, end]
        self.length = length
        mode = "r+b" if path.exists() else "w+b"
        with open(path, mode) as f:
            f.truncate(data_start + length)  # drop bytes written after the last saved point

    def append(self, tensors: Iterable[OutTensor]) -> None:
        """Write tensors after the current end and fsync; the entries/length advance only on success."""
        entries, length = [], self.length
        with open(self.path, "r+b") as f:
            f.seek(self.data_start + length)
            for t in tensors:
                before = f.tell()
                t.write(f)
                if f.tell() - before != t.nbytes:
                    raise HeaderError(f"{self.path.name}: wrote {f.tell() - before} bytes for {t.name!r}")
                entries.append([t.name, t.dtype, list(t.shape), length, length + t.nbytes])
                length += t.nbytes
            f.flush()
            os.fsync(f.fileno())
        self.entries += entries
        self.length = length

    def finish(self) -> WrittenFile:
        """Write the header into the reserved room; return the file's size and sha256."""
        header = {
            name: {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
            for name, dtype, shape, begin, end in self.entries
        }
        text = json.dumps(header, separators=(",", ":")).encode()
        room = self.data_start - 8
        if len(text) > room:
            raise HeaderError(f"{self.path.name}: header of {len(text)} bytes exceeds the reserved {room}")
        digest = hashlib.sha256()
        with open(self.path, "r+b") as f:
            f.write(struct.pack("<Q", room) + text + b" " * (room - len(text)))
            f.flush()
            os.fsync(f.fileno())
            f.seek(0)
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        return WrittenFile(self.data_start + self.length, digest.hexdigest())


def reserve_data_start(names_shapes: dict[str, tuple[int, ...]], align: int = ALIGN) -> int:
    """Data start (a multiple of `align`) leaving room for any header of these tensors."""
    widest = max(len(code) for code in ITEMSIZE)
    big = 10**15 - 1
    header = {
        name: {"dtype": "X" * widest, "shape": list(shape), "data_offsets": [big, big]}
        for name, shape in names_shapes.items()
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    return -(-(8 + len(text)) // align) * align


def data_start(path: Path) -> int:
    """Byte offset where a safetensors file's tensor data begins."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
    return 8 + header_len
