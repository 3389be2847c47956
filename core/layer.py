"""The lazy, cached reader of one layer (what a FUSE mount reads through).

:class:`LayerReader` composes the parts of the data flow for one layer:
the :class:`core.fetch.BlobFetcher` (range planning, single flight; the
blob source retries, core.registry.policy), the :class:`core.decode.ChunkDecoder`
(decompress + verify), the :class:`core.cache.ChunkCache` (memory and disk
stores behind one interface), the :class:`core.readahead.DiskReadAhead`
and the :class:`core.chunkreader.ChunkReader` (the on-demand read path:
:meth:`LayerReader.read`, :meth:`LayerReader.read_buffer`). It owns what
runs for the whole layer: prefetch (the region before
``.prefetch.landmark``, in one request), the background fetch of everything
else at low priority through the :class:`core.tasks.TaskManager`, releasing
the memory store when idle, and the live stats.

Every fetched chunk is checked against its ``chunkDigest`` before anyone
sees it; a chunk that fails is never cached or served (the read fails with
:class:`core.errors.ChunkDigestError`, which the FUSE layer turns into EIO).
A read waits for fetches at most ``read_timeout`` seconds (None: no bound;
the mount daemon's ``--read-timeout``), then fails with
:class:`core.errors.BlobReadError` while the fetch goes on.
"""

from __future__ import annotations

import logging
import time

import anyio

from .cache import ChunkCache
from .chunkreader import ChunkReader
from .chunkstore import MEMORY_ONLY, chunk_key, digestless_scope
from .errors import CoreError
from .estargz import Chunk, LayerIndex
from .fetch import BlobFetcher, ReadStats
from .source import BlobSource
from .tasks import TaskManager

log = logging.getLogger("core.layer")

DEFAULT_WINDOW = 2 << 20      # largest coalesced range request
DEFAULT_NEIGHBOURS = 256 << 10  # missing neighbours fetched along with a miss
DEFAULT_READAHEAD = 3         # windows fetched ahead of a sequential reader
DEFAULT_READAHEAD_BYTES = 32 << 20  # ... and at least this much of the file
BACKGROUND_WINDOW = 8 << 20   # range request size of the background fetch
_BACKLOG = 2                  # background units fetched beyond the slots, awaiting decode
MEMORY_IDLE = 120.0           # the memory store is emptied after this long without reads


class LayerReader:
    """Cached, coalescing, verifying reads of one layer (see module docs).

    Use inside an event loop. ``await reader.start(tg)`` loads the cache
    state and (optionally) starts prefetch and background fetch in ``tg``.
    """

    def __init__(self, index: LayerIndex, source: BlobSource, cache: ChunkCache,
                 tasks: TaskManager | None = None, *,
                 window: int = DEFAULT_WINDOW, readahead: int = DEFAULT_READAHEAD,
                 prefetch_size: int = 0, neighbours: int = DEFAULT_NEIGHBOURS,
                 readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
                 background_window: int = BACKGROUND_WINDOW,
                 read_timeout: float | None = None, name: str = ""):
        self.index = index
        self.cache = cache
        self.tasks = tasks or TaskManager()
        self.name = name or index.blob_digest[:19]
        window = max(64 << 10, window)
        self.background_window = max(window, background_window)
        self.prefetch_size = prefetch_size
        n = index.num_chunks
        # Chunks without a digest are keyed per verified TOC and source, or
        # kept in memory only (core.chunkstore docs): never another image's bytes.
        scope = digestless_scope(index, source.description, shareable=cache.private)
        self._keys = [chunk_key(index.blob_digest, index.chunk(i), scope) for i in range(n)]
        # ... and memory-only ones are not fetched in the background (nowhere to keep them)
        self._memory_only = {i for i, k in enumerate(self._keys) if k.startswith(MEMORY_ONLY)}
        self.counters = ReadStats()
        self.fetcher = BlobFetcher(index, source, self.counters,
                                   window=window, neighbours=neighbours, name=self.name)
        self._reader = r = ChunkReader(
            index, cache, self._keys, self.fetcher, self.tasks, self.counters,
            readahead=readahead,
            readahead_bytes=max(readahead_bytes, window * readahead) if readahead else 0,
            read_timeout=read_timeout)
        # the read path, bound once (no extra call per request)
        self.read = r.read
        self.read_buffer = r.read_buffer
        self.forget_stream = r.forget_stream
        self._inflight = self.fetcher.inflight
        self._win = r.disk.window
        self._ahead_to = r.ahead_to
        self._disk_to = r.disk_to
        self.prefetch_enabled = False
        self.prefetch_done = False
        self.prefetch_bytes = 0
        self.prefetch_chunks = 0
        self.background_enabled = False
        self.background_done = False
        self.background_started = False
        self.started_at = time.time()
        self._prefetch_event: anyio.Event | None = None
        self._background_event: anyio.Event | None = None

    # the counters, as attributes (ReadStats is shared by the parts)
    source = property(lambda self: self.fetcher.source)
    requests = property(lambda self: self.counters.requests)
    bytes_fetched = property(lambda self: self.counters.bytes_fetched)
    _ncached = property(lambda self: self._reader.ncached)

    @property
    def last_error(self) -> str | None:
        return self.counters.last_error

    # -- setup ---------------------------------------------------------
    async def start(self, tg, *, prefetch: bool = True, background: bool = True) -> None:
        """Load the cache state; start prefetch / background fetch in ``tg``."""
        self._reader.tg = tg
        self._prefetch_event = anyio.Event()
        self._background_event = anyio.Event()
        await anyio.to_thread.run_sync(self._reader.scan_cache)
        self.prefetch_enabled = prefetch
        self.background_enabled = background
        if prefetch:
            tg.start_soon(self._run_prefetch)
        else:
            self._finish_prefetch()
        if background:
            tg.start_soon(self._run_background)
        tg.start_soon(self._release_idle_memory)

    async def _release_idle_memory(self) -> None:
        """Give the memory store back once nothing read for ``MEMORY_IDLE`` s."""
        while True:
            await anyio.sleep(MEMORY_IDLE / 4)
            if self.cache.release_memory_if_idle(MEMORY_IDLE):
                log.debug("%s: memory cache released (idle)", self.name)

    def _finish_prefetch(self) -> None:
        self.prefetch_done = True
        if self._prefetch_event is not None:
            self._prefetch_event.set()

    async def wait_prefetch(self) -> None:
        if self._prefetch_event is not None:
            await self._prefetch_event.wait()

    async def wait_background(self) -> None:
        if self._background_event is not None:
            await self._background_event.wait()

    # -- prefetch and background fetch ------------------------------------
    def prefetch_chunk_list(self) -> list[Chunk]:
        ix = self.index
        if ix.no_prefetch:
            return []
        if ix.prefetch_end is not None:
            n = ix.prefetch_chunk_count
        elif self.prefetch_size > 0:
            n = 0
            while n < ix.num_chunks and ix.chunk(n).end <= self.prefetch_size:
                n += 1
        else:
            return []
        return [ix.chunk(i) for i in range(n)]

    async def prefetch(self) -> None:
        """Fetch the prefetch region's missing chunks in one request."""
        r = self._reader
        todo = [c for c in self.prefetch_chunk_list()
                if not r.cached[c.index] and c.index not in self._inflight]
        todo = await r.adopt(todo)
        self.prefetch_chunks = len(todo)
        if not todo:
            return
        flights = self.fetcher.register(todo)
        before = self.counters.bytes_fetched
        await r.fetch_group(todo, flights, False)
        self.prefetch_bytes = self.counters.bytes_fetched - before

    async def _run_prefetch(self) -> None:
        try:
            await self.prefetch()
        except CoreError as e:
            self.counters.last_error = f"prefetch: {e}"
            log.warning("%s: prefetch failed: %s", self.name, e)
        finally:
            self._finish_prefetch()

    async def background_fetch(self) -> None:
        """Fetch every chunk not yet cached as a pipeline: range requests of
        ``background_window`` bytes, each holding a background slot of the
        task manager only while its bytes arrive (as many in flight as it
        has slots), then decoded, verified and stored outside the slot while
        the next requests run. At most ``_BACKLOG`` fetched units wait for
        their decode and write (bounded memory)."""
        self.background_started = True
        r, fetcher = self._reader, self.fetcher
        cached, inflight = r.cached, self._inflight
        n = self.index.num_chunks
        failed: set[int] = set(self._memory_only)
        if failed:
            log.info("%s: %d chunks without a digest, nothing verifying them: read on demand "
                     "and kept in memory only", self.name, len(failed))
        cursor = [0]
        workers = max(1, self.tasks.max_concurrent)
        backlog = anyio.Semaphore(workers + _BACKLOG)

        def next_missing() -> int:
            i = cursor[0]
            while i < n and (cached[i] or i in inflight or i in failed):
                i += 1
            cursor[0] = i
            return i

        def settle(group: list[Chunk]) -> None:
            for c in group:
                if not cached[c.index] and c.index not in inflight:
                    failed.add(c.index)

        async def finish(group, flights, start: int, blob: bytes) -> None:
            try:
                await r.decode_store(group, flights, start, blob, remember=False)
            except BaseException as e:
                fetcher.fail(flights, e)
                if not isinstance(e, Exception):
                    raise
                log.warning("%s: background fetch: %s", self.name, e)
            finally:
                backlog.release()
                settle(group)

        async def worker(decoding) -> None:
            while next_missing() < n:
                await backlog.acquire()
                handed_off = False
                try:
                    async with self.tasks.background():
                        i = next_missing()
                        if i >= n:
                            return
                        group = fetcher.plan([self.index.chunk(i)], cached,
                                             neighbours=self.background_window,
                                             window=self.background_window)[0]
                        group = r.adopt_sync(group)
                        if not group or group[0].index != i:
                            continue  # another mount cached them meanwhile
                        flights = fetcher.register(group)
                        try:
                            start, blob = await fetcher.fetch_bytes(group)
                        except BaseException as e:
                            fetcher.fail(flights, e)
                            settle(group)
                            if not isinstance(e, CoreError):
                                raise
                            log.warning("%s: background fetch: %s", self.name, e)
                            await anyio.sleep(1.0)
                            continue
                    decoding.start_soon(finish, group, flights, start, blob)
                    handed_off = True
                finally:
                    if not handed_off:
                        backlog.release()

        async with anyio.create_task_group() as decoding:
            async with anyio.create_task_group() as tg:
                for _ in range(workers):
                    tg.start_soon(worker, decoding)
        # wait for fetches others started, bounded by their own requests
        for f in list(inflight.values()):
            await f.event.wait()
        for _ in range(6000):  # ... and for their cache writes (at most a minute)
            if not inflight:
                break
            await anyio.sleep(0.01)

    async def _run_background(self) -> None:
        try:
            await self.wait_prefetch()
            await self.background_fetch()
        except CoreError as e:
            self.counters.last_error = f"background fetch: {e}"
            log.warning("%s: background fetch failed: %s", self.name, e)
        finally:
            self.background_done = (self._reader.ncached + len(self._memory_only)
                                    >= self.index.num_chunks)
            if self._background_event is not None:
                self._background_event.set()

    # -- state -----------------------------------------------------------
    def is_cached(self, chunk_index: int) -> bool:
        return bool(self._reader.cached[chunk_index])

    def cached_map(self) -> bytes:
        """One byte per chunk (blob order): 1 when cached."""
        return bytes(self._reader.cached)

    def stats(self) -> dict:
        """Live numbers for ``mounts`` and the app (JSON-ready, camelCase)."""
        ix = self.index
        st = self.counters
        return {
            "blobDigest": ix.blob_digest,
            "blobSize": ix.blob_size,
            "format": ix.format,
            "entries": len(ix),
            "bytesFetched": st.bytes_fetched,
            "requests": st.requests,
            "reads": st.reads,
            "chunksCached": self._reader.ncached,
            "chunksTotal": ix.num_chunks,
            "chunksFetched": st.chunks_fetched,
            "chunksInFlight": len(self._inflight),
            "prefetchEnabled": self.prefetch_enabled,
            "prefetchDone": self.prefetch_done,
            "prefetchChunks": self.prefetch_chunks,
            "prefetchBytes": self.prefetch_bytes,
            "backgroundFetchEnabled": self.background_enabled,
            "backgroundFetchDone": self.background_done,
            "digestErrors": st.digest_errors,
            "readErrors": st.read_errors,
            # the blob source's retries of wrong answers (a registry's; the
            # client's own, of requests that got no answer, are in its stats)
            "retries": getattr(self.fetcher.source, "retries", 0),
            "errors": st.digest_errors + st.read_errors,
            "lastError": st.last_error,
            "cache": self.cache.stats(),
            "tasks": self.tasks.stats(),
        }
