"""OpenAI's API: POST /v1/chat/completions, POST /v1/completions (server-sent events ending in `[DONE]`
when `stream` is true), GET /v1/models and /v1/models/{model}.

Sampling fields map onto moeinf's (moeinf.server.options.openai_params); unset ones keep the model's own
defaults, as `moeinf run` does. /v1/completions tokenizes the prompt as is (as `moeinf run --raw`).
moeinf adds `cache` (this request's expert-cache statistics) to the response and to the last chunk.
Reference: OpenAI API reference (chat/completions, completions, models).
"""

from __future__ import annotations

import time
import uuid
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from moeinf.errors import BadOption, BadRequest, ModelNotFound
from moeinf.runtime.generate import Step
from moeinf.server.generation import GenerationRequest, Outcome, Prompt, chat_messages, run_generation
from moeinf.server.manager import ModelManager
from moeinf.server.options import get, openai_params
from moeinf.server.queue import Job
from moeinf.server.transport import openai_error, read_json, respond, submit

router = APIRouter(prefix="/v1")


def _model(body: dict[str, Any], request: Request) -> str:
    name = get(body, "model", str) or request.app.state.default_model
    if not name:
        raise BadRequest("field 'model' is required")
    return name


def _usage(outcome: Outcome) -> dict[str, int]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


async def _complete(request: Request, body: dict[str, Any], prompt: Prompt, *, chat: bool) -> Response:
    model = _model(body, request)
    params = openai_params(body)
    stream = get(body, "stream", bool, False)
    options = get(body, "stream_options", dict, {}) if stream else {}
    include_usage = get(options, "include_usage", bool, False)
    manager: ModelManager = request.app.state.manager
    job = submit(request, Job(partial(run_generation, manager, GenerationRequest(model, prompt, params))))

    kind = "chat.completion" if chat else "text_completion"
    head = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": f"{kind}.chunk" if chat and stream else kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "moeinf",
    }
    first_chunk = [True]

    def choice(text: str | None, finish_reason: str | None) -> dict[str, Any]:
        if not chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if not stream:
            message = {"role": "assistant", "content": text or ""}
            return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        delta: dict[str, Any] = {} if text is None else {"content": text}
        if first_chunk[0]:
            delta = {"role": "assistant", **delta}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def render(event: Any) -> list[dict[str, Any]]:
        if isinstance(event, Step):
            if not event.text and not (chat and first_chunk[0]):  # chat's first chunk carries the role
                return []
            chunk = {**head, "choices": [choice(event.text, None)]}
            first_chunk[0] = False
            return [chunk]
        assert isinstance(event, Outcome)
        chunks = [{**head, "choices": [choice(None, event.finish_reason)], "cache": event.cache}]
        if include_usage:
            chunks.append({**head, "choices": [], "usage": _usage(event)})
        return chunks

    def finish(events: list[Any]) -> dict[str, Any]:
        text = "".join(e.text for e in events if isinstance(e, Step))
        outcome = events[-1]
        assert isinstance(outcome, Outcome)
        return {
            **head,
            "choices": [choice(text, outcome.finish_reason)],
            "usage": _usage(outcome),
            "cache": outcome.cache,
        }

    return await respond(
        job, request, stream=stream, render=render, finish=finish, on_error=openai_error, framing="sse"
    )


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    body = await read_json(request)
    return await _complete(request, body, Prompt(messages=chat_messages(body.get("messages"))), chat=True)


@router.post("/completions")
async def completions(request: Request) -> Response:
    body = await read_json(request)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("field 'prompt' must be a non-empty string (one prompt per request)")
    if get(body, "echo", bool, False):
        raise BadOption("echo is not supported")
    if get(body, "suffix", str):
        raise BadOption("suffix is not supported")
    if get(body, "best_of", int, 1) != 1:
        raise BadOption("best_of must be 1")
    return await _complete(request, body, Prompt(text=prompt, raw=True), chat=False)


def _model_object(name: str, created: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "moeinf"}


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    manager: ModelManager = request.app.state.manager
    return {"object": "list", "data": [_model_object(m.name, m.modified) for m in manager.store.list()]}


@router.get("/models/{name:path}")
async def model(name: str, request: Request) -> dict[str, Any]:
    manager: ModelManager = request.app.state.manager
    try:
        stored = manager.open(name)
    except ModelNotFound:
        raise ModelNotFound(f"the model {name!r} does not exist") from None
    return _model_object(stored.name, stored.modified)
