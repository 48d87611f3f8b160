"""HTTP plumbing shared by both APIs: reading a JSON body within the size limit, mapping errors to status
codes, and turning a job's events into one response or a stream (NDJSON or server-sent events).

A streamed response starts only after the job's first event, so an error found before any output
(unknown model, prompt beyond the context, bad option) is still a plain 4xx JSON response; an error
after the stream has started becomes a last error object in the stream, as ollama does.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moeinf.errors import (
    BadOption,
    BadRequest,
    BudgetTooSmall,
    ChatTemplateError,
    ContextTooLong,
    DiskFull,
    GatedRepo,
    InvalidCheckpoint,
    InvalidModelName,
    KVCacheDoesNotFit,
    ModelExists,
    ModelNotFound,
    MoeinfError,
    NetworkError,
    QueueFull,
    RepoNotFound,
    RequestTooLarge,
    RevisionNotFound,
    StoreLocked,
    UnknownAlias,
    UnsafeCheckpoint,
    UnsupportedArchitecture,
)
from moeinf.server.queue import ClientGone, Job

log = logging.getLogger("moeinf.server")

_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (RequestTooLarge, 413),
    (BadRequest, 400),
    (BadOption, 400),
    (ContextTooLong, 400),
    (ChatTemplateError, 400),
    (InvalidModelName, 400),
    (BudgetTooSmall, 400),
    (KVCacheDoesNotFit, 400),  # a request's num_ctx too large for this machine
    (ModelNotFound, 404),
    (UnknownAlias, 404),
    (RepoNotFound, 404),
    (RevisionNotFound, 404),
    (GatedRepo, 403),
    (StoreLocked, 409),
    (ModelExists, 409),
    (UnsupportedArchitecture, 422),  # pull: a checkpoint moeinf cannot run (quantized ones included)
    (UnsafeCheckpoint, 422),
    (InvalidCheckpoint, 422),
    (NetworkError, 502),
    (DiskFull, 507),
    (QueueFull, 503),
)


def status_for(exc: BaseException) -> int:
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def message_for(exc: BaseException) -> str:
    if isinstance(exc, MoeinfError):
        return str(exc)
    log.error("internal error", exc_info=exc)  # the client gets one line; the log keeps the traceback
    return f"internal error: {type(exc).__name__}: {exc}"


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object; over `app.state.max_body` bytes is RequestTooLarge (413)."""
    limit: int = request.app.state.max_body
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body.strip():
        raise BadRequest("empty request body: expected a JSON object")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def error_headers(exc: BaseException, request: Request) -> dict[str, str]:
    if isinstance(exc, QueueFull):
        return {"Retry-After": str(request.app.state.worker.retry_after())}
    return {}


def ollama_error(exc: BaseException, request: Request) -> JSONResponse:
    return JSONResponse({"error": message_for(exc)}, status_for(exc), headers=error_headers(exc, request))


def openai_error(exc: BaseException, request: Request) -> JSONResponse:
    status = status_for(exc)
    kind = {404: "not_found_error", 413: "invalid_request_error", 503: "server_busy"}.get(status)
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message_for(exc), "type": kind, "param": None, "code": status}}
    return JSONResponse(body, status, headers=error_headers(exc, request))


def submit(request: Request, job: Job) -> Job:
    """Queue a job on the worker (QueueFull when the queue is full)."""
    return request.app.state.worker.submit(job)


def events(job: Job, request: Request) -> AsyncIterator[Any]:
    """The job's events; a client that disconnects cancels the job."""
    return job.events(request.is_disconnected)


async def respond(
    job: Job,
    request: Request,
    *,
    stream: bool,
    render: Callable[[Any], list[Any]],
    finish: Callable[[list[Any]], Any],
    on_error: Callable[[BaseException, Request], JSONResponse],
    framing: str = "ndjson",
) -> Response:
    """Answer a job: a stream of the objects `render(event)` returns (NDJSON lines, or SSE `data:` lines
    ending in [DONE]), or one object `finish(all events)`."""
    iterator = events(job, request)
    try:
        first = await anext(iterator)
    except ClientGone:
        return Response(status_code=499)  # nobody is listening
    except StopAsyncIteration:
        return on_error(RuntimeError("the job ended without a result"), request)
    except Exception as exc:  # before any output: a plain error response
        job.cancel()
        return on_error(exc, request)

    if not stream:
        collected = [first]
        try:
            async for event in iterator:
                collected.append(event)
        except ClientGone:
            return Response(status_code=499)
        except Exception as exc:
            job.cancel()
            return on_error(exc, request)
        return JSONResponse(finish(collected))

    def frame(obj: Any) -> bytes:
        text = json.dumps(obj, ensure_ascii=False)
        return (f"data: {text}\n\n" if framing == "sse" else text + "\n").encode()

    async def all_events() -> AsyncIterator[Any]:
        yield first
        # Once streaming, the response notices a disconnect itself (Starlette listens for it and cancels
        # the body): polling the same receive channel concurrently would race with it.
        async for event in job.events(None):
            yield event

    async def body() -> AsyncIterator[bytes]:
        try:
            async for event in all_events():
                for obj in render(event):
                    yield frame(obj)
        except ClientGone:
            return
        except Exception as exc:  # after output started: a last error object in the stream
            yield frame(json.loads(bytes(on_error(exc, request).body)))
        finally:
            job.cancel()  # no-op once done; stops the generation when the client went away
        if framing == "sse":
            yield b"data: [DONE]\n\n"

    media = "text/event-stream" if framing == "sse" else "application/x-ndjson"
    return StreamingResponse(body(), media_type=media, headers={"Cache-Control": "no-cache"})
