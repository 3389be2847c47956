"""Background task manager: on-demand reads first, background work after.

Like stargz-snapshotter's ``task`` package: a read a user is waiting for runs
as a *prioritized* task; background work (prefetching other layers, fetching
the rest of a blob) waits while any prioritized task runs and for a silence
period after the last one ends, and at most ``max_concurrent`` background
units run at once. Background loops should take one slot per small unit of
work (one range request), so a read arriving mid-fetch only waits for one unit.

Create and use it inside a running event loop (anyio: trio or asyncio).
"""

from __future__ import annotations

import contextlib
import time

import anyio

DEFAULT_SILENCE = 5.0
DEFAULT_CONCURRENCY = 2


class TaskManager:
    def __init__(self, silence: float = DEFAULT_SILENCE, max_concurrent: int = DEFAULT_CONCURRENCY):
        self.silence = silence
        self.max_concurrent = max_concurrent
        self._prioritized = 0
        # A fresh manager counts as "just busy": background work waits one
        # silence period after a mount too, so the first on-demand reads
        # after mounting do not share the link with a background fetch.
        self._last_end = time.monotonic()
        self._changed: anyio.Event | None = None
        self._slots: anyio.Semaphore | None = None
        self.background_running = 0
        self.background_done = 0

    def _event(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed

    def _notify(self) -> None:
        ev, self._changed = self._changed, None
        if ev is not None:
            ev.set()

    @property
    def prioritized_running(self) -> int:
        return self._prioritized

    def quiet_for(self) -> float:
        """Seconds background work still has to wait (0 when it may run)."""
        if self._prioritized:
            return float("inf")
        return max(0.0, self._last_end + self.silence - time.monotonic())

    @contextlib.asynccontextmanager
    async def prioritized(self):
        """Wrap an on-demand read."""
        self._prioritized += 1
        self._notify()
        try:
            yield
        finally:
            self._prioritized -= 1
            self._last_end = time.monotonic()
            self._notify()

    def touch(self) -> None:
        """Record an on-demand read served at once (no task): background
        work waits a silence period after it too."""
        self._last_end = time.monotonic()

    async def wait_quiet(self) -> None:
        """Return once no prioritized task ran for ``silence`` seconds."""
        while True:
            wait = self.quiet_for()
            if wait <= 0:
                return
            ev = self._event()
            with anyio.move_on_after(min(wait, 3600.0)):
                await ev.wait()

    @contextlib.asynccontextmanager
    async def background(self):
        """Hold a background slot for one unit of work (waits for quiet first)."""
        if self._slots is None:
            self._slots = anyio.Semaphore(self.max_concurrent)
        while True:
            await self.wait_quiet()
            await self._slots.acquire()
            if self.quiet_for() <= 0:
                break
            self._slots.release()  # a read arrived while we waited for a slot
        self.background_running += 1
        try:
            yield
        finally:
            self.background_running -= 1
            self.background_done += 1
            self._slots.release()

    def stats(self) -> dict:
        return {
            "prioritizedRunning": self._prioritized,
            "backgroundRunning": self.background_running,
            "backgroundUnitsDone": self.background_done,
            "silence": self.silence,
            "maxConcurrent": self.max_concurrent,
        }
