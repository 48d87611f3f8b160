"""A fixed pool of equal expert slots, allocated once at start-up: no allocation in the decode loop.

A *raw* slot holds an expert file's image (header page, then data in the stored dtype), so one
read or one copy fills it. A *typed* slot holds only the data, converted to the compute dtype.
Each slot's `ExpertWeights` views are built once here.
"""

from __future__ import annotations

import mmap

import torch

from moeinf.runtime.expert_provider import ExpertWeights
from moeinf.runtime.expert_store import ALIGN, DATA_OFFSET, ExpertLayout, round_up

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


class SlotPool:
    def __init__(
        self,
        slots: int,
        layout: ExpertLayout,
        *,
        device: torch.device,
        dtype: torch.dtype,
        raw: bool,
        pin: bool = False,
    ) -> None:
        if raw and dtype != torch_dtype(layout.dtype):
            raise ValueError("a raw slot keeps the stored dtype")
        self.slots = slots
        self.layout = layout
        self.device = device
        self.dtype = dtype
        self.raw = raw
        itemsize = self.itemsize = torch.empty(0, dtype=dtype).element_size()
        data_bytes = 3 * layout.hidden * layout.expert_dim * itemsize
        self.slot_bytes = layout.read_bytes if raw else round_up(data_bytes)
        self._offset = DATA_OFFSET if raw else 0
        total = slots * self.slot_bytes
        self._mmap = None
        if device.type == "cpu" and not pin:
            # An anonymous mapping is page aligned, as O_DIRECT reads need; frombuffer views it in place.
            self._mmap = mmap.mmap(-1, total)
            if hasattr(mmap, "MADV_HUGEPAGE") and total >= 1 << 21:
                # 2 MB pages where the kernel allows them: a 5 MB expert spans 3 TLB entries, not 1300
                self._mmap.madvise(mmap.MADV_HUGEPAGE)
            self.buffer = torch.frombuffer(self._mmap, dtype=torch.uint8, count=total)
        else:
            self.buffer = torch.empty(total, dtype=torch.uint8, device=device, pin_memory=pin)
        self.aligned = device.type == "cpu" and self.buffer.data_ptr() % ALIGN == 0
        self._weights = [self._views(i) for i in range(slots)]

    def _views(self, slot: int) -> ExpertWeights:
        d, i = self.layout.hidden, self.layout.expert_dim
        start = slot * self.slot_bytes + self._offset
        flat = self.buffer[start : start + 3 * d * i * self.itemsize]
        flat = flat.view(self.dtype)  # [3 * I * D]
        gate = flat[: i * d].view(i, d)
        up = flat[i * d : 2 * i * d].view(i, d)
        down = flat[2 * i * d :].view(d, i)
        return ExpertWeights(gate, up, down)

    def weights(self, slot: int) -> ExpertWeights:
        return self._weights[slot]

    def raw_bytes(self, slot: int) -> torch.Tensor:
        """The whole slot as bytes (a raw slot's file image)."""
        return self.buffer[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]

    def memory(self, slot: int) -> memoryview:
        """A writable view of a host slot, for reads from the store."""
        if self._mmap is not None:
            return memoryview(self._mmap)[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]
        return memoryview(self.raw_bytes(slot).numpy())
