"""DeepSeek-V2 (and V2-Lite) adapter: MLA, softmax routing, greedy or group_limited_greedy (best
groups by max score) top-k, weights scaled by routed_scaling_factor, never renormalised (transformers'
DeepseekV2TopkRouter ignores norm_topk_prob, so a config that sets it is refused), rope on
interleaved pairs (transformers applies it as a complex product).

Reference: transformers models/deepseek_v2 (configuration + modeling).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeinf.errors import InvalidSpec
from moeinf.models.adapters import base, mla
from moeinf.models.spec import ModelSpec, RoutingSpec


class DeepseekV2Adapter:
    family = "deepseek_v2"

    def spec(self, config: Mapping[str, Any]) -> ModelSpec:
        if config.get("scoring_func", "softmax") != "softmax":
            raise InvalidSpec(f"DeepSeek-V2 scoring_func {config.get('scoring_func')!r} is not supported")
        if config.get("norm_topk_prob"):
            raise InvalidSpec("DeepSeek-V2 with norm_topk_prob=true is not supported")
        method = config.get("topk_method") or "greedy"
        scale = float(config.get("routed_scaling_factor") or 1.0)
        if method == "greedy":
            routing = RoutingSpec(scoring="softmax", routed_scaling_factor=scale, logits_fp32=True)
        elif method == "group_limited_greedy":
            routing = RoutingSpec(
                scoring="softmax",
                n_group=base.need(config, "n_group"),
                topk_group=base.need(config, "topk_group"),
                group_scoring="max",
                routed_scaling_factor=scale,
                logits_fp32=True,
            )
        else:
            raise InvalidSpec(
                f"unsupported DeepSeek-V2 topk_method {method!r} (greedy, group_limited_greedy)"
            )
        return mla.deepseek_spec(config, self.family, routing=routing, interleaved=True)

    def map_tensor(self, hf_key: str, spec: ModelSpec) -> base.Mapped:
        return base.map_standard(hf_key, spec, mla.RENAMES)
