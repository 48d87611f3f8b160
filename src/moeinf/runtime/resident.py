"""ResidentProvider: reads each routed expert from its store file the first time it is needed and keeps
it on the compute device (no budget). The budgeted expert cache replaces it later; nothing is read
at start-up.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch

from moeinf.runtime.expert_provider import ExpertWeights


class ExpertFiles(Protocol):
    """What the provider needs of `moeinf.store.StoredModel`."""

    def expert_path(self, layer: int, expert: int) -> Path: ...


class ResidentProvider:
    def __init__(self, stored_model: ExpertFiles, device: torch.device | str, dtype: torch.dtype) -> None:
        self.stored_model, self.device, self.dtype = stored_model, torch.device(device), dtype
        self.resident: dict[tuple[int, int], ExpertWeights] = {}
        self.reads = 0  # expert files read so far

    def all_ready(self, layer: int, expert_ids: Sequence[int]) -> bool:
        return all((layer, e) in self.resident for e in expert_ids)

    def experts(
        self, layer: int, expert_ids: Sequence[int], *, hold: bool = False
    ) -> Iterator[tuple[int, ExpertWeights]]:
        for expert in dict.fromkeys(expert_ids):  # kept forever: `hold` changes nothing here
            key = (layer, expert)
            weights = self.resident.get(key)
            if weights is None:
                weights = self._read(layer, expert)
                self.resident[key] = weights
            yield expert, weights

    def _read(self, layer: int, expert: int) -> ExpertWeights:
        from safetensors.torch import load_file

        tensors = load_file(str(self.stored_model.expert_path(layer, expert)))
        self.reads += 1
        return ExpertWeights(
            *(
                tensors[p].to(device=self.device, dtype=self.dtype)
                for p in ("gate_proj", "up_proj", "down_proj")
            )
        )
