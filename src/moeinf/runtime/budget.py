"""Memory budgets: parse `--ram-mem` / `--gpu-mem` values and turn them into slot counts.

A SIZE is bytes with an optional binary or decimal unit (`6GiB`, `512MiB`, `1.5GB`, `4096`) or a
percentage of the model's routed-expert bytes (`25%`). Pure Python: no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from moeinf.errors import BadOption, BudgetTooSmall

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True)
class Size:
    """A parsed SIZE: absolute bytes, or a fraction of the routed-expert bytes."""

    bytes: int | None = None
    fraction: float | None = None

    def resolve(self, total_expert_bytes: int) -> int:
        if self.fraction is not None:
            return int(self.fraction * total_expert_bytes)
        assert self.bytes is not None
        return self.bytes

    def __str__(self) -> str:
        return f"{self.fraction * 100:g}%" if self.fraction is not None else format_bytes(self.bytes or 0)


def parse_size(text: str) -> Size:
    """`"25%"` -> Size(fraction=0.25); `"6GiB"` -> Size(bytes=6 * 2**30). Raises BadOption."""
    value = text.strip()
    if value.endswith("%"):
        try:
            pct = float(value[:-1])
        except ValueError:
            raise BadOption(f"bad size {text!r}: expected a percentage like 25%") from None
        if not 0 < pct <= 100:
            raise BadOption(f"bad size {text!r}: a percentage must be in (0, 100]")
        return Size(fraction=pct / 100)
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise BadOption(f"bad size {text!r}: expected bytes like 512MiB, 6GiB, 2GB or a percentage like 25%")
    return Size(bytes=int(float(match.group(1)) * _UNITS[unit]))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def slots_for(
    budget_bytes: int, slot_bytes: int, *, num_experts_total: int, min_slots: int, what: str
) -> int:
    """How many expert slots a budget buys, capped at the number of experts; too few is an error."""
    slots = min(budget_bytes // slot_bytes, num_experts_total)
    if slots < min_slots:
        raise BudgetTooSmall(
            f"{what} budget {format_bytes(budget_bytes)} holds {slots} experts of "
            f"{format_bytes(slot_bytes)}; "
            f"a decode step needs at least {min_slots} (one layer's top-k): raise it to at least "
            f"{format_bytes(min_slots * slot_bytes)}"
        )
    return slots


def default_budget_bytes(available_bytes: int, dense_bytes: int, total_expert_bytes: int) -> tuple[int, str]:
    """The budget to use when the user names none, and why (for --verbose).

    Keeps a headroom of 20% of what is available (at least 1 GiB) for activations, the KV cache,
    the OS and other programs; never more than all experts.
    """
    headroom = max(1024**3, available_bytes // 5)
    usable = max(0, available_bytes - dense_bytes - headroom)
    if usable >= total_expert_bytes:
        return total_expert_bytes, (
            f"all experts ({format_bytes(total_expert_bytes)}) fit in "
            f"{format_bytes(available_bytes)} available"
        )
    return usable, (
        f"{format_bytes(available_bytes)} available - {format_bytes(dense_bytes)} dense weights - "
        f"{format_bytes(headroom)} headroom"
    )
