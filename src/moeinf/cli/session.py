"""A `run` session: the conversation, the prompt it becomes, generation parameters, and the stats text.

Shared by the one-shot command and the REPL (cli/run.py, cli/repl.py). Turns user text into prompt
ids (chat template with the conversation so far, or the raw prompt), keeps the conversation across
turns (a turn is recorded only when its answer completes), parses ollama-style `/set parameter`
names, and formats ollama's `--verbose` block. Imports torch only through the engine it is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from moeinf.errors import BadOption

if TYPE_CHECKING:
    from moeinf.runtime.engine import Engine
    from moeinf.runtime.generate import GenerationParams, Step, Timings

# ollama parameter name -> (field of GenerationParams or SamplingParams, type)
PARAMETERS: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "min_p": ("min_p", float),
    "repeat_penalty": ("repeat_penalty", float),
    "repeat_last_n": ("repeat_last_n", int),
    "seed": ("seed", int),
    "num_predict": ("max_tokens", int),
    "max_tokens": ("max_tokens", int),
    "stop": ("stop", str),
}


class ChatSession:
    """One conversation with a loaded model."""

    def __init__(
        self, engine: Engine, params: GenerationParams, *, raw: bool = False, system: str | None = None
    ) -> None:
        self.engine = engine
        self.params = params
        self.raw = raw or not engine.tokenizer.has_chat_template
        self.system = system
        self.messages: list[dict[str, str]] = []

    def clear(self) -> None:
        """Forget the conversation (the KV cache is reused only as far as the new prompt matches)."""
        self.messages.clear()

    def prompt_ids(self, text: str) -> list[int]:
        """The prompt for the next turn: the raw text, or the whole conversation through the template."""
        tokenizer = self.engine.tokenizer
        if self.raw:
            return tokenizer.encode(text)
        system = [{"role": "system", "content": self.system}] if self.system else []
        return tokenizer.encode_chat([*system, *self.messages, {"role": "user", "content": text}])

    def ask(self, text: str) -> Iterator[Step]:
        """Generate the answer to `text`; the turn joins the conversation once the answer is complete."""
        from moeinf.runtime.generate import generate

        answer: list[str] = []
        for step in generate(self.engine, self.prompt_ids(text), self.params):
            answer.append(step.text)
            yield step
        if not self.raw:
            self.messages.append({"role": "user", "content": text})
            self.messages.append({"role": "assistant", "content": "".join(answer).strip()})

    def set_parameter(self, name: str, value: str) -> None:
        """`/set parameter NAME VALUE` (ollama's names; `stop` takes one or more strings)."""
        self.params = with_parameter(self.params, name, value)


def with_parameter(params: GenerationParams, name: str, value: str) -> GenerationParams:
    if name not in PARAMETERS:
        raise BadOption(f"unknown parameter {name!r} (known: {', '.join(sorted(PARAMETERS))})")
    field, kind = PARAMETERS[name]
    if field == "stop":
        return dataclasses.replace(params, stop=tuple(value.split()) if value.strip() else ())
    try:
        parsed: Any = kind(value)
    except ValueError:
        raise BadOption(f"parameter {name} needs a {kind.__name__}, got {value!r}") from None
    if field == "max_tokens":
        return dataclasses.replace(params, max_tokens=parsed if parsed > 0 else None)
    return dataclasses.replace(params, sampling=params.sampling.replace(**{field: parsed}))


def display_start(text: str, started: bool) -> tuple[str, bool]:
    """Chat answers are shown without the leading whitespace the template leaves before them."""
    if started:
        return text, True
    stripped = text.lstrip()
    return stripped, bool(stripped)


def _duration(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.6f}s"
    return f"{seconds * 1e3:.6f}ms"


def format_stats(load_s: float, total_s: float, timings: Timings, cache: dict | None = None) -> str:
    """ollama's `--verbose` block (plus the expert cache's hit rate when the provider keeps stats).
    `total_s` is the generation's wall time; the total shown includes the load, as ollama's does."""
    rows = [
        ("total duration", _duration(load_s + total_s)),
        ("load duration", _duration(load_s)),
        ("prompt eval count", f"{timings.prompt_evaluated} token(s)"),
        ("prompt eval duration", _duration(timings.prompt_s)),
        ("prompt eval rate", f"{timings.prompt_tps:.2f} tokens/s"),
        ("eval count", f"{timings.generated} token(s)"),
        ("eval duration", _duration(timings.decode_s)),
        ("eval rate", f"{timings.decode_tps:.2f} tokens/s"),
    ]
    if timings.prompt_cached:
        rows.insert(3, ("prompt cache count", f"{timings.prompt_cached} token(s)"))
    if cache:
        requests = cache.get("requests", 0)
        rows.append(
            ("expert cache hits", f"{cache.get('hits', 0)}/{requests} ({cache.get('hit_rate', 0.0):.1%})")
        )
        if "bytes_read" in cache:
            rows.append(("expert bytes read", f"{cache['bytes_read'] / 1e6:.1f} MB"))
        if cache.get("bytes_h2d"):
            rows.append(("expert bytes to GPU", f"{cache['bytes_h2d'] / 1e6:.1f} MB"))
        if cache.get("prefetch_issued"):
            used, wasted = cache.get("prefetch_used", 0), cache.get("prefetch_wasted", 0)
            rows.append(("expert prefetches", f"{cache['prefetch_issued']} ({used} used, {wasted} wasted)"))
        if cache.get("bypassed"):
            rows.append(("experts not cached", f"{cache['bypassed']} (bulk prefill or policy bypass)"))
        if "stall_s" in cache:
            rows.append(("waiting for experts", _duration(cache["stall_s"])))
    width = max(len(name) for name, _ in rows) + 2
    return "\n".join(f"{name + ':':<{width}}{value}" for name, value in rows)


def stats_dict(load_s: float, total_s: float, timings: Timings, cache: dict | None = None) -> dict:
    """The `stats` object of `--format json` (`total_s` includes the load)."""
    return {"load_s": load_s, "total_s": load_s + total_s, **timings.to_dict(), "cache": cache or {}}
