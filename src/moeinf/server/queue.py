"""The request queue: jobs run one at a time on one worker thread, taken in order from a bounded queue.

Batch size 1 is the design point, so one worker thread owns the loaded model (through the
`ModelManager`) and runs each job to its end before taking the next. A job reports events to its
asyncio caller through a thread-safe channel; the caller cancels it when its client goes away: a queued
job is then skipped, a running one stops at its next event and frees the worker. When idle, the worker
unloads the model once its keep-alive has expired. A `Job` may also run on a thread of its own (pull).
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from moeinf.errors import QueueFull

log = logging.getLogger("moeinf.server")

Emit = Callable[[Any], None]
Cancelled = Callable[[], bool]
JobBody = Callable[[Emit, Cancelled], None]


class ClientGone(Exception):
    """The client disconnected while its job was queued or running (the job is cancelled)."""


@dataclass(frozen=True)
class _Failure:
    error: BaseException


_END = object()
_NOTHING = object()  # no event within the poll interval


class Job:
    """One unit of work with an event channel back to the event loop that created it."""

    def __init__(self, body: JobBody, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.body = body
        self._loop = loop or asyncio.get_running_loop()
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._cancel = threading.Event()
        self.ran = False  # the body started (a job cancelled while queued never does)
        self.stopped = False  # cancelled before it ended (its client went away)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    def emit(self, event: Any) -> None:
        """Called from the job's thread: hand one event to the waiting coroutine."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def run(self) -> None:
        """Run the body on the calling thread; an exception becomes an event, the end is always sent."""
        try:
            if not self.cancelled:
                self.ran = True
                self.body(self.emit, lambda: self._cancel.is_set())
        except Exception as exc:  # reported to the client as an error response, never a traceback
            self.emit(_Failure(exc))
        finally:
            # Decided before the end is sent: the caller cancels (a no-op) once it has seen the end.
            self.stopped = self.cancelled
            self.emit(_END)

    def start_thread(self, name: str) -> None:
        threading.Thread(target=self.run, name=name, daemon=True).start()

    async def events(
        self, disconnected: Callable[[], Awaitable[bool]] | None = None, poll_s: float = 0.2
    ) -> AsyncIterator[Any]:
        """The job's events in order; an exception raised by the body is raised here. While waiting,
        `disconnected()` is polled: when it says the client is gone, the job is cancelled (ClientGone)."""
        checked = time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(self._events.get(), poll_s)
            except asyncio.TimeoutError:
                event = _NOTHING
            # Checked every poll_s, also while events keep coming (a collecting, non-streaming client).
            if disconnected is not None and time.monotonic() - checked >= poll_s:
                checked = time.monotonic()
                if await disconnected():
                    self.cancel()
                    raise ClientGone()
            if event is _NOTHING:
                continue
            if event is _END:
                return
            if isinstance(event, _Failure):
                raise event.error
            yield event


class Residency(Protocol):
    """What the worker needs of the model manager between jobs (moeinf.server.manager.ModelManager)."""

    def idle_timeout(self) -> float | None: ...

    def expire(self) -> None: ...

    def unload(self) -> None: ...


class Worker:
    """The one thread that runs jobs, first in first out, with at most `max_queue` waiting."""

    def __init__(self, manager: Residency, max_queue: int) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.manager = manager
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name="moeinf-worker", daemon=True)
        self._lock = threading.Lock()
        self.running: Job | None = None
        self.completed = 0  # jobs that ran to their end
        self.cancelled = 0  # jobs stopped or skipped because their client went away
        self._mean_s = 1.0  # running mean of job durations, for Retry-After

    def start(self) -> None:
        self._thread.start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> Job:
        """Queue `job`; a full queue raises QueueFull (503)."""
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(
                f"the server is busy ({self.max_queue} requests waiting): retry in {self.retry_after()} s"
            ) from None
        return job

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free (the mean job time, at least 1)."""
        return max(1, math.ceil(self._mean_s))

    def status(self) -> dict[str, int]:
        with self._lock:
            running = 1 if self.running is not None else 0
            return {
                "running": running,
                "waiting": self.waiting,
                "max_queue": self.max_queue,
                "completed": self.completed,
                "cancelled": self.cancelled,
            }

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is queued and running, let the thread finish, unload the model."""
        with self._lock:
            if self.running is not None:
                self.running.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                job.run()  # emits the end: its waiting coroutine returns
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout)
        self.manager.unload()

    def _loop(self) -> None:
        while True:
            try:
                job = self._queue.get(timeout=self.manager.idle_timeout())
            except queue.Empty:
                try:
                    self.manager.expire()
                except Exception:  # the worker must outlive a failed unload
                    log.exception("unloading the idle model failed")
                continue
            if job is None:
                return
            with self._lock:
                self.running = job
            start = time.perf_counter()
            job.run()
            elapsed = time.perf_counter() - start
            with self._lock:
                self.running = None
                if job.stopped:
                    self.cancelled += 1
                else:
                    self.completed += 1
                    self._mean_s = 0.8 * self._mean_s + 0.2 * elapsed
