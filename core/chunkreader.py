"""The on-demand read path of one layer: file ranges -> chunks -> bytes.

A read maps to the chunks covering it (a per-file chunk list, bisected).
Chunks in the memory store are served at once, and so are chunks in the
read-ahead window (:mod:`core.readahead`) and ranges of chunks the disk
store already verified in this process (one ``pread`` of just the range):
:meth:`ChunkReader.read_buffer` answers those without awaiting anything.
Other chunks on disk are loaded and checked once in a worker thread;
missing chunks are fetched with their missing neighbours in one range
request (:class:`core.fetch.BlobFetcher`), decoded and verified
(:class:`core.decode.ChunkDecoder`), served to every waiter as soon as
verified, then stored (one pack per group) while the flight still holds
the bytes. A chunk that fails its digest is never cached or served: the
read fails with :class:`core.errors.ChunkDigestError`.

Sequential reads of a file (by ``stream``: a FUSE file handle) keep
``readahead_bytes`` of the file on their way from the network and
``DISK_AHEAD`` of it loaded from the disk store. A read waits for fetches
at most ``read_timeout`` seconds (None: no bound), then fails with
:class:`core.errors.BlobReadError` while the fetch goes on.

Runs in one event loop; :attr:`ChunkReader.cached` (one byte per chunk) is
the layer's cache map, kept by this class only.
"""

from __future__ import annotations

import bisect
import logging
import math

import anyio
import anyio.to_thread

from .cache import ChunkCache
from .decode import ChunkDecoder
from .errors import BlobReadError, CoreError
from .estargz import Chunk, LayerIndex
from .estargz.zstdchunked import zero_chunk_data
from .fetch import BlobFetcher, Flight, ReadStats
from .readahead import DISK_AHEAD, DISK_LOAD_PART, DiskReadAhead
from .tasks import TaskManager

log = logging.getLogger("core.layer")

READAHEAD_WINDOW = 8 << 20    # range request size of sequential read-ahead
_FILE_CHUNKS_CACHED = 4096    # per-file chunk lists kept
_SEQ_SLACK = 8 << 20          # a read this near a stream's position is sequential
_SEQ_MIN_READ = 64 << 10      # ... when it is at least this big (kernel read-ahead sends more)


def _covering(starts: list[int], chunks: list[Chunk], offset: int, end: int) -> list[Chunk]:
    """The chunks (in file order, starting at ``starts``) covering
    ``[offset, end)``."""
    i = bisect.bisect_right(starts, offset) - 1
    out = chunks[max(i, 0):bisect.bisect_left(starts, end, max(i, 0))]
    if out and out[0].chunk_offset + out[0].chunk_size <= offset:
        out = out[1:]
    return out


def _assemble(chunks: list[Chunk], got: dict, offset: int, end: int) -> bytes:
    buf = bytearray(end - offset)  # gaps (sparse-looking files, holes) stay zero
    for c in chunks:
        d = got[c.index]
        lo = max(offset, c.chunk_offset)
        hi = min(end, c.chunk_offset + len(d))
        if hi > lo:
            buf[lo - offset : hi - offset] = d[lo - c.chunk_offset : hi - c.chunk_offset]
    return bytes(buf)


class ChunkReader:
    """Reads of one layer's files through the cache and the fetcher (module docs).

    Not split: ~21 methods in one class, because the cache map, the flights and the
    per-stream read-ahead state are read on every request without a call
    across objects (the hot path serves tens of thousands of chunks a second
    from one thread); the parts that do not need that are already apart.
    """

    def __init__(self, index: LayerIndex, cache: ChunkCache, keys: list[str],
                 fetcher: BlobFetcher, tasks: TaskManager, stats: ReadStats, *,
                 readahead: int, readahead_bytes: int, read_timeout: float | None):
        self.index = index
        self.cache = cache
        self.keys = keys
        self.fetcher = fetcher
        self.tasks = tasks
        self.stats = stats
        self.readahead = readahead
        self.readahead_bytes = readahead_bytes
        self.read_timeout = read_timeout
        self.name = fetcher.name
        self.inflight = fetcher.inflight
        self.decoder = ChunkDecoder(index, keys, cache, self.inflight, stats, self.name)
        self.disk = DiskReadAhead(cache, keys, fetcher, self._refetch)
        self.tg = None  # the long-lived task group (LayerReader.start)
        self._pending: list = []  # fetches launched before there was one
        # The cache map: one byte per chunk. Holes (zstd:chunked "zeros"
        # chunks) are made, never fetched: they count as cached, so no plan,
        # prefetch or background fetch asks for them.
        self.cached = bytearray(index.num_chunks)
        self.zeros = index.zero_chunks
        for i in self.zeros:
            self.cached[i] = 1
        self.ncached = len(self.zeros)
        self.seq: dict[object, int] = {}  # (stream, file id) -> position
        self.ahead_to: dict[tuple, int] = {}  # (stream, file id) -> end read-ahead scheduled
        self.disk_to: dict[tuple, int] = {}  # (stream, file id) -> end of disk loads scheduled
        self._ahead: set[tuple] = set()  # (stream, file id) with a read-ahead task running
        self._fchunks: dict[int, tuple[list[int], list[Chunk]]] = {}
        self._finfo: dict[int, tuple] = {}  # entry id -> (target, size, starts, chunks)

    # -- the cache map ---------------------------------------------------
    def mark_cached(self, i: int) -> None:
        if not self.cached[i]:
            self.cached[i] = 1
            self.ncached += 1

    def _unmark(self, i: int) -> None:
        """Chunk ``i`` was evicted or damaged since it was marked."""
        if self.cached[i]:
            self.cached[i] = 0
            self.ncached -= 1

    def scan_cache(self) -> None:
        """Blocking: mark every chunk the cache holds (one look at it)."""
        for i, hit in enumerate(self.cache.cached(self.keys)):
            if hit:
                self.mark_cached(i)

    def adopt_sync(self, chunks: list[Chunk]) -> list[Chunk]:
        """Blocking (one look at the cache): mark ``chunks`` the cache holds
        (another mount may have stored them); return the rest."""
        rest = []
        keys = self.keys
        has = self.cache.cached([keys[c.index] for c in chunks])
        for c, h in zip(chunks, has, strict=True):
            if h:
                self.mark_cached(c.index)
            else:
                rest.append(c)
        return rest

    async def adopt(self, chunks: list[Chunk]) -> list[Chunk]:
        """:meth:`adopt_sync` in a worker thread."""
        return await anyio.to_thread.run_sync(self.adopt_sync, chunks)

    # -- fetching --------------------------------------------------------
    def launch(self, group: list[Chunk], prioritized: bool) -> None:
        """Register flights for ``group`` and fetch it in the task group."""
        flights = self.fetcher.register(group)
        if self.tg is not None:
            self.tg.start_soon(self.fetch_group, group, flights, prioritized)
        else:  # no long-lived task group: the caller awaits the flights itself
            self._pending.append((group, flights, prioritized))

    async def fetch_group(self, group: list[Chunk], flights: dict[int, Flight],
                          prioritized: bool, remember: bool = True) -> None:
        """Fetch, decode, answer waiters, store ``group``; every flight is
        answered, also on failure or cancellation."""
        try:
            if prioritized:
                async with self.tasks.prioritized():
                    start, blob = await self.fetcher.fetch_bytes(group)
            else:
                start, blob = await self.fetcher.fetch_bytes(group)
            await self.decode_store(group, flights, start, blob, remember)
        except BaseException as e:  # incl. cancellation: never leave waiters hanging
            self.fetcher.fail(flights, e)
            if not isinstance(e, Exception):
                raise

    async def _refetch(self, chunks: list[Chunk], flights: dict[int, Flight]) -> None:
        """Chunks read-ahead could not load (evicted, damaged): fetch them
        again under their flights."""
        for c in chunks:
            self._unmark(c.index)
        await self.fetch_group(chunks, flights, True)

    async def decode_store(self, group: list[Chunk], flights: dict[int, Flight], start: int,
                           blob: bytes, remember: bool = True) -> None:
        """Decode and verify ``group`` from its fetched bytes, answer its
        waiters, then write the good chunks to the cache (one pack)."""
        good = await self.decoder.decode(group, flights, start, blob, remember)
        blob = b""  # let the compressed bytes go before the cache writes
        land = self.fetcher.land
        try:
            if good:
                keys = self.keys
                await anyio.to_thread.run_sync(
                    self.cache.put_many, [(keys[c.index], flights[c.index].data) for c in good])
                for c in good:  # on disk now (or in memory only when the disk is full)
                    self.mark_cached(c.index)
        finally:
            for c in good:
                land(c.index, flights[c.index])

    async def get_chunks(self, chunks: list[Chunk], prioritized: bool = True) -> dict[int, bytes]:
        """The bytes of ``chunks`` (index -> bytes-like) from wherever they are."""
        out: dict[int, bytes] = {}
        on_disk: list[Chunk] = []
        missing: list[Chunk] = []
        keys, win, inflight = self.keys, self.disk.window, self.inflight
        for c in chunks:
            if c.index in self.zeros:
                out[c.index] = zero_chunk_data(c, self.index.path_of(c.entry_id))
                continue
            d = self.cache.get_memory(keys[c.index])
            if d is not None and len(d) == c.chunk_size:
                out[c.index] = d
            elif c.index in win:
                out[c.index] = win[c.index][0]
            elif c.index in inflight:
                missing.append(c)
            else:
                on_disk.append(c)  # ours, or cached by another mount sharing the cache
        if on_disk:
            get = self.cache.get
            loaded = await anyio.to_thread.run_sync(
                lambda: [(c, get(keys[c.index])) for c in on_disk])
            for c, d in loaded:
                # A digest-keyed chunk is shared by every layer naming that
                # digest: one whose TOC claims another size for it must not
                # be served the cached bytes (a short file); fetch and fail.
                if d is not None and len(d) != c.chunk_size:
                    d = None
                if d is None:
                    self._unmark(c.index)
                    missing.append(c)
                else:
                    self.mark_cached(c.index)
                    out[c.index] = d
        if missing:
            await self._wait_fetched(missing, out, prioritized)
        return out

    async def _wait_fetched(self, missing: list[Chunk], out: dict, prioritized: bool) -> None:
        """Fetch (or join the flights of) ``missing`` and put their bytes in ``out``."""
        waits: dict[int, Flight] = {}
        need = []
        inflight = self.inflight
        for c in missing:
            f = inflight.get(c.index)
            if f is not None:
                waits[c.index] = f
            else:
                need.append(c)
        for g in self.fetcher.plan(need, self.cached):
            self.launch(g, prioritized)
            for c in g:
                waits[c.index] = inflight[c.index]
        # A read waits for the network at most read_timeout: a registry
        # that answers too slowly fails the read, not the reader (the
        # fetch itself goes on, bounded by the registry's own deadline).
        with anyio.move_on_after(self.read_timeout or math.inf) as scope:
            pending, self._pending = self._pending, []
            if pending:
                async with anyio.create_task_group() as tg:
                    for group, flights, prio in pending:
                        tg.start_soon(self.fetch_group, group, flights, prio)
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

    # -- files -------------------------------------------------------------
    def _file_info(self, entry_id: int) -> tuple:
        """(target entry, size, chunk starts, chunks) of a file entry (cached)."""
        e = self.index.entry(entry_id)
        target = self.index.entry(e.target_id) if e.target_id is not None else e
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

    # -- reading -------------------------------------------------------------
    def _read_fast(self, chunks: list[Chunk], offset: int, end: int):
        """The bytes from the memory store, the read-ahead window or chunks
        verified on disk (a pread each), or None when any part needs the
        slow path (a gap, a chunk not verified on disk, or one on its way:
        its flight is awaited instead). A single part from memory is a
        memoryview of the chunk (no copy)."""
        get_memory = self.cache.get_memory
        read_range = self.cache.read_range
        keys = self.keys
        inflight = self.inflight
        win = self.disk.window
        parts = []
        pos = offset
        for c in chunks:
            cs = c.chunk_offset
            size = c.chunk_size
            if cs > pos:
                return None  # a gap: the slow path zero-fills it
            hi = min(end, cs + size)
            key = keys[c.index]
            d = get_memory(key)
            if d is not None and len(d) == size:
                if pos == cs and hi - cs == size:
                    parts.append(d)
                else:
                    parts.append(memoryview(d)[pos - cs : hi - cs])
            elif c.index in win:
                v, bid = win[c.index]
                self.disk.buffers.move_to_end(bid)
                parts.append(v[pos - cs : hi - cs])
            elif c.index in inflight:
                return None
            else:
                d = read_range(key, pos - cs, hi - pos, size)
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
        self.stats.reads += 1
        chunks = _covering(starts, fchunks, offset, end)
        if stream is not None:
            # The kernel reads ahead with several requests at once, so they
            # may arrive out of order: "near where the stream was" counts.
            # Small reads never count: random readers (a database,
            # FADV_RANDOM) are not a stream, and the kernel's read-ahead
            # sends sequential readers' requests in bigger pieces.
            key = (stream, target.id)
            prev = self.seq.get(key)
            sequential = end - offset >= _SEQ_MIN_READ and (
                offset == 0 or (prev is not None and abs(offset - prev) <= _SEQ_SLACK))
            self.seq[key] = end if prev is None or not sequential else max(prev, end)
            if sequential and end < fsize and self.readahead and self.tg is not None:
                self._read_ahead(key, target, end)
        if self.zeros and any(c.index in self.zeros for c in chunks):
            # Holes stay zeros in the answer: nothing fetched, nothing the
            # size of a hole (which may be gigabytes) allocated.
            chunks = [c for c in chunks if c.index not in self.zeros]
            got = {}
            if chunks:
                async with self.tasks.prioritized():
                    got = await self.get_chunks(chunks)
            return _assemble(chunks, got, offset, end)
        result = self._read_fast(chunks, offset, end)
        if result is not None:
            self.tasks.touch()
            return result
        async with self.tasks.prioritized():
            got = await self.get_chunks(chunks)
        if len(chunks) == 1 and chunks[0].chunk_offset <= offset and \
                chunks[0].chunk_offset + chunks[0].chunk_size >= end:
            c = chunks[0]
            d = got[c.index]
            if offset == c.chunk_offset and end - offset == len(d):
                return d
            return memoryview(d)[offset - c.chunk_offset : end - c.chunk_offset]
        return _assemble(chunks, got, offset, end)

    # -- sequential read-ahead ---------------------------------------------------
    def _read_ahead(self, key: tuple, target, pos: int) -> None:
        if key in self._ahead:
            return
        size = target.size
        done = self.ahead_to.get(key, 0)
        fetch = not (pos <= done and (done >= size or done - pos >= self.readahead_bytes // 2))
        disk = False
        if self.ncached:
            done = self.disk_to.get(key, 0)
            disk = not (pos <= done and (done >= size or done - pos > DISK_AHEAD - DISK_LOAD_PART))
        if fetch or disk:
            self._ahead.add(key)
            self.tg.start_soon(self._read_ahead_task, key, target, pos, fetch, disk)

    async def _read_ahead_task(self, key: tuple, target, pos: int, fetch: bool,
                               disk: bool) -> None:
        """Keep ``readahead_bytes`` of the file ahead of a sequential reader
        on their way (missing chunks fetched, prioritized), and
        ``DISK_AHEAD`` of it loaded from the disk store into the read-ahead
        window, so request handlers neither wait for the disk nor copy."""
        try:
            inflight, cached = self.inflight, self.cached
            if fetch:
                span = self.readahead_bytes
                done = self.ahead_to.get(key, 0)
                start = done if pos <= done < pos + span else pos
                stop = min(pos + span, target.size)
                self.ahead_to[key] = stop
                ahead = self._chunks_for_range(target, start, stop - start) if stop > start else []
                need = [c for c in ahead if not cached[c.index] and c.index not in inflight]
                if need:
                    need = await self.adopt(need)
                need = [c for c in need if not cached[c.index] and c.index not in inflight]
                window = max(self.fetcher.window, READAHEAD_WINDOW)
                for g in self.fetcher.plan(need, cached, extend=False, window=window):
                    self.launch(g, True)
            if disk:
                done = self.disk_to.get(key, 0)
                start = done if pos <= done < pos + DISK_AHEAD else pos
                stop = min(pos + DISK_AHEAD, target.size)
                self.disk_to[key] = stop
                if stop > start:
                    in_memory, keys, win = self.cache.in_memory, self.keys, self.disk.window
                    load = [c for c in self._chunks_for_range(target, start, stop - start)
                            if cached[c.index] and c.index not in inflight
                            and c.index not in win and not in_memory(keys[c.index])]
                    if load:
                        self.disk.launch(load, self.tg)
        finally:
            self._ahead.discard(key)

    def forget_stream(self, stream: object) -> None:
        """``stream`` was closed: drop its read-ahead state."""
        for key in [k for k in self.seq if k[0] == stream]:
            del self.seq[key]
        for d in (self.ahead_to, self.disk_to):
            for key in [k for k in d if k[0] == stream]:
                del d[key]
        if not self.seq:  # no reader left: let the read-ahead window's memory go
            self.disk.release()
