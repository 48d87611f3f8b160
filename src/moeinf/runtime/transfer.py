"""Transfers: the only thread and stream code in moeinf.

`TransferQueue` runs jobs on a few worker threads in priority order (demand before prefetch, then
FIFO); a queued job can be cancelled or promoted until a worker takes it. `CopyStream` wraps a
dedicated CUDA stream: host->device copies recorded with events, so the compute stream waits on
exactly the copy it needs, never on the whole device.
"""

from __future__ import annotations

import heapq
import itertools
import signal
import threading
from collections.abc import Callable
from typing import Any

DEMAND = 0
PREFETCH = 1


class Job:
    """One unit of transfer work. State changes happen under the queue's lock."""

    __slots__ = ("payload", "priority", "started", "cancelled")

    def __init__(self, payload: Any, priority: int) -> None:
        self.payload = payload
        self.priority = priority
        self.started = False
        self.cancelled = False


class TransferQueue:
    def __init__(self, run: Callable[[Job], None], workers: int = 4, name: str = "moeinf-io") -> None:
        self._run = run
        self._heap: list[tuple[int, int, Job]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, payload: Any, priority: int) -> Job:
        job = Job(payload, priority)
        with self._cv:
            heapq.heappush(self._heap, (priority, next(self._seq), job))
            self._cv.notify()
        return job

    def promote(self, job: Job, priority: int) -> None:
        """Raise a queued job's priority (a prefetch that became a demand)."""
        with self._cv:
            if not job.started and not job.cancelled and priority < job.priority:
                job.priority = priority
                # The old heap entry goes stale: the worker skips entries whose priority no longer matches.
                heapq.heappush(self._heap, (priority, next(self._seq), job))
                self._cv.notify()

    def cancel(self, job: Job) -> bool:
        """Cancel a job no worker has taken yet; False if it already started."""
        with self._cv:
            if job.started:
                return False
            job.cancelled = True
            return True

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()

    def _work(self) -> None:
        # Signals are for the main thread (Ctrl-C must interrupt the model or the REPL, not a reader).
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while True:
            with self._cv:
                while True:
                    while not self._heap and not self._closed:
                        self._cv.wait()
                    if not self._heap:
                        return  # closed and drained
                    priority, _, job = heapq.heappop(self._heap)
                    if job.cancelled or job.started or priority != job.priority:
                        continue
                    job.started = True
                    break
            self._run(job)


class CopyStream:
    """Host->device copies on a dedicated CUDA stream, each followed by an event to wait on."""

    def __init__(self, device: Any) -> None:
        import torch

        self._torch = torch
        self.stream = torch.cuda.Stream(device=device)

    def copy(self, dst: Any, src: Any, after: Any = None) -> Any:
        """Copy pinned `src` into device `dst` once event `after` (the slot's last use) has passed.

        Returns the event that marks the copy done."""
        torch = self._torch
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event
