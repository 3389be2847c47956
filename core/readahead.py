"""Disk read-ahead: cached chunks loaded into memory ahead of a sequential reader.

:meth:`DiskReadAhead.launch` takes cached chunks (file order), asks the
chunk cache to group them into loads (runs stored one after the other, at
most ``DISK_LOAD_PART`` bytes each: one O_DIRECT read into a reused,
pre-faulted mmap buffer) and loads them in worker threads (at most
``DISK_THREADS`` at once), each as flights (:class:`core.fetch.Flight`)
readers wait on. Loaded chunks (checked once per process by the cache) stay
in :attr:`DiskReadAhead.window` as views of their buffer, so a request
handler answers with a view: no disk wait, no copy. The window keeps the
buffers of about ``DISK_AHEAD`` bytes (least recently read dropped first);
a buffer is reused only when no view of it is alive. A chunk that could
not be loaded (evicted, damaged) is handed to ``on_lost`` with its flight,
which fetches it again.
"""

from __future__ import annotations

import mmap
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import anyio
import anyio.to_thread

from .cache import ChunkCache
from .estargz import Chunk
from .fetch import BlobFetcher, Flight

DISK_THREADS = 2              # read-ahead loads from the disk cache at once
DISK_LOAD_PART = 4 << 20      # ... each one O_DIRECT read of at most this many bytes
DISK_AHEAD = 16 << 20         # of a sequential reader's file loaded ahead from the disk cache
_ALIGN = 4096
_BUF_SIZE = DISK_LOAD_PART + 2 * _ALIGN


class DiskReadAhead:
    """The read-ahead window of one layer (module docs). ``window``: chunk
    index -> (view, buffer id); ``buffers``: buffer id -> (buffer, chunk
    indexes), least recently read first (a reader of the window moves its
    buffer to the end)."""

    def __init__(self, cache: ChunkCache, keys: list[str], fetcher: BlobFetcher,
                 on_lost: Callable[[list[Chunk], dict[int, Flight]], Awaitable[None]]):
        self._cache = cache
        self._keys = keys
        self._fetcher = fetcher
        self._on_lost = on_lost
        self.window: dict[int, tuple[memoryview, int]] = {}
        self.buffers: OrderedDict[int, tuple[mmap.mmap, list[int]]] = OrderedDict()
        self._free: list[mmap.mmap] = []
        self._limiter: anyio.CapacityLimiter | None = None

    def launch(self, chunks: list[Chunk], tg) -> None:
        """Load cached ``chunks`` (file order) into the window in ``tg``;
        chunks the cache does not hold as asked are left to the caller's
        on-demand path."""
        keys = self._keys
        plans = self._cache.plan_loads([(keys[c.index], c.chunk_size) for c in chunks],
                                       DISK_LOAD_PART)
        for load, positions in plans:
            run = [chunks[p] for p in positions]
            tg.start_soon(self._load, load, run, self._fetcher.register(run))

    def _take_buffer(self, length: int) -> mmap.mmap | None:
        """A free buffer for a load of ``length`` bytes (None: make one)."""
        return self._free.pop() if length <= DISK_LOAD_PART and self._free else None

    def _give_buffer(self, buf: mmap.mmap) -> None:
        """Reuse ``buf`` unless a view of it is still alive somewhere."""
        try:
            buf.resize(len(buf))  # raises while views of it exist
        except BufferError:
            return  # freed by the last view
        except (OSError, SystemError, ValueError):
            return
        if len(buf) == _BUF_SIZE and len(self._free) < DISK_THREADS:
            self._free.append(buf)
        else:
            buf.close()

    def _load_sync(self, load, length: int, buf: mmap.mmap | None) -> tuple[mmap.mmap, list]:
        """Worker thread: the load (``length`` bytes) into ``buf`` (or a new,
        pre-faulted buffer: first touches of fresh pages cost more than the read)."""
        if buf is None:
            size = max(length, DISK_LOAD_PART) + 2 * _ALIGN
            buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0))
        return buf, self._cache.load(load, buf)

    async def _load(self, load, run: list[Chunk], flights: dict[int, Flight]) -> None:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(DISK_THREADS)
        buf = None
        try:
            async with self._limiter:
                length = sum(c.chunk_size for c in run)  # a load is one contiguous run
                buf = self._take_buffer(length)
                buf, got = await anyio.to_thread.run_sync(self._load_sync, load, length, buf)
        except BaseException as e:
            self._fetcher.fail(flights, e)
            if buf is not None:
                self._give_buffer(buf)
            if not isinstance(e, Exception):
                raise
            return
        bid = id(buf)
        held = []
        lost = []
        land = self._fetcher.land
        for c, v in zip(run, got, strict=True):
            if v is None:  # evicted or damaged since: fetch it again (same flight)
                lost.append(c)
                continue
            f = flights[c.index]
            self.window[c.index] = (v, bid)
            held.append(c.index)
            f.data = v
            land(c.index, f)
            f.event.set()
        del got
        if held:
            self.buffers[bid] = (buf, held)
            self.trim()
        else:
            self._give_buffer(buf)
        if lost:
            await self._on_lost(lost, {c.index: flights[c.index] for c in lost})

    def trim(self, keep: int = DISK_AHEAD // DISK_LOAD_PART + 4) -> None:
        """Drop the least recently read buffers beyond ``keep``."""
        while len(self.buffers) > keep:
            _bid, (buf, held) = self.buffers.popitem(last=False)
            for i in held:
                self.window.pop(i, None)
            self._give_buffer(buf)

    def release(self) -> None:
        """No reader left: let the window's memory go (views still held stay valid)."""
        self.trim(0)
        for buf in self._free:
            buf.close()
        self._free.clear()
