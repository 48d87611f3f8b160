"""The contract between the decoder's MoE block and whatever supplies routed-expert weights.

The MoE block never touches files: it routes, then asks a provider for the experts it needs and
computes each one as it is handed over. Providers: `runtime.resident` (read once, keep: all-resident)
and the budgeted expert cache (`runtime.expert_cache`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch


class ExpertWeights(NamedTuple):
    """One routed SwiGLU expert: down(silu(gate(x)) * up(x)). I = expert hidden, D = model hidden."""

    gate_proj: torch.Tensor  # [I, D]
    up_proj: torch.Tensor  # [I, D]
    down_proj: torch.Tensor  # [D, I]


class ExpertProvider(Protocol):
    def experts(self, layer: int, expert_ids: Sequence[int]) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield `(expert_id, weights)` once for each distinct id in `expert_ids`.

        Order is the provider's choice: resident experts come first, missing ones as their
        transfers complete, so the caller computes while the rest are in flight. The weights are
        on the compute device in the compute dtype and stay valid only until the iterator is
        advanced or closed (the cache may then reuse the slot).
        """
        ...


@runtime_checkable
class HoldingProvider(Protocol):
    """A provider that can hand over a layer's experts all at once (the fused decode kernel needs every
    routed expert of the token at the same time)."""

    def all_ready(self, layer: int, expert_ids: Sequence[int]) -> bool:
        """Whether every one of these experts can be handed over now, without waiting for a transfer."""
        ...

    def experts(
        self, layer: int, expert_ids: Sequence[int], *, hold: bool = False
    ) -> Iterator[tuple[int, ExpertWeights]]:
        """As `ExpertProvider.experts`; with `hold`, every weight handed over stays valid until the
        iterator is closed or runs out (so take exactly as many items as ids, then close it)."""
        ...


@runtime_checkable
class LookaheadProvider(Protocol):
    """A provider whose policy uses the next layer's router applied early to the current hidden state."""

    wants_lookahead: bool

    def lookahead(self, layer: int, expert_ids: Sequence[int]) -> None: ...


@runtime_checkable
class RequestAware(Protocol):
    """A provider that wants to know where requests start and end (its policy learns per request)."""

    def start_request(self) -> None: ...

    def end_request(self) -> None: ...
