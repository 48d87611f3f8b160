"""ExpertKey: the name of one routed expert, `(layer, expert)`.

Pure Python and hashable, so the cache policy, the tracer and the simulator share it without torch.
"""

from typing import NamedTuple


class ExpertKey(NamedTuple):
    layer: int
    expert: int
