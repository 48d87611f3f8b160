"""The FastAPI application of `moeinf serve`: configuration, API-key check, error handlers, the worker's
lifetime, and both route sets (ollama's /api/*, OpenAI's /v1/*).

`create_app(ServerConfig(...))` returns an ASGI app; uvicorn (cli/serve.py, or a test) serves it. The
worker thread starts with the app and stops with it (unloading the model); `--model` is loaded at start.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from moeinf import __version__
from moeinf.errors import MoeinfError
from moeinf.server import ollama_routes, openai_routes
from moeinf.server.manager import LoadOptions, ModelManager
from moeinf.server.queue import Cancelled, Emit, Job, Worker
from moeinf.server.transport import ollama_error, openai_error
from moeinf.store import Store

log = logging.getLogger("moeinf.server")

DEFAULT_PORT = 11435  # ollama's 11434 + 1: both can run side by side
DEFAULT_KEEP_ALIVE = 300.0  # seconds (ollama's 5m)
DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_BODY = 8 * 1024**2


@dataclass(frozen=True)
class ServerConfig:
    load: LoadOptions = field(default_factory=LoadOptions)
    keep_alive: float = DEFAULT_KEEP_ALIVE  # seconds; math.inf: forever
    model: str | None = None  # loaded at start, and the model of requests that name none
    api_key: str | None = None  # every request must send `Authorization: Bearer <api_key>`
    max_queue: int = DEFAULT_MAX_QUEUE  # requests waiting behind the running one; more get 503
    max_body: int = DEFAULT_MAX_BODY  # bytes of request body
    home: Path | None = None  # store root (default: $MOEINF_HOME)


def _is_openai(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class ApiKeyCheck:
    """ASGI middleware: without `Authorization: Bearer <key>` a request gets 401 (in its API's format)."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
        if _is_openai(scope["path"]):
            body: dict = {"error": {"message": message, "type": "invalid_request_error", "param": None}}
            body["error"]["code"] = "invalid_api_key"
        else:
            body = {"error": message}
        response = JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def create_app(config: ServerConfig) -> FastAPI:
    manager = ModelManager(config.load, keep_alive=config.keep_alive, store=Store(config.home))
    worker = Worker(manager, config.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        if config.model:
            worker.submit(Job(_preload(manager, config.model)))
        yield
        import asyncio

        await asyncio.to_thread(worker.stop)

    app = FastAPI(
        title="moeinf",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.manager = manager
    app.state.worker = worker
    app.state.default_model = config.model
    app.state.max_body = config.max_body

    async def moeinf_error(request: Request, exc: Exception) -> JSONResponse:
        return (openai_error if _is_openai(request.url.path) else ollama_error)(exc, request)

    app.add_exception_handler(MoeinfError, moeinf_error)
    app.add_exception_handler(Exception, moeinf_error)
    app.include_router(ollama_routes.router)
    app.include_router(openai_routes.router)
    if config.api_key:
        app.add_middleware(ApiKeyCheck, key=config.api_key)
    return app


def _preload(manager: ModelManager, model: str):
    def run(emit: Emit, cancelled: Cancelled) -> None:
        try:
            manager.acquire(model)
            manager.release()
        except MoeinfError as exc:
            log.error("could not load %s: %s", model, exc)

    return run
