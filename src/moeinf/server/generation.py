"""One generation request as a worker job: load the model, build the prompt, stream `Step` events, and
end with an `Outcome` (timings, token counts, this request's expert-cache statistics).

The prompt is built as `moeinf run` builds it (`ChatSession.prompt_ids`: the raw text, or system + user
message through the chat template) or, for chat routes, from the request's whole message list.
Templated answers lose their leading whitespace as `run` shows them (`display_start`). Every route of
both APIs renders these same events.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moeinf.cli.session import ChatSession, display_start
from moeinf.errors import BadRequest, ChatTemplateError
from moeinf.runtime.generate import GenerationParams, generate
from moeinf.server.options import RequestParams
from moeinf.server.queue import Cancelled, Emit

if TYPE_CHECKING:
    from moeinf.runtime.engine import Engine
    from moeinf.runtime.generate import Timings
    from moeinf.server.manager import ModelManager


@dataclass(frozen=True)
class Prompt:
    """Either `text` (raw, or one user turn with an optional system message) or a chat `messages` list."""

    text: str | None = None
    system: str | None = None
    raw: bool = False
    messages: tuple[Mapping[str, Any], ...] | None = None

    @property
    def templated(self) -> bool:
        return self.messages is not None or not self.raw

    def ids(self, engine: Engine) -> list[int]:
        if self.messages is None:
            session = ChatSession(engine, GenerationParams(), raw=self.raw, system=self.system)
            return session.prompt_ids(self.text or "")
        if not engine.tokenizer.has_chat_template:
            raise ChatTemplateError(
                f"model {engine.name!r} has no chat template: use /api/generate with raw, or /v1/completions"
            )
        return engine.tokenizer.encode_chat(list(self.messages))


def chat_messages(value: Any) -> tuple[dict[str, str], ...]:
    """A request's `messages`: objects with a string `role` and `content` (a string, or OpenAI's list of
    text parts). Images and other parts are refused."""
    if not isinstance(value, list) or not value:
        raise BadRequest("field 'messages' must be a non-empty array of {role, content} objects")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'")
        if message.get("images"):
            raise BadRequest(f"messages[{i}]: images are not supported")
        content = message.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for part in content:
                text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
                if not isinstance(text, str):
                    raise BadRequest(f"messages[{i}].content: only text parts are supported")
                parts.append(text)
            content = "".join(parts)
        elif not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or an array of text parts")
        messages.append({"role": message["role"], "content": content})
    return tuple(messages)


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    prompt: Prompt
    params: RequestParams
    keep_alive: float | None = None  # seconds; None: the server's default
    received: float = dataclasses.field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Outcome:
    """The end of a generation (after its last Step)."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    timings: Timings
    load_s: float
    total_s: float  # from the request's arrival (queueing and loading included)
    cache: dict[str, Any]  # this request's expert-cache statistics ({} when every expert is resident)


def run_generation(
    manager: ModelManager, request: GenerationRequest, emit: Emit, cancelled: Cancelled
) -> None:
    """The job body: emits Step events (text as shown), then one Outcome; stops early when cancelled."""
    engine, load_s = manager.acquire(request.model, num_ctx=request.params.num_ctx)
    try:
        prompt_ids = request.prompt.ids(engine)
        params = request.params.generation(engine.default_sampling())
        before = engine.cache_stats()
        started = not request.prompt.templated
        steps = generate(engine, prompt_ids, params)
        last = None
        try:
            for last in steps:
                shown, started = display_start(last.text, started)
                emit(dataclasses.replace(last, text=shown, cache={}))
                if cancelled():
                    return
        finally:
            steps.close()
        assert last is not None and last.finish_reason is not None
        emit(
            Outcome(
                model=engine.name,
                prompt_tokens=len(prompt_ids),
                completion_tokens=last.timings.generated,
                finish_reason="length" if last.finish_reason == "length" else "stop",
                timings=last.timings,
                load_s=load_s,
                total_s=time.perf_counter() - request.received,
                cache=stats_delta(before, engine.cache_stats()),
            )
        )
    finally:
        manager.release(request.keep_alive)


def stats_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Cumulative cache counters after minus before (recursively), with `hit_rate` recomputed."""
    out: dict[str, Any] = {}
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, Mapping):
            out[key] = stats_delta(old if isinstance(old, Mapping) else {}, value)
        elif isinstance(value, int | float) and not isinstance(value, bool) and key != "hit_rate":
            out[key] = value - (old if isinstance(old, int | float) else 0)
        else:
            out[key] = value
    if "hit_rate" in out:
        requests = out.get("requests", 0)
        out["hit_rate"] = out.get("hits", 0) / requests if requests else 0.0
    return out


@dataclass(frozen=True)
class LoadOutcome:
    """The end of a request without a prompt: ollama loads (or, with keep_alive 0, unloads) the model."""

    model: str
    action: str  # "load" or "unload"
    load_s: float
    total_s: float


def run_load(manager: ModelManager, request: GenerationRequest, emit: Emit, cancelled: Cancelled) -> None:
    """The job body of an empty ollama request: load the model, or unload it when keep_alive is 0."""
    if request.keep_alive == 0:
        name = manager.open(request.model).name
        manager.unload(name)
        emit(LoadOutcome(name, "unload", 0.0, time.perf_counter() - request.received))
        return
    engine, load_s = manager.acquire(request.model, num_ctx=request.params.num_ctx)
    manager.release(request.keep_alive)
    emit(LoadOutcome(engine.name, "load", load_s, time.perf_counter() - request.received))
