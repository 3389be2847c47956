"""The lazy, cached reader of one layer (what a FUSE mount reads through).

A read maps to the chunks covering it (a per-file chunk list, bisected).
Chunks in the memory cache are served at once, and so are ranges of chunk
files the cache already verified in this process (one ``pread`` of just the
range); other chunks on disk are loaded and verified once in a worker
thread; missing chunks are fetched with their missing neighbours (blob
order, within a bounded window) in one range request. Sequential reads of a
file keep ``readahead_bytes`` of the file scheduled ahead of the reader, so
several requests are in flight and several chunks decode in parallel worker
threads; and ``DISK_AHEAD`` of it loaded from the disk cache by worker
threads (O_DIRECT reads into reused buffers, chunks checked once per
process) into a small read-ahead window, so a warm sequential read neither
waits for the disk in a request handler nor copies: handlers answer with a
view of the loaded chunk (:meth:`LayerReader.read_buffer`). Every fetched chunk is decompressed and checked against its
``chunkDigest`` in a worker thread; a chunk that fails is never cached or
served (the read fails with :class:`ChunkDigestError`, which the FUSE layer
turns into EIO). Waiters get a fetched chunk as soon as it is verified; the
cache file is written afterwards (temp file + rename) while the flight still
holds the bytes.

Single flight: a chunk being fetched has a :class:`_Flight` that later
readers wait on, so two readers of one chunk cause one request.

Also here: prefetch (the region before ``.prefetch.landmark`` in one request)
and background fetch of everything else at low priority through the
:class:`core.tasks.TaskManager`. If the blob source fails (expired token,
registry restart) the reader refreshes it and retries once. A read waits
for fetches at most ``read_timeout`` seconds (None: no bound; the mount
daemon's ``--read-timeout``), then fails with :class:`BlobReadError` while the
fetch goes on (the blob source bounds each request by its own deadline).
"""

from __future__ import annotations

import bisect
import logging
import math
import mmap
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import anyio
import anyio.to_thread

from .cache import MEMORY_ONLY, ChunkCache, chunk_key, digestless_scope
from .errors import BlobReadError, ChunkDigestError, CoreError, DigestMismatchError
from .estargz import Chunk, LayerIndex, decode_chunk
from .estargz.zstdchunked import zero_chunk_data
from .source import BlobSource
from .tasks import TaskManager

log = logging.getLogger("core.layer")

DEFAULT_WINDOW = 2 << 20      # largest coalesced range request
MAX_GAP = 64 << 10            # join chunks separated by at most this many bytes
DEFAULT_NEIGHBOURS = 256 << 10  # missing neighbours fetched along with a miss
DEFAULT_READAHEAD = 3         # windows fetched ahead of a sequential reader
DEFAULT_READAHEAD_BYTES = 32 << 20  # ... and at least this much of the file
BACKGROUND_WINDOW = 8 << 20   # range request size of the background fetch (B6: 8 MiB)
DECODE_THREADS = 2            # chunks decoding at once (isal, hashlib drop the GIL)
DECODE_PART = 2 << 20         # a group's chunks decode in parallel runs of this many bytes
READAHEAD_WINDOW = 8 << 20    # range request size of sequential read-ahead
_FILE_CHUNKS_CACHED = 4096    # per-file chunk lists kept
_SEQ_SLACK = 8 << 20          # a read this near a stream's position is sequential
_SEQ_MIN_READ = 64 << 10      # ... when it is at least this big (kernel read-ahead sends more)
_BACKLOG = 2                  # background units fetched beyond the slots, awaiting decode
MEMORY_IDLE = 120.0           # the memory cache is emptied after this long without reads
DISK_THREADS = 2              # read-ahead loads from the disk cache at once
DISK_LOAD_PART = 4 << 20      # ... each one O_DIRECT read of at most this many bytes
DISK_AHEAD = 16 << 20         # of a sequential reader's file loaded ahead from the disk cache
_ALIGN = 4096


def _covering(starts: list[int], chunks: list[Chunk], offset: int, end: int) -> list[Chunk]:
    """The chunks (in file order, starting at ``starts``) covering
    ``[offset, end)``."""
    i = bisect.bisect_right(starts, offset) - 1
    out = chunks[max(i, 0):bisect.bisect_left(starts, end, max(i, 0))]
    if out and out[0].chunk_offset + out[0].chunk_size <= offset:
        out = out[1:]
    return out


class _Flight:
    __slots__ = ("event", "data", "error")

    def __init__(self):
        self.event = anyio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class LayerReader:
    """Cached, coalescing, verifying reads of one layer (see module docs).

    Use inside an event loop. ``await reader.start(tg)`` loads the cache
    state and (optionally) starts prefetch and background fetch in ``tg``.

    Why one class (~900 lines, ~50 methods) still: range planning,
    single-flight, decoding, read-ahead and the background pipeline share the
    flight table and the buffer pool; splitting them into a fetcher, decoder,
    read-ahead and layer is issue 15's next step (measured against bench/run).
    """

    def __init__(self, index: LayerIndex, source: BlobSource, cache: ChunkCache,
                 tasks: TaskManager | None = None, *,
                 refresh: Callable[[BlobSource], Awaitable[BlobSource]] | None = None,
                 window: int = DEFAULT_WINDOW, readahead: int = DEFAULT_READAHEAD,
                 prefetch_size: int = 0, neighbours: int = DEFAULT_NEIGHBOURS,
                 readahead_bytes: int = DEFAULT_READAHEAD_BYTES,
                 background_window: int = BACKGROUND_WINDOW,
                 read_timeout: float | None = None, name: str = ""):
        self.index = index
        self.source = source
        self.cache = cache
        self.tasks = tasks or TaskManager()
        self._refresh_cb = refresh
        self.window = max(64 << 10, window)
        self.readahead = readahead
        self.readahead_bytes = max(readahead_bytes, self.window * readahead) if readahead else 0
        self.background_window = max(self.window, background_window)
        self.neighbours = neighbours
        self.prefetch_size = prefetch_size
        self.read_timeout = read_timeout
        self.name = name or index.blob_digest[:19]
        n = index.num_chunks
        # Chunks without a digest are keyed per verified TOC and source, or
        # kept in memory only (core.cache docs): never another image's bytes.
        scope = digestless_scope(index, source.description, shareable=cache.private)
        self._keys = [chunk_key(index.blob_digest, index.chunk(i), scope) for i in range(n)]
        # ... and memory-only ones are not fetched in the background (nowhere to keep them)
        self._memory_only = {i for i, k in enumerate(self._keys) if k.startswith(MEMORY_ONLY)}
        self._cached = bytearray(n)
        self._ncached = 0
        # Holes (zstd:chunked "zeros" chunks) are made, never fetched: they
        # count as cached, so no plan, prefetch or background fetch asks for them.
        self._zeros = index.zero_chunks
        for i in self._zeros:
            self._cached[i] = 1
        self._ncached = len(self._zeros)
        self._inflight: dict[int, _Flight] = {}
        self._seq: dict[object, int] = {}
        self._tg = None
        self._pending: list = []
        self._ahead: set[tuple] = set()  # (stream, file id) with a read-ahead task running
        self._ahead_to: dict[tuple, int] = {}  # (stream, file id) -> end read-ahead scheduled
        self._disk_to: dict[tuple, int] = {}  # (stream, file id) -> end of disk loads scheduled
        # chunks loaded from the disk cache by read-ahead: index -> (view, buffer id),
        # and the buffers holding them (LRU) -> (buffer, chunk indexes)
        self._win: dict[int, tuple[memoryview, int]] = {}
        self._win_bufs: OrderedDict[int, tuple[mmap.mmap, list[int]]] = OrderedDict()
        self._free_bufs: list[mmap.mmap] = []
        self._fchunks: dict[int, tuple[list[int], list[Chunk]]] = {}
        self._finfo: dict[int, tuple] = {}  # entry id -> (target, size, starts, chunks)
        self._limiter: anyio.CapacityLimiter | None = None
        self._disk_limiter: anyio.CapacityLimiter | None = None
        # live stats
        self.bytes_fetched = 0
        self.requests = 0
        self.chunks_fetched = 0
        self.digest_errors = 0
        self.read_errors = 0
        self.retries = 0
        self.reads = 0
        self.prefetch_enabled = False
        self.prefetch_done = False
        self.prefetch_bytes = 0
        self.prefetch_chunks = 0
        self.background_enabled = False
        self.background_done = False
        self.background_started = False
        self.last_error: str | None = None
        self.started_at = time.time()
        self._prefetch_event: anyio.Event | None = None
        self._background_event: anyio.Event | None = None

    # -- setup ---------------------------------------------------------
    def _scan_cache(self) -> None:
        for i, hit in enumerate(self.cache.cached(self._keys)):
            if hit and not self._cached[i]:
                self._cached[i] = 1
                self._ncached += 1

    async def start(self, tg, *, prefetch: bool = True, background: bool = True) -> None:
        """Load the cache state; start prefetch / background fetch in ``tg``."""
        self._tg = tg
        self._prefetch_event = anyio.Event()
        self._background_event = anyio.Event()
        await anyio.to_thread.run_sync(self._scan_cache)
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
        """Give the memory LRU back once nothing read for ``MEMORY_IDLE`` s."""
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

    # -- the blob ------------------------------------------------------
    async def _refresh(self) -> None:
        if self._refresh_cb is not None:
            old = self.source
            self.source = await self._refresh_cb(old)
        else:
            refresh = getattr(self.source, "refresh", None)
            if refresh is not None:
                await refresh()

    async def _read_blob(self, offset: int, length: int) -> bytes:
        try:
            data = await self.source.read_range(offset, length)
        except DigestMismatchError:
            raise
        except (CoreError, OSError) as e:
            log.warning("%s: range read %d+%d failed (%s); refreshing and retrying once",
                        self.name, offset, length, e)
            self.retries += 1
            try:
                await self._refresh()
            except (CoreError, OSError) as e2:
                log.warning("%s: refreshing the blob source failed: %s", self.name, e2)
            try:
                data = await self.source.read_range(offset, length)
            except (CoreError, OSError) as e3:
                self.read_errors += 1
                self.last_error = str(e3)
                raise BlobReadError(f"cannot read {self.index.blob_digest[:19]}: {e3}") from None
        self.requests += 1
        self.bytes_fetched += len(data)
        return data

    # -- fetching ------------------------------------------------------
    def _plan(self, need: list[Chunk], extend: bool = True,
              neighbours: int | None = None, window: int | None = None) -> list[list[Chunk]]:
        """Group missing chunks (blob order) into range requests, adding
        missing neighbours that fit the window."""
        ix = self.index
        window = self.window if window is None else window
        n = ix.num_chunks
        taken: set[int] = set()
        groups: list[list[Chunk]] = []
        for c in sorted(need, key=lambda c: c.index):
            if c.index in taken:
                continue
            g = groups[-1] if groups else None
            if (g is not None and c.offset <= max(x.end for x in g) + MAX_GAP
                    and c.end - g[0].offset <= window):
                g.append(c)
            else:
                g = [c]
                groups.append(g)
            taken.add(c.index)
        neighbours = self.neighbours if neighbours is None else neighbours
        if extend and neighbours > 0:
            for g in groups:
                j = g[-1].index + 1
                gend = max(x.end for x in g)
                limit = min(g[0].offset + window, gend + neighbours)
                while j < n:
                    if self._cached[j] or j in self._inflight or j in taken:
                        break
                    nc = ix.chunk(j)
                    if nc.offset > gend + MAX_GAP or nc.end > limit:
                        break
                    g.append(nc)
                    taken.add(j)
                    gend = max(gend, nc.end)
                    j += 1
        return groups

    def _decode_group(self, blob: bytes, start: int, group: list[Chunk], remember: bool):
        """Worker thread: decompress and verify each chunk (memory LRU too
        when ``remember``); the disk write is :meth:`_store`'s."""
        out = []
        fmt = self.index.format
        mv = memoryview(blob)
        for c in group:
            piece = mv[c.offset - start : c.end - start]
            try:
                data = decode_chunk(fmt, piece, c, self.index.path_of(c.entry_id))
            except ChunkDigestError as e:
                out.append((c, None, e))
                continue
            if remember:
                self.cache.remember(self._keys[c.index], data)
            out.append((c, data, None))
        return out

    @staticmethod
    def _split(group: list[Chunk]) -> list[list[Chunk]]:
        """Blob-order runs of ``group`` of about DECODE_PART bytes each."""
        total = sum(c.chunk_size for c in group)
        if len(group) < 2 or total <= DECODE_PART:
            return [group]
        parts: list[list[Chunk]] = [[]]
        size = 0
        for c in group:
            if size >= DECODE_PART:
                parts.append([])
                size = 0
            parts[-1].append(c)
            size += c.chunk_size
        return parts

    def _store(self, items: list[tuple[str, bytes]]) -> None:
        """Worker thread: write verified chunks to the disk cache (one pack)."""
        self.cache.put_many(items)

    def _decode_limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(DECODE_THREADS)
        return self._limiter

    def _launch(self, group: list[Chunk], prioritized: bool) -> None:
        """Register flights for ``group`` and fetch it in the reader's task group."""
        flights = {}
        for c in group:
            f = _Flight()
            self._inflight[c.index] = f
            flights[c.index] = f
        if self._tg is not None:
            self._tg.start_soon(self._fetch_group, group, flights, prioritized)
        else:  # no long-lived task group: caller awaits the flights itself
            self._pending.append((group, flights, prioritized))

    def _fail_flights(self, flights: dict[int, _Flight], e: BaseException) -> None:
        """Answer every waiter still waiting with ``e`` (a cancellation as a
        read error) and drop those flights."""
        for idx, f in flights.items():
            if not f.event.is_set():
                f.error = e if isinstance(e, Exception) else BlobReadError("fetch cancelled")
                if self._inflight.get(idx) is f:
                    del self._inflight[idx]
                f.event.set()

    async def _fetch_group(self, group: list[Chunk], flights: dict[int, _Flight],
                           prioritized: bool, remember: bool = True) -> None:
        try:
            if prioritized:
                async with self.tasks.prioritized():
                    await self._fetch_group_inner(group, flights, remember)
            else:
                await self._fetch_group_inner(group, flights, remember)
        except BaseException as e:  # incl. cancellation: never leave waiters hanging
            self._fail_flights(flights, e)
            if not isinstance(e, Exception):
                raise

    async def _fetch_bytes(self, group: list[Chunk]) -> tuple[int, bytes]:
        """The compressed extent covering ``group``: (its blob offset, bytes)."""
        start = min(c.offset for c in group)
        end = max(c.end for c in group)
        blob = await self._read_blob(start, end - start)
        if len(blob) != end - start:
            raise BlobReadError(f"short read of {self.index.blob_digest[:19]} at {start}")
        return start, blob

    async def _fetch_group_inner(self, group, flights, remember: bool = True) -> None:
        """Fetch, decode, answer waiters, store."""
        start, blob = await self._fetch_bytes(group)
        await self._decode_store(group, flights, start, blob, remember)

    async def _decode_store(self, group, flights, start: int, blob: bytes,
                            remember: bool = True) -> None:
        """Decode and verify ``group`` from its fetched bytes (parallel worker
        threads), answer its waiters, then write its cache pack."""
        good = []

        async def decode(part: list[Chunk]) -> None:
            results = await anyio.to_thread.run_sync(self._decode_group, blob, start, part,
                                                     remember, limiter=self._decode_limiter())
            for c, data, err in results:
                f = flights[c.index]
                if err is not None:
                    self.digest_errors += 1
                    self.last_error = str(err)
                    log.error("%s: %s", self.name, err)
                    f.error = err
                    self._inflight.pop(c.index, None)
                else:
                    self.chunks_fetched += 1
                    f.data = data
                    good.append(c)
                f.event.set()  # waiters go on; the flight keeps the bytes until stored

        parts = self._split(group)
        if len(parts) == 1:
            await decode(group)
        else:  # parts decode in parallel threads, each answering its waiters at once
            async with anyio.create_task_group() as tg:
                for part in parts:
                    tg.start_soon(decode, part)
        blob = b""  # let the compressed bytes go before the cache writes
        good.sort(key=lambda c: c.index)
        await self._store_flights(good, flights)

    async def _store_flights(self, good: list[Chunk], flights: dict[int, _Flight]) -> None:
        try:
            if good:
                await anyio.to_thread.run_sync(
                    self._store, [(self._keys[c.index], flights[c.index].data) for c in good])
                for c in good:  # on disk now (or in memory only when the disk is full)
                    self._mark_cached(c.index)
        finally:
            for c in good:
                if self._inflight.get(c.index) is flights[c.index]:
                    del self._inflight[c.index]

    async def _get_chunks(self, chunks: list[Chunk], prioritized: bool = True) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        on_disk: list[Chunk] = []
        missing: list[Chunk] = []
        for c in chunks:
            if c.index in self._zeros:
                out[c.index] = zero_chunk_data(c, self.index.path_of(c.entry_id))
                continue
            d = self.cache.get_memory(self._keys[c.index])
            if d is not None and len(d) == c.chunk_size:
                out[c.index] = d
            elif c.index in self._win:
                out[c.index] = self._win[c.index][0]
            elif c.index in self._inflight:
                missing.append(c)
            else:
                on_disk.append(c)  # ours, or cached by another mount sharing the cache
        if on_disk:
            loaded = await anyio.to_thread.run_sync(
                lambda: [(c, self.cache.get(self._keys[c.index])) for c in on_disk])
            for c, d in loaded:
                # A digest-keyed chunk is shared by every layer naming that
                # digest: one whose TOC claims another size for it must not
                # be served the cached bytes (a short file); fetch and fail.
                if d is not None and len(d) != c.chunk_size:
                    d = None
                if d is None:
                    if self._cached[c.index]:  # evicted or damaged since
                        self._cached[c.index] = 0
                        self._ncached -= 1
                    missing.append(c)
                else:
                    self._mark_cached(c.index)
                    out[c.index] = d
        if missing:
            waits: dict[int, _Flight] = {}
            need = []
            for c in missing:
                f = self._inflight.get(c.index)
                if f is not None:
                    waits[c.index] = f
                else:
                    need.append(c)
            for g in self._plan(need):
                self._launch(g, prioritized)
                for c in g:
                    waits[c.index] = self._inflight[c.index]
            # A read waits for the network at most read_timeout: a registry
            # that answers too slowly fails the read, not the reader (the
            # fetch itself goes on, bounded by the registry's own deadline).
            with anyio.move_on_after(self.read_timeout or math.inf) as scope:
                pending, self._pending = self._pending, []
                if pending:
                    async with anyio.create_task_group() as tg:
                        for group, flights, prio in pending:
                            tg.start_soon(self._fetch_group, group, flights, prio)
                for c in missing:
                    f = waits[c.index]
                    await f.event.wait()
                    if f.error is not None:
                        if isinstance(f.error, CoreError):
                            raise f.error
                        raise BlobReadError(f"reading {self.index.path_of(c.entry_id)}: {f.error}")
                    out[c.index] = f.data
            if scope.cancelled_caught:
                raise BlobReadError(f"no data within the read timeout ({self.read_timeout:g} "
                                    "s); the fetch goes on in the background")
        return out

    def _mark_cached(self, i: int) -> None:
        if not self._cached[i]:
            self._cached[i] = 1
            self._ncached += 1

    async def _adopt_from_disk(self, chunks: list[Chunk]) -> list[Chunk]:
        """Mark chunks another mount already cached; return the rest."""
        has = await anyio.to_thread.run_sync(
            self.cache.cached, [self._keys[c.index] for c in chunks])
        rest = []
        for c, h in zip(chunks, has, strict=True):
            if h:
                self._mark_cached(c.index)
            else:
                rest.append(c)
        return rest

    # -- reading -------------------------------------------------------
    def _target(self, entry_id: int):
        e = self.index.entry(entry_id)
        tid = e.target_id
        return self.index.entry(tid) if tid is not None else e

    def _file_info(self, entry_id: int) -> tuple:
        """(target entry, size, chunk starts, chunks) of a file entry (cached)."""
        target = self._target(entry_id)
        starts, chunks = self._file_chunks(target)
        fi = (target, target.size, starts, chunks)
        if len(self._finfo) >= _FILE_CHUNKS_CACHED:
            self._finfo.pop(next(iter(self._finfo)))
        self._finfo[entry_id] = fi
        return fi

    def _file_chunks(self, target) -> tuple[list[int], list[Chunk]]:
        """The file's chunks in file order and their start offsets (cached)."""
        fc = self._fchunks.get(target.id)
        if fc is None:
            chunks = self.index.chunks(target)
            fc = ([c.chunk_offset for c in chunks], chunks)
            if len(self._fchunks) >= _FILE_CHUNKS_CACHED:
                self._fchunks.pop(next(iter(self._fchunks)))
            self._fchunks[target.id] = fc
        return fc

    def _chunks_for_range(self, target, offset: int, size: int) -> list[Chunk]:
        starts, chunks = self._file_chunks(target)
        if not chunks or size <= 0:
            return []
        return _covering(starts, chunks, offset, offset + size)

    def _read_fast(self, chunks: list[Chunk], offset: int, end: int):
        """The bytes from the memory cache or verified cache files (a pread
        each), or None when any part needs the slow path (a gap, a chunk not
        verified on disk, or one on its way: its flight is awaited instead).
        A single part from memory is a memoryview of the chunk (no copy)."""
        cache = self.cache
        keys = self._keys
        inflight = self._inflight
        win = self._win
        parts = []
        pos = offset
        for c in chunks:
            cs = c.chunk_offset
            size = c.chunk_size
            if cs > pos:
                return None  # a gap: the slow path zero-fills it
            hi = min(end, cs + size)
            key = keys[c.index]
            d = cache.get_memory(key)
            if d is not None and len(d) == size:
                if pos == cs and hi - cs == size:
                    parts.append(d)
                else:
                    parts.append(memoryview(d)[pos - cs : hi - cs])
            elif c.index in win:
                v, bid = win[c.index]
                self._win_bufs.move_to_end(bid)
                parts.append(v[pos - cs : hi - cs])
            elif c.index in inflight:
                return None
            else:
                d = cache.read_range(key, pos - cs, hi - pos, size)
                if d is None:
                    return None
                parts.append(d)
            pos = hi
        if pos < end:
            return None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read(self, entry_id: int, offset: int, size: int, *, stream: object = None) -> bytes:
        """Bytes ``[offset, offset+size)`` of a regular file (clipped at EOF).

        ``stream`` identifies a reader (a FUSE file handle) for sequential
        read-ahead. Raises :class:`ChunkDigestError` / :class:`BlobReadError`."""
        data = await self.read_buffer(entry_id, offset, size, stream=stream)
        return data if isinstance(data, bytes) else bytes(data)

    async def read_buffer(self, entry_id: int, offset: int, size: int, *,
                          stream: object = None) -> bytes | memoryview:
        """:meth:`read`, but the answer may be a read-only memoryview of a
        cached chunk (no copy; what the FUSE reply takes)."""
        fi = self._finfo.get(entry_id)
        if fi is None:
            fi = self._file_info(entry_id)
        target, fsize, starts, fchunks = fi
        end = min(fsize, offset + size)
        if offset >= end:
            return b""
        self.reads += 1
        chunks = _covering(starts, fchunks, offset, end)
        if stream is not None:
            # The kernel reads ahead with several requests at once, so they
            # may arrive out of order: "near where the stream was" counts.
            # Small reads never count: random readers (a database,
            # FADV_RANDOM) are not a stream, and the kernel's read-ahead
            # sends sequential readers' requests in bigger pieces.
            key = (stream, target.id)
            prev = self._seq.get(key)
            sequential = end - offset >= _SEQ_MIN_READ and (
                offset == 0 or (prev is not None and abs(offset - prev) <= _SEQ_SLACK))
            self._seq[key] = end if prev is None or not sequential else max(prev, end)
            if sequential and end < fsize and self.readahead and self._tg is not None:
                self._read_ahead(key, target, end)
        if self._zeros and any(c.index in self._zeros for c in chunks):
            # Holes stay zeros in the answer: nothing fetched, nothing the
            # size of a hole (which may be gigabytes) allocated.
            chunks = [c for c in chunks if c.index not in self._zeros]
            got = {}
            if chunks:
                async with self.tasks.prioritized():
                    got = await self._get_chunks(chunks)
            return self._assemble(chunks, got, offset, end)
        result = self._read_fast(chunks, offset, end)
        if result is not None:
            self.tasks.touch()
            return result
        async with self.tasks.prioritized():
            got = await self._get_chunks(chunks)
        if len(chunks) == 1 and chunks[0].chunk_offset <= offset and \
                chunks[0].chunk_offset + chunks[0].chunk_size >= end:
            c = chunks[0]
            d = got[c.index]
            if offset == c.chunk_offset and end - offset == len(d):
                return d
            return memoryview(d)[offset - c.chunk_offset : end - c.chunk_offset]
        return self._assemble(chunks, got, offset, end)

    @staticmethod
    def _assemble(chunks: list[Chunk], got: dict, offset: int, end: int) -> bytes:
        buf = bytearray(end - offset)  # gaps (sparse-looking files, holes) stay zero
        for c in chunks:
            d = got[c.index]
            lo = max(offset, c.chunk_offset)
            hi = min(end, c.chunk_offset + len(d))
            if hi > lo:
                buf[lo - offset : hi - offset] = d[lo - c.chunk_offset : hi - c.chunk_offset]
        return bytes(buf)

    def _read_ahead(self, key: tuple, target, pos: int) -> None:
        if key in self._ahead:
            return
        size = target.size
        done = self._ahead_to.get(key, 0)
        fetch = not (pos <= done and (done >= size or done - pos >= self.readahead_bytes // 2))
        disk = False
        if self._ncached:
            done = self._disk_to.get(key, 0)
            disk = not (pos <= done and (done >= size or done - pos > DISK_AHEAD - DISK_LOAD_PART))
        if fetch or disk:
            self._ahead.add(key)
            self._tg.start_soon(self._read_ahead_task, key, target, pos, fetch, disk)

    async def _read_ahead_task(self, key: tuple, target, pos: int, fetch: bool,
                               disk: bool) -> None:
        """Keep ``readahead_bytes`` of the file ahead of a sequential reader
        on their way (missing chunks fetched, prioritized), and
        ``DISK_AHEAD`` of it loaded from the disk cache into memory by worker
        threads (:meth:`_launch_loads`), so request handlers neither wait
        for the disk nor copy."""
        try:
            inflight = self._inflight
            if fetch:
                span = self.readahead_bytes
                done = self._ahead_to.get(key, 0)
                start = done if pos <= done < pos + span else pos
                stop = min(pos + span, target.size)
                self._ahead_to[key] = stop
                ahead = self._chunks_for_range(target, start, stop - start) if stop > start else []
                need = [c for c in ahead if not self._cached[c.index] and c.index not in inflight]
                if need:
                    need = await self._adopt_from_disk(need)
                need = [c for c in need if not self._cached[c.index] and c.index not in inflight]
                for g in self._plan(need, extend=False, window=max(self.window, READAHEAD_WINDOW)):
                    self._launch(g, True)
            if disk:
                done = self._disk_to.get(key, 0)
                start = done if pos <= done < pos + DISK_AHEAD else pos
                stop = min(pos + DISK_AHEAD, target.size)
                self._disk_to[key] = stop
                if stop > start:
                    cache, keys, win = self.cache, self._keys, self._win
                    load = [c for c in self._chunks_for_range(target, start, stop - start)
                            if self._cached[c.index] and c.index not in inflight
                            and c.index not in win and not cache.in_memory(keys[c.index])]
                    if load:
                        self._launch_loads(load)
        finally:
            self._ahead.discard(key)

    # -- read-ahead from the disk cache ----------------------------------
    def _launch_loads(self, chunks: list[Chunk]) -> None:
        """Load cached chunks (file order) into the read-ahead window: runs
        of chunks stored one after the other in one pack, up to
        ``DISK_LOAD_PART`` bytes, one O_DIRECT read each into a reused
        buffer, as flights readers wait on."""
        cache = self.cache
        runs: list[tuple[str, int, int, list]] = []  # (pack, offset, length, [(chunk, key, rel)])
        for c in chunks:
            key = self._keys[c.index]
            loc = cache.where(key)
            if loc is None or loc[2] != c.chunk_size:
                continue  # not indexed here (or another size): the on-demand path handles it
            name, off, size = loc
            r = runs[-1] if runs else None
            if (r is not None and r[0] == name and r[1] + r[2] == off
                    and r[2] + size <= DISK_LOAD_PART):
                r[3].append((c, key, r[2]))
                runs[-1] = (name, r[1], r[2] + size, r[3])
            else:
                runs.append((name, off, size, [(c, key, 0)]))
        for run in runs:
            flights = {}
            for c, _k, _r in run[3]:
                f = _Flight()
                self._inflight[c.index] = f
                flights[c.index] = f
            self._tg.start_soon(self._load_run, run, flights)

    def _take_buffer(self, length: int) -> mmap.mmap | None:
        """A free buffer for a load of ``length`` bytes (None: make one)."""
        if length + 2 * _ALIGN <= DISK_LOAD_PART + 2 * _ALIGN and self._free_bufs:
            return self._free_bufs.pop()
        return None

    @staticmethod
    def _new_buffer(length: int) -> mmap.mmap:
        """Worker thread: a page-aligned buffer for a load of ``length``
        bytes, pre-faulted (first touches of fresh pages cost more than the
        read itself)."""
        need = max(length, DISK_LOAD_PART) + 2 * _ALIGN
        return mmap.mmap(-1, need, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0))

    def _give_buffer(self, buf: mmap.mmap) -> None:
        """Reuse ``buf`` unless a view of it is still alive somewhere."""
        try:
            buf.resize(len(buf))  # raises while views of it exist
        except BufferError:
            return  # freed by the last view
        except (OSError, SystemError, ValueError):
            return
        if len(buf) == DISK_LOAD_PART + 2 * _ALIGN and len(self._free_bufs) < DISK_THREADS:
            self._free_bufs.append(buf)
        else:
            buf.close()

    def _load_sync(self, run, buf: mmap.mmap | None) -> tuple[mmap.mmap, list]:
        """Worker thread: the run's chunks from its pack into ``buf`` (or a
        new buffer), each checked (once per process); None for chunks not
        loaded."""
        name, off, length, items = run
        if buf is None:
            buf = self._new_buffer(length)
        view = self.cache.read_into(name, off, length, buf)
        if view is None:
            return buf, [None] * len(items)
        out = []
        for c, key, rel in items:
            v = view[rel : rel + c.chunk_size]
            out.append(v if self.cache.check_loaded(key, v) else None)
        return buf, out

    async def _load_run(self, run, flights: dict[int, _Flight]) -> None:
        if self._disk_limiter is None:
            self._disk_limiter = anyio.CapacityLimiter(DISK_THREADS)
        buf = None
        try:
            async with self._disk_limiter:
                buf = self._take_buffer(run[2])
                buf, got = await anyio.to_thread.run_sync(self._load_sync, run, buf)
        except BaseException as e:
            self._fail_flights(flights, e)
            if buf is not None:
                self._give_buffer(buf)
            if not isinstance(e, Exception):
                raise
            return
        bid = id(buf)
        held = []
        refetch = []
        for (c, _k, _r), v in zip(run[3], got, strict=True):
            f = flights[c.index]
            if v is None:  # evicted or damaged since: fetch it again (same flight)
                if self._cached[c.index]:
                    self._cached[c.index] = 0
                    self._ncached -= 1
                refetch.append(c)
                continue
            self._win[c.index] = (v, bid)
            held.append(c.index)
            f.data = v
            if self._inflight.get(c.index) is f:
                del self._inflight[c.index]
            f.event.set()
        del got
        if held:
            self._win_bufs[bid] = (buf, held)
            self._trim_window()
        else:
            self._give_buffer(buf)
        if refetch:
            await self._fetch_group(refetch, {c.index: flights[c.index] for c in refetch}, True)

    def _trim_window(self, keep: int = DISK_AHEAD // DISK_LOAD_PART + 4) -> None:
        """Drop the least recently read buffers beyond ``keep``."""
        while len(self._win_bufs) > keep:
            _bid, (buf, held) = self._win_bufs.popitem(last=False)
            for i in held:
                self._win.pop(i, None)
            self._give_buffer(buf)

    def forget_stream(self, stream: object) -> None:
        for key in [k for k in self._seq if k[0] == stream]:
            del self._seq[key]
        for d in (self._ahead_to, self._disk_to):
            for key in [k for k in d if k[0] == stream]:
                del d[key]
        if not self._seq:  # no reader left: let the read-ahead window's memory go
            self._trim_window(0)
            for buf in self._free_bufs:
                buf.close()
            self._free_bufs.clear()

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
        todo = [c for c in self.prefetch_chunk_list()
                if not self._cached[c.index] and c.index not in self._inflight]
        todo = await self._adopt_from_disk(todo)
        self.prefetch_chunks = len(todo)
        if not todo:
            return
        flights = {}
        for c in todo:
            f = _Flight()
            self._inflight[c.index] = f
            flights[c.index] = f
        before = self.bytes_fetched
        await self._fetch_group(todo, flights, False)
        self.prefetch_bytes = self.bytes_fetched - before

    async def _run_prefetch(self) -> None:
        try:
            await self.prefetch()
        except CoreError as e:
            self.last_error = f"prefetch: {e}"
            log.warning("%s: prefetch failed: %s", self.name, e)
        finally:
            self._finish_prefetch()

    def _adopt_sync(self, chunks: list[Chunk]) -> list[Chunk]:
        """:meth:`_adopt_from_disk` without a thread (a stat per chunk)."""
        rest = []
        has = self.cache.cached([self._keys[c.index] for c in chunks])
        for c, h in zip(chunks, has, strict=True):
            if h:
                self._mark_cached(c.index)
            else:
                rest.append(c)
        return rest

    async def background_fetch(self) -> None:
        """Fetch every chunk not yet cached as a pipeline: range requests of
        ``background_window`` bytes, each holding a background slot of the
        task manager only while its bytes arrive (as many in flight as it
        has slots), then decoded, verified and stored outside the slot while
        the next requests run. At most ``_BACKLOG`` fetched units wait for
        their decode and write (bounded memory)."""
        self.background_started = True
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
            while i < n and (self._cached[i] or i in self._inflight or i in failed):
                i += 1
            cursor[0] = i
            return i

        def settle(group: list[Chunk]) -> None:
            for c in group:
                if not self._cached[c.index] and c.index not in self._inflight:
                    failed.add(c.index)

        async def finish(group, flights, start: int, blob: bytes) -> None:
            try:
                await self._decode_store(group, flights, start, blob, remember=False)
            except BaseException as e:
                self._fail_flights(flights, e)
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
                        group = self._plan([self.index.chunk(i)],
                                           neighbours=self.background_window,
                                           window=self.background_window)[0]
                        group = self._adopt_sync(group)
                        if not group or group[0].index != i:
                            continue  # another mount cached them meanwhile
                        flights = {}
                        for c in group:
                            f = _Flight()
                            self._inflight[c.index] = f
                            flights[c.index] = f
                        try:
                            start, blob = await self._fetch_bytes(group)
                        except BaseException as e:
                            self._fail_flights(flights, e)
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
        for f in list(self._inflight.values()):
            await f.event.wait()
        for _ in range(6000):  # ... and for their cache writes (at most a minute)
            if not self._inflight:
                break
            await anyio.sleep(0.01)

    async def _run_background(self) -> None:
        try:
            await self.wait_prefetch()
            await self.background_fetch()
        except CoreError as e:
            self.last_error = f"background fetch: {e}"
            log.warning("%s: background fetch failed: %s", self.name, e)
        finally:
            self.background_done = (self._ncached + len(self._memory_only)
                                    >= self.index.num_chunks)
            if self._background_event is not None:
                self._background_event.set()

    # -- state -----------------------------------------------------------
    def is_cached(self, chunk_index: int) -> bool:
        return bool(self._cached[chunk_index])

    def cached_map(self) -> bytes:
        """One byte per chunk (blob order): 1 when cached."""
        return bytes(self._cached)

    def stats(self) -> dict:
        """Live numbers for ``mounts`` and the app (JSON-ready, camelCase)."""
        ix = self.index
        return {
            "blobDigest": ix.blob_digest,
            "blobSize": ix.blob_size,
            "format": ix.format,
            "entries": len(ix),
            "bytesFetched": self.bytes_fetched,
            "requests": self.requests,
            "reads": self.reads,
            "chunksCached": self._ncached,
            "chunksTotal": ix.num_chunks,
            "chunksFetched": self.chunks_fetched,
            "chunksInFlight": len(self._inflight),
            "prefetchEnabled": self.prefetch_enabled,
            "prefetchDone": self.prefetch_done,
            "prefetchChunks": self.prefetch_chunks,
            "prefetchBytes": self.prefetch_bytes,
            "backgroundFetchEnabled": self.background_enabled,
            "backgroundFetchDone": self.background_done,
            "digestErrors": self.digest_errors,
            "readErrors": self.read_errors,
            "retries": self.retries,
            "errors": self.digest_errors + self.read_errors,
            "lastError": self.last_error,
            "cache": self.cache.stats(),
            "tasks": self.tasks.stats(),
        }
