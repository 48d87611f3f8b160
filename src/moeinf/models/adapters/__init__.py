"""Architecture adapters: `adapter_for(config)` picks the one for a Hugging Face config's model_type.

Each family module turns config.json into a ModelSpec and hub tensor keys into canonical names
(models/weights.py). Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeinf.errors import UnsupportedArchitecture
from moeinf.models.adapters.base import Adapter, DenseTensor, ExpertTensor, IgnoredTensor, Mapped
from moeinf.models.adapters.deepseek_v2 import DeepseekV2Adapter
from moeinf.models.adapters.deepseek_v3 import DeepseekV3Adapter
from moeinf.models.adapters.mixtral import MixtralAdapter
from moeinf.models.adapters.olmoe import OlmoeAdapter
from moeinf.models.adapters.qwen2_moe import Qwen2MoeAdapter
from moeinf.models.adapters.qwen3_moe import Qwen3MoeAdapter

ADAPTERS: dict[str, Adapter] = {
    a.family: a
    for a in (
        MixtralAdapter(),
        Qwen2MoeAdapter(),
        Qwen3MoeAdapter(),
        OlmoeAdapter(),
        DeepseekV2Adapter(),
        DeepseekV3Adapter(),
    )
}
FAMILIES = tuple(ADAPTERS)


def adapter_for(config: Mapping[str, Any]) -> Adapter:
    """The adapter for `config["model_type"]`; UnsupportedArchitecture names the supported families."""
    model_type = config.get("model_type")
    adapter = ADAPTERS.get(str(model_type))
    if adapter is None:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}; supported: {', '.join(FAMILIES)}"
        )
    return adapter


__all__ = [
    "ADAPTERS",
    "FAMILIES",
    "Adapter",
    "DenseTensor",
    "ExpertTensor",
    "IgnoredTensor",
    "Mapped",
    "adapter_for",
]
