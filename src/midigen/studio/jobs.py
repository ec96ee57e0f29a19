"""The studio's generation queue: one job at a time in a worker thread, a bounded line of jobs waiting
behind it (the next one is refused with `BusyError`), and cancellation of a job whose client has gone.

A job reports what happens to it as events (`queued`, then whatever its work emits, then exactly one of
`done`, `error` or `cancelled`), which an asyncio consumer reads with `Job.events()`. Work runs in the
worker thread and checks `job.cancelled` as it goes; torch releases the interpreter while it computes,
so the event loop stays free for other pages while a generation runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from midigen.errors import MidigenError

log = logging.getLogger(__name__)
TERMINAL = ("done", "error", "cancelled")


class BusyError(MidigenError):
    """The queue is full: try again later (HTTP 429)."""


class Cancelled(Exception):
    """Raised by work that saw `job.cancelled` and stopped."""


@dataclass(frozen=True)
class Event:
    kind: str
    data: dict[str, Any]


class Job:
    """One unit of work, its events and its cancellation flag."""

    def __init__(self, work: Callable[[Job], dict[str, Any]], loop: asyncio.AbstractEventLoop) -> None:
        self.id = uuid.uuid4().hex
        self.work = work
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        """Report an event; safe from any thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, Event(kind, data))
        except RuntimeError:  # the event loop has closed: the server is shutting down and nobody listens
            pass

    async def events(self) -> AsyncIterator[Event]:
        """The job's events as they come, up to and including the final one."""
        while True:
            event = await self._events.get()
            yield event
            if event.kind in TERMINAL:
                return


class JobQueue:
    """Runs jobs one after another in a worker thread, with at most `capacity` waiting behind the running one."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise MidigenError(f"the queue's capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._counts = {kind: 0 for kind in TERMINAL}
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._serve, name="midigen-studio-jobs", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[Job], dict[str, Any]]) -> Job:
        """Queue `work(job)`, which returns the `done` event's data; from the event loop's thread."""
        job = Job(work, asyncio.get_running_loop())
        with self._condition:
            if self._closed:
                raise MidigenError("the studio is shutting down")
            if len(self._waiting) >= self.capacity and self._running is not None:
                raise BusyError(f"busy: {len(self._waiting)} generation(s) already wait behind the one running; "
                                f"try again shortly")
            ahead = len(self._waiting) + (self._running is not None)
            self._waiting.append(job)
            self._condition.notify()
        job.emit("queued", {"id": job.id, "ahead": ahead})
        return job

    def cancel(self, job: Job) -> None:
        """Stop `job`: dropped if it waits, told to stop if it runs; nothing if it has finished."""
        job._cancelled.set()
        with self._condition:
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, "cancelled", {"id": job.id})

    def full(self) -> bool:
        with self._condition:
            return self._running is not None and len(self._waiting) >= self.capacity

    def stats(self) -> dict[str, Any]:
        with self._condition:
            return {"running": self._running is not None, "waiting": len(self._waiting), "capacity": self.capacity,
                    **self._counts}

    def close(self, timeout_s: float = 10.0) -> None:
        """Cancel every job and stop the worker thread."""
        with self._condition:
            self._closed = True
            jobs = [*self._waiting, *([self._running] if self._running else [])]
        for job in jobs:
            self.cancel(job)
        with self._condition:
            self._condition.notify_all()
        self._thread.join(timeout_s)

    def _finish(self, job: Job, kind: str, data: dict[str, Any]) -> None:
        self._counts[kind] += 1  # under the condition's lock
        job.emit(kind, data)

    def _serve(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return
                job = self._running = self._waiting.popleft()
            kind, data = self._run(job)
            with self._condition:
                self._running = None
                self._finish(job, kind, data)

    @staticmethod
    def _run(job: Job) -> tuple[str, dict[str, Any]]:
        try:
            result = job.work(job)
        except Cancelled:
            return "cancelled", {"id": job.id}
        except MidigenError as exc:
            return "error", {"id": job.id, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 (a bug must cost this job, not the studio)
            log.exception("generation %s failed", job.id)
            return "error", {"id": job.id, "error": f"internal error: {type(exc).__name__}: {exc}".splitlines()[0]}
        return ("cancelled", {"id": job.id}) if job.cancelled else ("done", result)
