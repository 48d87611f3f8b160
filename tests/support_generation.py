"""A test double of the decoder for the generation loop's logic, and an Engine built around it (test-only).

`PrefixHashDecoderDouble` is NOT a model: its logits at a position are a pseudo-random function of all
tokens up to it, read from a KV cache it keeps like the real decoder, so a wrong position or a wrongly
reused cache changes the output. The real decoder is exercised end to end in test_run_e2e.py.
"""

from __future__ import annotations

import hashlib

import torch

from moeinf.runtime.engine import Engine
from moeinf.runtime.tokenizer import Tokenizer


class PrefixHashDecoderDouble:
    """Test double: logits[p] = randn seeded by hash(tokens[0..p]); `script[n]` forces the token after n."""

    def __init__(self, vocab: int, max_seq_len: int, script: dict[int, int] | None = None) -> None:
        self.vocab, self.max_seq_len, self.script = vocab, max_seq_len, script or {}
        self.cache: list[int] = []
        self.calls: list[tuple[list[int], int]] = []
        self.resets = 0

    def _logits(self, prefix: list[int]) -> torch.Tensor:
        if len(prefix) in self.script:
            row = torch.full((self.vocab,), -10.0)
            row[self.script[len(prefix)]] = 10.0
            return row
        seed = int.from_bytes(hashlib.sha256(repr(prefix).encode()).digest()[:8], "little")
        return torch.randn(self.vocab, generator=torch.Generator().manual_seed(seed))

    def forward(self, tokens: torch.Tensor, start_pos: int, *, last_only: bool = False) -> torch.Tensor:
        assert tokens.dtype == torch.long and tokens.dim() == 1 and len(tokens) >= 1
        assert start_pos <= len(self.cache), "attends to positions that were never written"
        assert start_pos + len(tokens) <= self.max_seq_len, "past the preallocated KV cache"
        self.calls.append((tokens.tolist(), start_pos))
        del self.cache[start_pos:]
        rows = []
        for t in tokens.tolist():
            self.cache.append(t)
            rows.append(self._logits(self.cache))
        return torch.stack(rows[-1:] if last_only else rows)  # [T, V]

    def reset(self) -> None:
        self.cache.clear()
        self.resets += 1


def make_engine(tokenizer: Tokenizer, *, context: int = 256, script=None, eos=None) -> Engine:
    eos_ids = frozenset([tokenizer.eos_token_id]) if eos is None else frozenset(eos)
    return Engine(
        decoder=PrefixHashDecoderDouble(tokenizer.vocab_size, context, script),
        tokenizer=tokenizer,
        device=torch.device("cpu"),
        dtype=torch.float32,
        context_length=context,
        eos_token_ids=eos_ids,
    )
