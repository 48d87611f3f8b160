"""The model manager: the one model the server holds in memory, its load options and its keep-alive.

Loading another model unloads the first; after each request the model stays loaded for its keep-alive
(the request's `keep_alive`, else the server's `--keep-alive`), then the worker unloads it. Models are
opened from the store and never pulled implicitly (a request for a model that is not there is a 404).
With `record_trace` every request's routing goes to a trace file per model and server run.
Everything except `snapshot()` runs on the worker thread (moeinf.server.queue.Worker).
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeinf.store import Store, StoredModel

if TYPE_CHECKING:
    from moeinf.runtime.engine import Engine, ProviderFactory
    from moeinf.runtime.routing_hooks import TraceFileRecorder

log = logging.getLogger("moeinf.server")

# --record-trace: a model's trace file is left complete at about this size and the next one begun, so the
# routing kept in memory and rewritten after each request stays bounded however long the server runs.
TRACE_FILE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class LoadOptions:
    """How models are loaded: `moeinf run`'s device and thread flags, the expert-cache budgets and policy."""

    device: str = "auto"
    threads: int | None = None
    num_ctx: int | None = None
    ram_mem: str | None = None
    gpu_mem: str | None = None
    policy: str | None = None
    record_trace: str | None = None  # a folder: each model's routing goes to <model>-<server start>.npz

    def provider(self) -> ProviderFactory:
        """The expert cache, as `run` uses it: budgets default to free memory, the policy to lru."""
        from moeinf.runtime.cache_plan import cache_factory, describe
        from moeinf.runtime.policy import DEFAULT_POLICY

        def on_plan(plan, cache) -> None:  # what `run --verbose` prints, in the server's log
            for line in describe(plan, cache):
                log.info("expert cache: %s", line)

        return cache_factory(
            ram_mem=self.ram_mem, gpu_mem=self.gpu_mem, policy=self.policy or DEFAULT_POLICY, on_plan=on_plan
        )

    def validate(self) -> None:
        """Fail on a bad budget or policy name before the server starts, not at the first request."""
        from moeinf.runtime.budget import parse_size
        from moeinf.runtime.policy import make_policy

        for value in (self.ram_mem, self.gpu_mem):
            if value is not None:
                parse_size(value)
        if self.policy is not None:
            make_policy(self.policy)


@dataclass(frozen=True)
class Loaded:
    """What /api/ps shows of the loaded model (a copy, safe to read from any thread)."""

    stored: StoredModel
    device: str
    dtype: str
    context_length: int
    load_s: float
    expires_at: float  # wall-clock time (time.time()); math.inf: never
    cache: dict[str, Any]  # the expert cache's cumulative statistics ({} when every expert is resident)


class ModelManager:
    def __init__(self, options: LoadOptions, *, keep_alive: float, store: Store | None = None) -> None:
        self.options = options
        self.keep_alive = keep_alive  # seconds; math.inf: forever
        self.store = store or Store()
        self.engine: Engine | None = None
        self._expires = math.inf  # time.monotonic() deadline of the loaded model
        self._snapshot: Loaded | None = None
        self._lock = threading.Lock()
        # --record-trace: one recorder per model for the server's life (a reload keeps appending to it).
        self._recorders: dict[str, TraceFileRecorder] = {}
        self._started = time.strftime("%Y%m%d-%H%M%S")

    def open(self, name: str) -> StoredModel:
        """The stored model `name` (ModelNotFound when it is not in the store: no implicit pull)."""
        return self.store.open(name)

    def acquire(self, name: str, *, num_ctx: int | None = None) -> tuple[Engine, float]:
        """The engine for `name`, loading it (and unloading another) when needed -> (engine, load seconds)."""
        from moeinf.runtime.engine import DEFAULT_CONTEXT, Engine

        stored = self.open(name)
        context = num_ctx or self.options.num_ctx
        engine = self.engine
        if engine is not None and engine.stored is not None and engine.stored.path == stored.path:
            # The context Engine.load would give; another one means loading again (ollama's num_ctx).
            wanted = min(context or DEFAULT_CONTEXT, stored.spec.max_position_embeddings)
            if wanted == engine.context_length:
                self._expires = math.inf  # in use: no expiry while a request runs
                return engine, 0.0
        self.unload()
        engine = Engine.load(
            stored.name,
            device=self.options.device,
            threads=self.options.threads,
            store=self.store,
            context_length=context,
            provider=self.options.provider(),
        )
        self.engine = engine
        self._record(engine)
        self._expires = math.inf
        self._publish()
        log.info("loaded %s on %s (%s) in %.2f s", engine.name, engine.device, engine.dtype, engine.load_s)
        return engine, engine.load_s

    def _record(self, engine: Engine) -> None:
        """--record-trace: every request's routing (prompt and answer) to the model's trace file, rewritten
        after each request; a file per model and server run, so nothing earlier is overwritten."""
        folder = self.options.record_trace
        if folder is None:
            return
        from moeinf.runtime.routing_hooks import TraceFileRecorder

        spec = engine.spec
        shape = {"num_moe_layers": len(spec.moe_layers), "num_experts": spec.num_experts, "top_k": spec.top_k}
        recorder = self._recorders.get(engine.name)
        if recorder is None or (recorder.num_moe_layers, recorder.num_experts, recorder.top_k) != tuple(
            shape.values()
        ):  # new, or the model was replaced by another shape under the same name: a new file
            again = "" if recorder is None else time.strftime("-%H%M%S")  # replaced: never the same file
            path = Path(folder) / f"{engine.name}-{self._started}{again}.npz"
            recorder = TraceFileRecorder(
                path,
                **shape,
                on_error=self._trace_write_failed,
                rotate_bytes=TRACE_FILE_BYTES,
                model=engine.name,
                source="moeinf serve",
            )
            self._recorders[engine.name] = recorder
            log.info("recording %s's routing to %s", engine.name, path)
        engine.request_listeners.append(recorder)
        engine.decoder.set_routing_hook(recorder)

    @staticmethod
    def _trace_write_failed(error: Exception) -> None:
        log.error("%s (the answer was not affected)", error)  # the client's request still succeeds

    def release(self, keep_alive: float | None = None) -> None:
        """A request is done with the engine: keep it for `keep_alive` seconds (None: the server's)."""
        if self.engine is None:
            return
        seconds = self.keep_alive if keep_alive is None else keep_alive
        self._expires = time.monotonic() + seconds
        self._publish()

    def idle_timeout(self) -> float | None:
        """Seconds until the loaded model expires; None when nothing will expire."""
        if self.engine is None or math.isinf(self._expires):
            return None
        return max(0.0, self._expires - time.monotonic())

    def expire(self) -> None:
        if self.engine is not None and time.monotonic() >= self._expires:
            self.unload()

    def unload(self, name: str | None = None) -> None:
        """Free the loaded model (only if it is `name`, when given)."""
        engine = self.engine
        if engine is None or (name is not None and engine.name != name):
            return
        with self._lock:
            self._snapshot = None
        self.engine = None
        self._expires = math.inf
        engine.close()
        log.info("unloaded %s", engine.name)
        cuda = engine.device.type == "cuda"
        del engine
        gc.collect()
        if cuda:
            import torch

            torch.cuda.empty_cache()

    def snapshot(self) -> Loaded | None:
        """The loaded model as of its last request (any thread)."""
        with self._lock:
            return self._snapshot

    def _publish(self) -> None:
        engine = self.engine
        assert engine is not None and engine.stored is not None
        remaining = self._expires - time.monotonic()
        loaded = Loaded(
            stored=engine.stored,
            device=str(engine.device),
            dtype=str(engine.dtype).removeprefix("torch."),
            context_length=engine.context_length,
            load_s=engine.load_s,
            expires_at=math.inf if math.isinf(remaining) else time.time() + remaining,
            cache=engine.cache_stats(),
        )
        with self._lock:
            self._snapshot = loaded
