"""Streaming detokenisation: generated token ids -> text deltas that are safe to show at once.

`StreamDecoder` never emits a partial character (a multi-byte UTF-8 character split over byte-level or
byte-fallback tokens is held until complete) and loses nothing at token boundaries: it decodes a small
sliding window of ids twice (before and after the new token) and emits the difference, the method of
text-generation-inference and vLLM, so that decoders that depend on neighbours (Metaspace `▁`, Strip)
stay right. `StopMatcher` cuts the text before the first stop string, also when a stop string is split
over several tokens, and holds back text that could still become one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"  # what a decoder writes for incomplete or invalid UTF-8
_CONTEXT_TOKENS = 5  # prompt tokens decoded ahead of the first generated one (for leading spaces)


class TokenDecoder(Protocol):
    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str: ...


class StreamDecoder:
    """Turns token ids, one at a time, into text deltas whose concatenation is the decoded text.

    `context` are the ids before the first generated one (the prompt): the deltas then read as a
    continuation of the prompt (" brown" after "The quick", where decoding "brown" alone drops the space).
    """

    def __init__(
        self, tokenizer: TokenDecoder, *, context: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(context[-_CONTEXT_TOKENS:])
        # Start the window where the prompt's text is whole (not inside a split character).
        while self._ids and self._decode(self._ids).startswith(REPLACEMENT):
            self._ids.pop(0)
        self._prefix = 0  # window start: text before it was emitted long ago
        self._read = len(self._ids)  # text of ids[prefix:read] is already emitted (or is context)
        # A prompt ending inside a character: its last bytes count as not yet shown, so the character
        # is emitted whole once the generated tokens complete it.
        while self._read and self._decode(self._ids[: self._read]).endswith(REPLACEMENT):
            self._read -= 1
        self.text = ""  # everything emitted so far

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Take one generated id; return the newly complete text (possibly empty)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end of generation: whatever is still held (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith(REPLACEMENT) and not final):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self._ids)
        self.text += delta
        return delta


class StopMatcher:
    """Cuts streamed text before the first occurrence of any stop string.

    `feed(delta)` returns `(text to emit now, stopped)`. Text that ends with the beginning of a stop
    string is held back until the next delta shows whether the stop string completes.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._stops:
            return delta, False
        buffer = self._held + delta
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buffer[: min(hits)], True
        keep = self._longest_partial_stop(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """At the end of generation without a stop: release the held-back text."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial_stop(self, buffer: str) -> int:
        # Length of the longest suffix of `buffer` that is a proper prefix of some stop string.
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
