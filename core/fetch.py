"""The blob fetcher of one layer: range planning, single flight, refresh.

:class:`BlobFetcher` turns missing chunks into range requests on the
layer's :class:`core.source.BlobSource`: :meth:`BlobFetcher.plan` groups
them in blob order (joined across gaps of at most ``MAX_GAP``, within a
window) and adds missing neighbours; :meth:`BlobFetcher.fetch_bytes` reads
a group's compressed extent. It does not retry: the blob source does, by
one policy (``core.registry.policy.RequestPolicy``: no answer, 429/5xx,
an expired token or redirect URL, a registry restart); a read that still
fails is passed up as the source's typed :class:`core.errors.CoreError`
(an ``OSError`` of a local source as :class:`core.errors.BlobReadError`),
counted in :class:`ReadStats`, for the FUSE layer's one EIO and log line.

Single flight: every chunk on its way (fetched, or loaded from the disk by
read-ahead) has one :class:`Flight` in :attr:`BlobFetcher.inflight` that
later readers wait on, so two readers of one chunk cause one request.
Flights are made only by :meth:`BlobFetcher.register`; whoever registered
them answers every one (data or error), also when cancelled
(:meth:`BlobFetcher.fail`). :class:`ReadStats` holds the layer's counters
the fetcher, decoder and reader share.

Runs in one event loop; nothing here blocks.
"""

from __future__ import annotations

import anyio

from .errors import BlobReadError, CoreError, DigestMismatchError
from .estargz import Chunk, LayerIndex
from .source import BlobSource

MAX_GAP = 64 << 10  # join chunks separated by at most this many bytes


class Flight:
    """A chunk on its way: set ``data`` or ``error``, then ``event``."""

    __slots__ = ("event", "data", "error")

    def __init__(self):
        self.event = anyio.Event()
        self.data = None
        self.error: BaseException | None = None


class ReadStats:
    """The live counters of one layer's reads (``LayerReader.stats``)."""

    __slots__ = ("bytes_fetched", "requests", "chunks_fetched", "digest_errors",
                 "read_errors", "reads", "last_error")

    def __init__(self):
        self.bytes_fetched = 0
        self.requests = 0
        self.chunks_fetched = 0
        self.digest_errors = 0
        self.read_errors = 0
        self.reads = 0
        self.last_error: str | None = None


class BlobFetcher:
    """Range requests for one layer's chunks (module docs)."""

    def __init__(self, index: LayerIndex, source: BlobSource, stats: ReadStats, *,
                 window: int, neighbours: int, name: str):
        self.index = index
        self.source = source
        self.stats = stats
        self.window = window
        self.neighbours = neighbours
        self.name = name
        self.inflight: dict[int, Flight] = {}

    # -- single flight -------------------------------------------------
    def register(self, chunks: list[Chunk]) -> dict[int, Flight]:
        """A new flight for each of ``chunks`` (chunk index -> flight)."""
        inflight = self.inflight
        flights = {}
        for c in chunks:
            f = Flight()
            inflight[c.index] = f
            flights[c.index] = f
        return flights

    def land(self, index: int, flight: Flight) -> None:
        """``flight`` of chunk ``index`` is over: forget it (not a newer one)."""
        if self.inflight.get(index) is flight:
            del self.inflight[index]

    def fail(self, flights: dict[int, Flight], e: BaseException) -> None:
        """Answer every waiter still waiting with ``e`` (a cancellation as a
        read error) and drop those flights."""
        for idx, f in flights.items():
            if not f.event.is_set():
                f.error = e if isinstance(e, Exception) else BlobReadError("fetch cancelled")
                self.land(idx, f)
                f.event.set()

    # -- planning --------------------------------------------------------
    def plan(self, need: list[Chunk], cached: bytearray, extend: bool = True,
             neighbours: int | None = None, window: int | None = None) -> list[list[Chunk]]:
        """Group missing chunks (blob order) into range requests, adding
        missing neighbours (not ``cached``, not on their way) that fit the window."""
        ix = self.index
        window = self.window if window is None else window
        n = ix.num_chunks
        inflight = self.inflight
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
                    if cached[j] or j in inflight or j in taken:
                        break
                    nc = ix.chunk(j)
                    if nc.offset > gend + MAX_GAP or nc.end > limit:
                        break
                    g.append(nc)
                    taken.add(j)
                    gend = max(gend, nc.end)
                    j += 1
        return groups

    # -- the blob ----------------------------------------------------------
    async def read_blob(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the blob at ``offset``; the source's error as
        it is (module docs: retried below, never here)."""
        st = self.stats
        try:
            data = await self.source.read_range(offset, length)
        except DigestMismatchError:
            raise
        except (CoreError, OSError) as e:
            st.read_errors += 1
            st.last_error = str(e)
            if isinstance(e, CoreError):
                raise
            raise BlobReadError(f"cannot read {self.index.blob_digest[:19]}: {e}") from None
        st.requests += 1
        st.bytes_fetched += len(data)
        return data

    async def fetch_bytes(self, group: list[Chunk]) -> tuple[int, bytes]:
        """The compressed extent covering ``group``: (its blob offset, bytes)."""
        start = min(c.offset for c in group)
        end = max(c.end for c in group)
        blob = await self.read_blob(start, end - start)
        if len(blob) != end - start:
            raise BlobReadError(f"short read of {self.index.blob_digest[:19]} at {start}")
        return start, blob
