"""pyfuse3's request loop, polling the FUSE device briefly before it sleeps.

pyfuse3 waits for every request with ``trio.lowlevel.wait_readable``: the
loop sleeps in epoll and the kernel wakes it when the next request comes.
On this kind of VM that wake-up is most of what a small request costs
(~25 of ~35 µs): a process reading a file 4 KiB at a time, or ``find``
stat-ing a tree, pays it once per request. So, as network stacks do with
busy polling, after each request the loop polls the device for up to
``Tuning.fuse_spin_us`` µs (``$STARGZ_TUI_FUSE_SPIN_US`` read at the edge;
default 50; 0 turns it off) before it goes
to sleep: a request that comes within that window is picked up at once. A
pyfuse3 filesystem serving from memory answers ~1.7x the 4 KiB reads per
second this way (``bench/README.md``).

What it costs and what it never does:

- It holds a core for at most the window after a request, and nothing while
  the mount is idle (the loop sleeps as before once the window is over).
- It backs off when polling does not pay: after a window in which no
  request came, the next 1, 2, 4 ... up to ``_MAX_SKIP`` waits sleep at once
  (a reader pausing just longer than the window between requests, e.g.
  working on each block it reads, would otherwise keep a core polling for
  nothing); a window that catches a request resets it.
- It does not spin while other tasks are runnable, and it goes through the
  scheduler at least every ``_YIELD_EVERY`` seconds during a stream of
  requests, so tasks waiting on sockets or worker threads are not starved.

pyfuse3 looks its ``trio`` up as a module global at each call (that is how
``pyfuse3.asyncio`` swaps asyncio in); :func:`install` puts a stand-in
there that is trio in everything but ``lowlevel.wait_readable``.
"""

from __future__ import annotations

import select
import time
import types

import trio

DEFAULT_SPIN_US = 50.0
_YIELD_EVERY = 0.0005  # seconds of back-to-back requests between scheduler passes
_MAX_SKIP = 64  # waits that sleep at once after polling found nothing, at the most


class _PollingWait:
    """``wait_readable`` that polls the fd for ``spin`` seconds before it
    hands the wait to trio."""

    def __init__(self, spin: float):
        self.spin = spin
        self._polls: dict[int, select.poll] = {}
        self._last_yield = time.perf_counter()
        self._skip = 0  # waits left that sleep at once
        self._backoff = 0  # how many the next empty window makes sleep at once
        self.caught = self.missed = 0  # windows that caught a request / ran out

    async def __call__(self, fd) -> None:
        fd = fd if isinstance(fd, int) else fd.fileno()
        now = time.perf_counter()
        if self._skip:
            self._skip -= 1
        elif self.spin and trio.lowlevel.current_statistics().tasks_runnable == 0:
            poll = self._polls.get(fd)
            if poll is None:
                poll = self._polls[fd] = select.poll()
                poll.register(fd, select.POLLIN)
            end = now + self.spin
            while True:
                if poll.poll(0):
                    self.caught += 1
                    self._backoff = 0
                    if now - self._last_yield >= _YIELD_EVERY:
                        self._last_yield = now
                        await trio.lowlevel.checkpoint()
                    return
                now = time.perf_counter()
                if now >= end:
                    self.missed += 1
                    self._backoff = min(max(1, 2 * self._backoff), _MAX_SKIP)
                    self._skip = self._backoff
                    break
        self._last_yield = now
        await trio.lowlevel.wait_readable(fd)

    def forget(self, fd) -> None:
        self._polls.pop(fd if isinstance(fd, int) else fd.fileno(), None)


class _Delegating(types.ModuleType):
    """A module that is ``target`` in every attribute not set on it."""

    def __init__(self, name: str, target: types.ModuleType):
        super().__init__(name)
        self._target = target

    def __getattr__(self, name: str):
        return getattr(self._target, name)


def polling_trio(spin: float) -> types.ModuleType:
    """A stand-in for the ``trio`` module whose ``lowlevel.wait_readable``
    polls for ``spin`` seconds first."""
    wait = _PollingWait(spin)
    lowlevel = _Delegating("trio.lowlevel (polling)", trio.lowlevel)
    lowlevel.wait_readable = wait

    def notify_closing(fd) -> None:
        wait.forget(fd)
        trio.lowlevel.notify_closing(fd)

    lowlevel.notify_closing = notify_closing
    module = _Delegating("trio (polling)", trio)
    module.lowlevel = lowlevel
    return module


def install(spin: float = DEFAULT_SPIN_US / 1e6) -> float:
    """Make pyfuse3's loop poll before it sleeps (call before
    ``pyfuse3.main()``, under trio) for ``spin`` seconds (the caller's
    ``core.options.Tuning.fuse_spin_us``; this module reads no environment).
    Returns the window in seconds (0: the loop is left as it is)."""
    import pyfuse3

    pyfuse3.trio = polling_trio(spin) if spin > 0 else trio
    return spin
