"""Decoding and verifying fetched chunks, in parallel worker threads.

:meth:`ChunkDecoder.decode` takes a group's compressed extent, decompresses
each chunk and checks it against its ``chunkDigest`` in worker threads (at
most ``DECODE_THREADS`` at once; a group bigger than ``DECODE_PART`` decodes
as parallel runs), and answers each chunk's :class:`core.fetch.Flight` as
soon as its run is done: with the bytes, or with the
:class:`core.errors.ChunkDigestError` (a chunk that fails is never served
nor cached). The flight of a good chunk stays registered, holding the
bytes, until the caller has stored it. Verified bytes of on-demand reads
are also kept in the memory store (``remember``).
"""

from __future__ import annotations

import logging

import anyio
import anyio.to_thread

from .cache import ChunkCache
from .errors import ChunkDigestError
from .estargz import Chunk, LayerIndex, decode_chunk
from .fetch import Flight, ReadStats

log = logging.getLogger("core.layer")

DECODE_THREADS = 2            # chunks decoding at once (isal, hashlib drop the GIL)
DECODE_PART = 2 << 20         # a group's chunks decode in parallel runs of this many bytes


def split_runs(group: list[Chunk]) -> list[list[Chunk]]:
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


class ChunkDecoder:
    """Decodes and verifies one layer's fetched chunks (module docs)."""

    def __init__(self, index: LayerIndex, keys: list[str], cache: ChunkCache,
                 inflight: dict[int, Flight], stats: ReadStats, name: str):
        self.index = index
        self._keys = keys
        self._cache = cache
        self._inflight = inflight
        self._stats = stats
        self._name = name
        self._limiter: anyio.CapacityLimiter | None = None

    def _decode_run(self, blob: bytes, start: int, group: list[Chunk], remember: bool):
        """Worker thread: decompress and verify each chunk (memory store too
        when ``remember``)."""
        out = []
        fmt = self.index.format
        path_of = self.index.path_of
        keep = self._cache.remember
        keys = self._keys
        mv = memoryview(blob)
        for c in group:
            piece = mv[c.offset - start : c.end - start]
            try:
                data = decode_chunk(fmt, piece, c, path_of(c.entry_id))
            except ChunkDigestError as e:
                out.append((c, None, e))
                continue
            if remember:
                keep(keys[c.index], data)
            out.append((c, data, None))
        return out

    async def decode(self, group: list[Chunk], flights: dict[int, Flight], start: int,
                     blob: bytes, remember: bool) -> list[Chunk]:
        """Decode ``group`` from ``blob`` (its extent at blob offset
        ``start``), answer its flights; returns the good chunks (blob order)."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(DECODE_THREADS)
        good: list[Chunk] = []
        st = self._stats

        async def run(part: list[Chunk]) -> None:
            results = await anyio.to_thread.run_sync(self._decode_run, blob, start, part,
                                                     remember, limiter=self._limiter)
            for c, data, err in results:
                f = flights[c.index]
                if err is not None:
                    st.digest_errors += 1
                    st.last_error = str(err)
                    log.error("%s: %s", self._name, err)
                    f.error = err
                    self._inflight.pop(c.index, None)
                else:
                    st.chunks_fetched += 1
                    f.data = data
                    good.append(c)
                f.event.set()  # waiters go on; the flight keeps the bytes until stored

        parts = split_runs(group)
        if len(parts) == 1:
            await run(group)
        else:  # parts decode in parallel threads, each answering its waiters at once
            async with anyio.create_task_group() as tg:
                for part in parts:
                    tg.start_soon(run, part)
        good.sort(key=lambda c: c.index)
        return good
