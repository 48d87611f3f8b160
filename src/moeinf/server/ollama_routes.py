"""Ollama's API: /api/generate, /api/chat (NDJSON streams by default), /api/tags, /api/show, /api/ps,
/api/pull (streamed progress), DELETE /api/delete, /api/version.

Field names and shapes follow ollama's docs/api.md; durations are nanoseconds. moeinf adds `cache` (this
request's expert-cache statistics) to the final object of a generation and to each model in /api/ps.
Reference: ollama `api/types.go`, `server/routes.go`.
"""

from __future__ import annotations

import hashlib
import math
from datetime import datetime, timezone
from functools import partial
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from moeinf import __version__
from moeinf.errors import BadOption, BadRequest
from moeinf.runtime.generate import Step
from moeinf.server.generation import (
    GenerationRequest,
    LoadOutcome,
    Outcome,
    Prompt,
    chat_messages,
    run_generation,
    run_load,
)
from moeinf.server.manager import Loaded, ModelManager
from moeinf.server.options import get, ollama_params, parse_duration
from moeinf.server.queue import Cancelled, Emit, Job
from moeinf.server.transport import ollama_error, read_json, respond, submit
from moeinf.store import StoredModel

router = APIRouter()


def timestamp(when: float | None = None) -> str:
    """RFC 3339 in UTC, as ollama writes `created_at`."""
    moment = datetime.fromtimestamp(when, timezone.utc) if when is not None else datetime.now(timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(seconds: float) -> int:
    return int(round(seconds * 1e9))


def model_name(body: dict[str, Any], request: Request) -> str:
    """The request's `model` (ollama also accepts `name`), else the server's --model."""
    name = get(body, "model", str) or get(body, "name", str) or request.app.state.default_model
    if not name:
        raise BadRequest("field 'model' is required")
    return name


def _keep_alive(body: dict[str, Any]) -> float | None:
    value = body.get("keep_alive")
    return None if value is None else parse_duration(value)


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("format") not in (None, ""):
        raise BadOption("'format' (structured output) is not supported")
    if get(body, "images", list):
        raise BadOption("images are not supported")
    if get(body, "tools", list):
        raise BadOption("tools are not supported")
    if get(body, "template", str):
        raise BadOption("'template' is not supported: the model's own chat template is used")
    if get(body, "suffix", str):
        raise BadOption("'suffix' (fill-in-the-middle) is not supported")


def _final(outcome: Outcome) -> dict[str, Any]:
    t = outcome.timings
    return {
        "done": True,
        "done_reason": outcome.finish_reason,
        "total_duration": _ns(outcome.total_s),
        "load_duration": _ns(outcome.load_s),
        "prompt_eval_count": t.prompt_evaluated,
        "prompt_eval_duration": _ns(t.prompt_s),
        "eval_count": t.generated,
        "eval_duration": _ns(t.decode_s),
        "cache": outcome.cache,
    }


def _loaded(outcome: LoadOutcome) -> dict[str, Any]:
    return {
        "done": True,
        "done_reason": outcome.action,
        "total_duration": _ns(outcome.total_s),
        "load_duration": _ns(outcome.load_s),
    }


async def _generation(
    request: Request, body: dict[str, Any], req: GenerationRequest, *, empty: bool, chat: bool
) -> Response:
    manager: ModelManager = request.app.state.manager
    stream = get(body, "stream", bool, True)  # checked before queueing: a bad request costs no work
    run = run_load if empty else run_generation
    job = submit(request, Job(partial(run, manager, req)))
    model = req.model

    def content(text: str) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": text}} if chat else {"response": text}

    def render(event: Any) -> list[dict[str, Any]]:
        head = {"model": model, "created_at": timestamp()}
        if isinstance(event, Step):
            return [{**head, **content(event.text), "done": False}] if event.text else []
        if isinstance(event, Outcome):
            return [{**head, **content(""), **_final(event)}]
        return [{**head, **content(""), **_loaded(event)}]

    def finish(events: list[Any]) -> dict[str, Any]:
        text = "".join(e.text for e in events if isinstance(e, Step))
        last = events[-1]
        tail = _final(last) if isinstance(last, Outcome) else _loaded(last)
        return {"model": model, "created_at": timestamp(), **content(text), **tail}

    return await respond(job, request, stream=stream, render=render, finish=finish, on_error=ollama_error)


@router.post("/api/generate")
async def generate(request: Request) -> Response:
    body = await read_json(request)
    _refuse_unsupported(body)
    prompt = get(body, "prompt", str, "")
    req = GenerationRequest(
        model=model_name(body, request),
        prompt=Prompt(text=prompt, system=get(body, "system", str), raw=get(body, "raw", bool, False)),
        params=ollama_params(body.get("options")),
        keep_alive=_keep_alive(body),
    )
    return await _generation(request, body, req, empty=not prompt, chat=False)


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    body = await read_json(request)
    _refuse_unsupported(body)
    raw_messages = body.get("messages")
    empty = raw_messages is None or raw_messages == []
    req = GenerationRequest(
        model=model_name(body, request),
        prompt=Prompt(messages=None if empty else chat_messages(raw_messages)),
        params=ollama_params(body.get("options")),
        keep_alive=_keep_alive(body),
    )
    return await _generation(request, body, req, empty=empty, chat=True)


def digest(model: StoredModel) -> str:
    """A stable id of the stored model: the sha256 of its manifest."""
    return hashlib.sha256((model.path / "manifest.yaml").read_bytes()).hexdigest()


def details(info: dict[str, Any]) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": info["architecture"],
        "families": [info["architecture"]],
        "parameter_size": _count(info["params_total"]),
        "quantization_level": info["dtype"].upper().replace("BFLOAT", "BF").replace("FLOAT", "F"),
    }


def _count(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def model_entry(model: StoredModel) -> dict[str, Any]:
    info = model.info()
    return {
        "name": model.name,
        "model": model.name,
        "modified_at": info["modified"],
        "size": info["size_bytes"],
        "digest": digest(model),
        "details": details(info),
    }


@router.get("/api/tags")
async def tags(request: Request) -> dict[str, Any]:
    manager: ModelManager = request.app.state.manager
    return {"models": [model_entry(m) for m in manager.store.list()]}


@router.post("/api/show")
async def show(request: Request) -> dict[str, Any]:
    from moeinf.runtime.tokenizer import Tokenizer

    body = await read_json(request)
    manager: ModelManager = request.app.state.manager
    model = manager.open(model_name(body, request))
    info = model.info()
    spec = model.spec
    family = info["architecture"]
    template = Tokenizer.from_dir(model.tokenizer_dir).chat_template or ""
    return {
        "license": "",
        "modelfile": f"FROM {model.name}\n",
        "parameters": "",
        "template": template,
        "details": details(info),
        "model_info": {
            "general.architecture": family,
            "general.parameter_count": info["params_total"],
            f"{family}.block_count": spec.num_layers,
            f"{family}.context_length": spec.max_position_embeddings,
            f"{family}.embedding_length": spec.hidden_size,
            f"{family}.expert_count": spec.num_experts,
            f"{family}.expert_used_count": spec.top_k,
            f"{family}.expert_shared_count": spec.num_shared_experts,
            f"{family}.expert_feed_forward_length": spec.expert_dim,
            f"{family}.vocab_size": spec.vocab_size,
        },
        "capabilities": ["completion"],
        "modified_at": info["modified"],
        "moeinf": info,
    }


def _ps_entry(loaded: Loaded) -> dict[str, Any]:
    entry = model_entry(loaded.stored)
    expires = "9999-12-31T23:59:59.000000Z" if math.isinf(loaded.expires_at) else timestamp(loaded.expires_at)
    return {
        **entry,
        "expires_at": expires,
        "size_vram": entry["size"] if loaded.device.startswith("cuda") else 0,
        "context_length": loaded.context_length,
        "device": loaded.device,
        "dtype": loaded.dtype,
        "load_duration": _ns(loaded.load_s),
        "cache": loaded.cache,
    }


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    loaded = request.app.state.manager.snapshot()
    return {
        "models": [] if loaded is None else [_ps_entry(loaded)],
        "queue": request.app.state.worker.status(),
    }


def _pull_source(name: str) -> str:
    """Hub repos and catalog aliases only: a client must not make the server read its own folders."""
    from moeinf.names import parse_source

    if name.startswith(("/", "~", ".")) or "\\" in name:
        raise BadOption(
            "pulling a local folder is not allowed through the API: use `moeinf pull` on the host"
        )
    ref = parse_source(name)
    if ref.kind == "local" and ref.alias is None:
        raise BadOption(
            "pulling a local folder is not allowed through the API: use `moeinf pull` on the host"
        )
    return name


@router.post("/api/pull")
async def pull(request: Request) -> Response:
    from moeinf.pull import PullEvent
    from moeinf.pull import pull as pull_model

    body = await read_json(request)
    source = _pull_source(model_name(body, request))
    stream = get(body, "stream", bool, True)
    manager: ModelManager = request.app.state.manager

    def run(emit: Emit, cancelled: Cancelled) -> None:
        emit(PullEvent("status", "pulling manifest"))
        pull_model(source, store=manager.store, progress=emit)

    job = Job(run)
    job.start_thread("moeinf-pull")  # not the generation worker: a pull does not touch the loaded model

    def render(event: PullEvent) -> list[dict[str, Any]]:
        if event.kind == "done":
            return [{"status": "success"}]
        if event.kind == "file":
            status = f"{event.phase or 'pulling'} {event.file}"
            return [{"status": status, "digest": event.file, "total": event.total, "completed": event.done}]
        return [{"status": event.message}]

    def finish(events: list[Any]) -> dict[str, Any]:
        return {"status": "success"}

    return await respond(job, request, stream=stream, render=render, finish=finish, on_error=ollama_error)


@router.delete("/api/delete")
async def delete(request: Request) -> Response:
    body = await read_json(request)
    manager: ModelManager = request.app.state.manager
    name = manager.open(model_name(body, request)).name  # 404 when absent

    def run(emit: Emit, cancelled: Cancelled) -> None:
        manager.unload(name)  # on the worker: no request is using it now
        manager.store.remove(name)
        emit(None)

    job = submit(request, Job(run))

    def finish(events: list[Any]) -> dict[str, Any]:
        return {}

    answer = await respond(
        job, request, stream=False, render=lambda e: [], finish=finish, on_error=ollama_error
    )
    return (
        Response(status_code=200)
        if isinstance(answer, JSONResponse) and answer.status_code == 200
        else answer
    )


@router.get("/api/version")
async def version() -> dict[str, str]:
    return {"version": __version__}


@router.get("/")
@router.head("/")
async def root() -> Response:
    return Response("moeinf is running", media_type="text/plain")
