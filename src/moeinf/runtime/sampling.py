"""Sampling: the next token id from one position's logits, by a chain of steps built once from params.

The chain follows transformers' order so that the same settings mean the same thing: repetition
penalty, then temperature, top-k, top-p, min-p, then a draw from the softmax with a seeded
`torch.Generator`. Temperature 0 is argmax (after the repetition penalty), as `do_sample=False` is.
Reference: transformers `generation/logits_process.py`; mlx-lm `sample_utils.make_sampler`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from moeinf.errors import BadOption

# V = vocabulary size; N = context tokens seen so far (prompt + generated).
LogitsStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits [V], context [N]) -> [V]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; every default means "off". Temperature 0 = greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k
    top_p: float = 1.0  # 1: no nucleus cut
    min_p: float = 0.0  # 0: no min-p cut
    repeat_penalty: float = 1.0  # 1: none; >1 discourages tokens already in the context
    repeat_last_n: int = 0  # how many recent context tokens the penalty looks at; 0: all (transformers)
    seed: int | None = None  # None: a fresh random seed per request

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise BadOption(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise BadOption(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise BadOption(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise BadOption(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise BadOption(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise BadOption(f"repeat_last_n must be >= 0, got {self.repeat_last_n}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_generation_config(cls, config: Mapping[str, Any]) -> SamplingParams:
        """The model's own defaults (generation_config.json), read as transformers' `generate` reads them:
        greedy unless `do_sample`; then temperature 1, top-k 50 and top-p 1 where unset."""
        penalty = float(config.get("repetition_penalty") or 1.0)
        if not config.get("do_sample"):
            return cls(repeat_penalty=penalty)

        def get(key: str, default: float) -> float:
            value = config.get(key)
            return default if value is None else value

        return cls(
            temperature=float(get("temperature", 1.0)),
            top_k=int(get("top_k", 50)),
            top_p=float(get("top_p", 1.0)),
            min_p=float(get("min_p", 0.0)),
            repeat_penalty=penalty,
        )


def repetition_penalty(penalty: float, last_n: int) -> LogitsStep:
    def step(logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        ids = context[-last_n:] if last_n else context  # [N]
        if ids.numel() == 0:
            return logits
        seen = logits.gather(0, ids)  # [N]
        # Like transformers: shrink positive logits, push negative ones further down.
        seen = torch.where(seen < 0, seen * penalty, seen / penalty)
        return logits.scatter(0, ids, seen)

    return step


def temperature(value: float) -> LogitsStep:
    return lambda logits, context: logits / value


def top_k(k: int) -> LogitsStep:
    def step(logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        kth = torch.topk(logits, min(k, logits.numel())).values[-1]
        return logits.masked_fill(logits < kth, -float("inf"))

    return step


def top_p(p: float) -> LogitsStep:
    def step(logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = torch.sort(logits, descending=False)  # [V] ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - p)  # the low tail whose mass is at most 1 - p
        remove[-1] = False  # always keep the most likely token
        return logits.masked_fill(remove.scatter(0, order, remove), -float("inf"))

    return step


def min_p(p: float) -> LogitsStep:
    def step(logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=-1)  # [V]
        remove = probs < p * probs.max()
        remove[probs.argmax()] = False
        return logits.masked_fill(remove, -float("inf"))

    return step


class Sampler:
    """Picks the next token: `sampler(logits [V] fp32, context [N] int64) -> token id`."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu") -> None:
        self.params = params
        self._penalty: list[LogitsStep] = []
        if params.repeat_penalty != 1.0:
            self._penalty.append(repetition_penalty(params.repeat_penalty, params.repeat_last_n))
        self._warpers: list[LogitsStep] = []
        if not params.greedy:
            if params.temperature != 1.0:
                self._warpers.append(temperature(params.temperature))
            if params.top_k:
                self._warpers.append(top_k(params.top_k))
            if params.top_p < 1.0:
                self._warpers.append(top_p(params.top_p))
            if params.min_p > 0.0:
                self._warpers.append(min_p(params.min_p))
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.seed = seed
        self._generator = torch.Generator(device=torch.device(device)).manual_seed(seed)

    @property
    def needs_context(self) -> bool:
        """Whether the context ids matter (the repetition penalty reads them)."""
        return bool(self._penalty)

    def processed(self, logits: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The logits after the whole chain (filtered tokens at -inf); greedy stops after the penalty."""
        if context is None:
            context = torch.empty(0, dtype=torch.long, device=logits.device)
        for step in self._penalty:
            logits = step(logits, context)
        if self.params.greedy:
            return logits
        for step in self._warpers:
            logits = step(logits, context)
        return logits

    def __call__(self, logits: torch.Tensor, context: torch.Tensor | None = None) -> int:
        logits = self.processed(logits, context)  # [V]
        if self.params.greedy:
            return int(logits.argmax())
        probs = logits.softmax(dim=-1)  # [V]
        return int(torch.multinomial(probs, 1, generator=self._generator))
