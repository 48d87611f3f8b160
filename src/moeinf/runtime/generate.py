"""Generation: prefill, then decode one token at a time, yielding a typed `Step` per generated token.

Owns the loop (`generate`), its parameters and events, stopping (EOS ids, stop strings, max tokens,
context full) and KV-cache reuse across calls: when a new prompt extends the tokens already in the
decoder's cache (the previous turn of a conversation), only the new tokens are prefilled. It never
prints: the CLI, the server and the benchmark render the same `Step` stream.
Reference: gpt-fast `generate.py` (prefill / decode_one_token), mlx-lm `stream_generate`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from moeinf.errors import BadOption, ContextTooLong
from moeinf.runtime.detokenizer import StopMatcher, StreamDecoder, TokenDecoder
from moeinf.runtime.sampling import Sampler, SamplingParams

FinishReason = Literal["stop", "length", "eos"]


class StepDecoder(Protocol):
    """What generation needs of the model (moeinf.models.transformer.Decoder)."""

    def forward(self, tokens: torch.Tensor, start_pos: int, *, last_only: bool = False) -> torch.Tensor:
        """tokens [T] at positions start_pos.. -> fp32 logits [T, V] ([1, V] with last_only); writes the
        KV cache there."""
        ...

    def reset(self) -> None: ...


class GenerationTarget(Protocol):
    """What `generate` needs of a loaded model (moeinf.runtime.engine.Engine). Optional: `prompt_done(
    tokens)`, called once the prompt has run (routing-trace recorders split prompt from answer there)."""

    decoder: StepDecoder
    tokenizer: TokenDecoder
    device: torch.device
    eos_token_ids: frozenset[int]
    context_length: int
    kv_tokens: list[int]  # the tokens whose keys/values are in the decoder's cache, in order

    def cache_stats(self) -> dict: ...

    def start_request(self) -> None: ...

    def end_request(self) -> None: ...


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int | None = None  # None: until EOS, a stop string, or the context is full
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # for benchmarks: run to max_tokens
    sampling: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise BadOption(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class Timings:
    prompt_tokens: int  # length of the prompt
    prompt_cached: int  # of which reused from the KV cache (not evaluated again)
    prompt_s: float  # prefill time: evaluating the uncached prompt tokens and sampling the first token
    generated: int  # tokens generated so far, this one included
    decode_s: float  # time spent on decode steps (each one forward + sample), after the prefill
    step_s: float  # this token's time (the prefill for the first)

    @property
    def prompt_evaluated(self) -> int:
        return self.prompt_tokens - self.prompt_cached

    @property
    def prompt_tps(self) -> float:
        return self.prompt_evaluated / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def decode_tokens(self) -> int:
        """Tokens produced by decode steps (the first one came from the prefill)."""
        return max(self.generated - 1, 0)

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prompt_cached": self.prompt_cached,
            "prompt_s": self.prompt_s,
            "prompt_tps": self.prompt_tps,
            "generated": self.generated,
            "decode_s": self.decode_s,
            "decode_tps": self.decode_tps,
        }


@dataclass(frozen=True)
class Step:
    """One generated token. `text` is the newly printable text (may be empty); the last step of a
    generation carries `finish_reason` and, in `cache`, the expert cache's statistics when it keeps any."""

    index: int
    token_id: int
    text: str
    timings: Timings
    finish_reason: FinishReason | None = None
    cache: dict = field(default_factory=dict)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prefill(target: GenerationTarget, prompt_ids: Sequence[int]) -> tuple[torch.Tensor, int]:
    """Bring the KV cache to `prompt_ids`, reusing its longest cached prefix -> (last logits [V], reused)."""
    # At least the last prompt token is evaluated again: its logits give the first new token.
    reused = min(common_prefix(target.kv_tokens, prompt_ids), len(prompt_ids) - 1)
    if reused == 0 and target.kv_tokens:
        target.decoder.reset()
    new = torch.tensor(list(prompt_ids[reused:]), dtype=torch.long, device=target.device)  # [T]
    return forward(target, new, reused), reused


def forward(target: GenerationTarget, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Run the decoder on tokens [T] at start_pos and keep `kv_tokens` true even if interrupted."""
    del target.kv_tokens[start_pos:]  # positions from start_pos on are (being) overwritten
    with torch.inference_mode():
        logits = target.decoder.forward(tokens, start_pos, last_only=True)  # [1, V]
    target.kv_tokens.extend(tokens.tolist())
    return logits[-1]  # [V]


def generate(
    target: GenerationTarget, prompt_ids: Sequence[int], params: GenerationParams | None = None
) -> Iterator[Step]:
    """Yield a `Step` per generated token until EOS, a stop string, max_tokens or a full context."""
    params = params or GenerationParams()
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise BadOption("the prompt is empty (no tokens to start from)")
    limit = target.context_length
    if len(prompt_ids) >= limit:
        raise ContextTooLong(
            f"the prompt has {len(prompt_ids)} tokens but the context holds {limit} "
            "(shorten the prompt, /clear the conversation, or load with a larger context)"
        )

    sampler = Sampler(params.sampling, target.device)
    history = None  # [limit] prompt + generated ids, kept only for the repetition penalty
    if sampler.needs_context:
        history = torch.empty(limit, dtype=torch.long, device=target.device)
        history[: len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
    detok = StreamDecoder(target.tokenizer, context=prompt_ids)
    stops = StopMatcher(params.stop)
    eos = frozenset() if params.ignore_eos else target.eos_token_ids

    start = time.perf_counter()
    target.start_request()
    try:
        logits, reused = prefill(target, prompt_ids)  # [V]
        length = len(prompt_ids)
        prompt_done = getattr(target, "prompt_done", None)  # optional (Engine has it)
        if prompt_done is not None:
            prompt_done(length - reused)

        prompt_s = decode_s = 0.0
        index = 0
        while True:
            token = sampler(logits, None if history is None else history[:length])
            if history is not None:
                history[length] = token
            length += 1
            now = time.perf_counter()
            step_s = now - start
            if index == 0:
                prompt_s = step_s
            else:
                decode_s += step_s

            at_limit = index + 1 == params.max_tokens or length >= limit
            text, finish = _new_text(token, token in eos, at_limit, detok, stops)

            timings = Timings(len(prompt_ids), reused, prompt_s, index + 1, decode_s, step_s)
            yield Step(index, token, text, timings, finish, target.cache_stats() if finish else {})
            if finish is not None:
                return
            start = time.perf_counter()
            logits = forward(
                target, torch.tensor([token], dtype=torch.long, device=target.device), length - 1
            )
            index += 1
    finally:
        target.end_request()  # also when the caller stops early (Ctrl-C, a client that went away)


def _new_text(
    token: int, is_eos: bool, at_limit: bool, detok: StreamDecoder, stops: StopMatcher
) -> tuple[str, FinishReason | None]:
    """The printable text one new token adds and, when generation ends with it, why."""
    if is_eos:  # EOS itself has no text; release what was held back
        text, stopped = stops.feed(detok.flush())
        return (text, "stop") if stopped else (text + stops.flush(), "eos")
    text, stopped = stops.feed(detok.add(token))
    if stopped:
        return text, "stop"
    if not at_limit:
        return text, None
    tail, stopped = stops.feed(detok.flush())  # an incomplete character, if any
    return (text + tail, "stop") if stopped else (text + tail + stops.flush(), "length")


@dataclass(frozen=True)
class Completion:
    """A whole generation, collected from its steps."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: FinishReason
    timings: Timings
    cache: dict


def complete(
    target: GenerationTarget, prompt_ids: Sequence[int], params: GenerationParams | None = None
) -> Completion:
    """Run `generate` to the end and collect text, ids and the final timings."""
    text: list[str] = []
    ids: list[int] = []
    last: Step | None = None
    for last in generate(target, prompt_ids, params):
        text.append(last.text)
        ids.append(last.token_id)
    assert last is not None and last.finish_reason is not None  # generate always yields a last step
    return Completion("".join(text), ids, list(prompt_ids), last.finish_reason, last.timings, last.cache)
