"""Reading routed-expert files from the store into caller-owned buffers.

An expert file is safetensors with exactly `gate_proj` [I, D], `up_proj` [I, D], `down_proj` [D, I],
stored back to back, data starting at byte 4096 (the store pads the header). So one aligned read
of the whole file lands the data at a fixed offset: with O_DIRECT where the filesystem allows it,
else a buffered read followed by POSIX_FADV_DONTNEED so the page cache does not quietly hold the
model and the memory budget means what it says. Torch-free: buffers are anything writable.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from moeinf.errors import CorruptExpertFile

ALIGN = 4096
DATA_OFFSET = ALIGN  # where the store puts tensor data in every expert file
PROJ_ORDER = ("gate_proj", "up_proj", "down_proj")
_DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class ExpertLayout:
    """Shape and dtype shared by every routed expert of a model. D hidden, I expert hidden."""

    hidden: int
    expert_dim: int
    dtype: str  # the stored dtype: "bfloat16", "float16" or "float32"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"unsupported expert dtype {self.dtype!r}")

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][1]

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        d, i = self.hidden, self.expert_dim
        return {"gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}

    @property
    def data_bytes(self) -> int:
        return 3 * self.hidden * self.expert_dim * self.itemsize

    @property
    def file_bytes(self) -> int:
        return DATA_OFFSET + self.data_bytes

    @property
    def read_bytes(self) -> int:
        """Bytes one aligned read covers: header page + data, rounded to the I/O block."""
        return round_up(self.file_bytes)


def check_header(raw: bytes | memoryview, layout: ExpertLayout, file_size: int, path: Path) -> None:
    """Validate an expert file's safetensors header against the model's layout; name the file if bad."""

    def bad(why: str) -> CorruptExpertFile:
        hint = "run `moeinf show MODEL --verify`, then pull again"
        return CorruptExpertFile(f"corrupt expert file {path}: {why} ({hint})")

    if file_size < 8:
        raise bad(f"only {file_size} bytes")
    (n,) = struct.unpack("<Q", bytes(raw[:8]))
    if 8 + n != DATA_OFFSET:
        raise bad(f"tensor data starts at byte {8 + n}, expected {DATA_OFFSET}")
    try:
        header = json.loads(bytes(raw[8 : 8 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("unreadable header") from None
    header.pop("__metadata__", None)
    if sorted(header) != sorted(PROJ_ORDER):
        raise bad(f"tensors {sorted(header)}, expected {list(PROJ_ORDER)}")
    want_dtype, itemsize = _DTYPES[layout.dtype]
    offset = 0
    for name in PROJ_ORDER:
        info = header[name]
        shape = tuple(info.get("shape", ()))
        size = shape[0] * shape[1] * itemsize if len(shape) == 2 else -1
        if info.get("dtype") != want_dtype or shape != layout.shapes[name]:
            want = f"{want_dtype} {list(layout.shapes[name])}"
            raise bad(f"{name} is {info.get('dtype')} {list(shape)}, expected {want}")
        if info.get("data_offsets") != [offset, offset + size]:
            raise bad(f"{name} is not stored in order gate, up, down")
        offset += size
    if file_size != layout.file_bytes:
        raise bad(f"{file_size} bytes, expected {layout.file_bytes} (truncated?)")


class ExpertReader:
    """Reads whole expert files into buffers of at least `layout.read_bytes` (page aligned for O_DIRECT).

    `mode` is "direct" (O_DIRECT) or "buffered" (read then drop the pages); it is decided by the first
    file opened: filesystems such as tmpfs refuse O_DIRECT.
    """

    def __init__(self, layout: ExpertLayout, *, direct: bool = True) -> None:
        self.layout = layout
        self.mode: str | None = None if direct and hasattr(os, "O_DIRECT") else "buffered"

    def probe(self, path: Path) -> str:
        """Decide the read mode now (direct or buffered) by opening one expert file; returns it."""
        if self.mode is None:
            try:
                os.close(self._open(path))
            except FileNotFoundError:
                pass
        return self.mode or "direct"

    def _open(self, path: Path) -> int:
        if self.mode != "buffered":
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                self.mode = "direct"
                return fd
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self.mode = "buffered"
        return os.open(path, os.O_RDONLY)

    def read_into(self, path: Path, buf: memoryview) -> None:
        """Fill `buf[:layout.file_bytes]` with the file (data at DATA_OFFSET); validates the header."""
        want = self.layout.read_bytes
        if len(buf) < want:
            raise ValueError(f"buffer of {len(buf)} bytes, need {want}")
        try:
            fd = self._open(path)
        except FileNotFoundError:
            raise CorruptExpertFile(f"expert file missing: {path} (was the model removed?)") from None
        try:
            size = os.fstat(fd).st_size
            done = 0
            # O_DIRECT needs block-aligned lengths: read whole blocks; the last read comes back short.
            while done < min(size, want):
                n = os.preadv(fd, [buf[done:want]], done)
                if n == 0:
                    break
                done += n
            if self.mode == "buffered":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise CorruptExpertFile(f"cannot read expert file {path}: {e.strerror}") from None
        finally:
            os.close(fd)
        check_header(buf[:DATA_OFFSET], self.layout, size, path)
        if done < self.layout.file_bytes:
            raise CorruptExpertFile(
                f"corrupt expert file {path}: read {done} of {self.layout.file_bytes} bytes"
            )
