"""DeepSeek-V3 adapter: MLA, sigmoid scoring, noaux_tc selection (groups ranked by the sum of their
top-2 biased scores; e_score_correction_bias steers selection only), optional renormalisation
(norm_topk_prob), routed_scaling_factor, rope interleaved iff rope_interleave. Multi-token-prediction
layers (index >= num_hidden_layers) are ignored, as transformers ignores them.

Reference: transformers models/deepseek_v3 (configuration + modeling).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from moeinf.errors import InvalidSpec
from moeinf.models.adapters import base, mla
from moeinf.models.spec import ModelSpec, RoutingSpec

_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


class DeepseekV3Adapter:
    family = "deepseek_v3"

    def spec(self, config: Mapping[str, Any]) -> ModelSpec:
        if config.get("scoring_func", "sigmoid") != "sigmoid":
            raise InvalidSpec(f"DeepSeek-V3 scoring_func {config.get('scoring_func')!r} is not supported")
        if config.get("topk_method", "noaux_tc") not in ("noaux_tc", None):
            raise InvalidSpec(f"unsupported DeepSeek-V3 topk_method {config.get('topk_method')!r} (noaux_tc)")
        routing = RoutingSpec(
            scoring="sigmoid",
            renormalize=bool(config.get("norm_topk_prob", True)),
            n_group=base.need(config, "n_group"),
            topk_group=base.need(config, "topk_group"),
            group_scoring="top2_sum",
            correction_bias=True,
            routed_scaling_factor=float(config.get("routed_scaling_factor", 2.5)),
            logits_fp32=True,
        )
        interleaved = config.get("rope_interleave", True)
        return mla.deepseek_spec(config, self.family, routing=routing, interleaved=bool(interleaved))

    def map_tensor(self, hf_key: str, spec: ModelSpec) -> base.Mapped:
        m = _LAYER_INDEX.match(hf_key)
        if m is not None and int(m.group(1)) >= spec.num_layers:
            return base.IgnoredTensor("multi-token-prediction layer (not used for decoding)")
        return base.map_standard(hf_key, spec, mla.RENAMES)
