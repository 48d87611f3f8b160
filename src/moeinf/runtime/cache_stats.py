"""Expert-cache statistics, per layer and in total.

`hits + misses == requests` always: a request is one (layer, expert) the model needed at one step;
a hit means no new fetch was needed (resident, or already in flight from a prefetch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class LayerStats:
    requests: int = 0
    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    bypassed: int = 0  # misses served from a scratch slot, evicting nothing (bulk prefill)
    bytes_read: int = 0  # from the store (disk)
    bytes_h2d: int = 0  # host -> device copies
    stall_s: float = 0.0  # time the model waited for experts

    def add(self, other: LayerStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class CacheStats:
    def __init__(self) -> None:
        self.layers: dict[int, LayerStats] = {}

    def layer(self, layer: int) -> LayerStats:
        stats = self.layers.get(layer)
        if stats is None:
            stats = self.layers[layer] = LayerStats()
        return stats

    def total(self) -> LayerStats:
        total = LayerStats()
        for stats in self.layers.values():
            total.add(stats)
        return total

    def to_dict(self) -> dict:
        total = self.total()
        out = asdict(total)
        out["hit_rate"] = total.hits / total.requests if total.requests else 0.0
        out["per_layer"] = {str(k): asdict(v) for k, v in sorted(self.layers.items())}
        return out
