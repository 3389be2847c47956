"""The simple read path: file ranges straight from a blob source (a caller
may keep the verified chunks it fetches through ``on_chunk``).

Used by ``cat``, ``verify`` and extraction; the FUSE core has its own cached,
coalescing reader (core/layer.py) over the same chunk functions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import anyio.to_thread

from ..errors import DigestMismatchError, FormatError
from ..source import BlobSource
from .chunks import decode_chunk, decode_chunk_window
from .toc import REG, Chunk, Entry, LayerIndex
from .zstdchunked import zero_chunk_data

# Merge neighbouring chunks into one request up to this many compressed bytes.
COALESCE_BYTES = 4 << 20


def _groups(chunks: list[Chunk]) -> list[list[Chunk]]:
    """Split chunks (in blob order) into runs fetched with one request each."""
    groups: list[list[Chunk]] = []
    for c in chunks:
        g = groups[-1] if groups else None
        if g and c.offset <= g[-1].end and c.end - g[0].offset <= COALESCE_BYTES:
            g.append(c)
        else:
            groups.append([c])
    return groups


async def fetch_chunks(index: LayerIndex, source: BlobSource, chunks: list[Chunk],
                       windows: dict[int, tuple[int, int]] | None = None,
                       on_chunk: Callable[[Chunk, bytes], None] | None = None):
    """Yield ``(chunk, data)`` for ``chunks``, verified, fetching neighbours
    together. Raises :class:`ChunkDigestError` for a chunk that fails. A
    chunk with an entry in ``windows`` (chunk index -> ``(lo, hi)``, relative
    to the chunk) yields only those bytes, never holding the whole chunk."""
    # Holes (zstd:chunked "zeros" chunks) are made here, never fetched.
    zeros = index.zero_chunks
    for c in chunks:
        if c.index in zeros:
            data = zero_chunk_data(c, index.path_of(c.entry_id))
            win = windows.get(c.index) if windows else None
            yield c, (data if win is None else data[win[0]:win[1]])
    ordered = sorted((c for c in chunks if c.index not in zeros),
                     key=lambda c: (c.offset, c.inner_offset))
    for group in _groups(ordered):
        start = group[0].offset
        end = max(c.end for c in group)
        blob = await source.read_range(start, end - start)
        for c in group:
            rel = c.offset - start
            piece = blob[rel : rel + (c.end - c.offset)]
            path = index.path_of(c.entry_id)
            win = windows.get(c.index) if windows else None
            if win is None:
                data = await anyio.to_thread.run_sync(decode_chunk, index.format, piece, c, path)
                if on_chunk is not None:
                    # a whole chunk, verified: what a caller may keep (a cache)
                    await anyio.to_thread.run_sync(on_chunk, c, data)
            else:
                data = await anyio.to_thread.run_sync(decode_chunk_window, index.format, piece,
                                                      c, win[0], win[1], path)
            yield c, data


async def read_file_range(index: LayerIndex, source: BlobSource, entry: Entry,
                          offset: int = 0, size: int | None = None, *,
                          on_chunk: Callable[[Chunk, bytes], None] | None = None) -> bytes:
    """Bytes ``[offset, offset+size)`` of a regular file (or hardlink to one).
    ``on_chunk(chunk, data)`` (in a worker thread) gets each whole chunk
    fetched and verified on the way, e.g. to keep it in a cache."""
    target = index.entry(entry.target_id) if entry.target_id is not None else entry
    if target.type_code != REG:
        raise FormatError(f"{entry.path} is a {entry.type}, not a regular file")
    fsize = target.size
    if size is None:
        size = fsize - offset
    end = min(fsize, offset + size)
    if offset >= end:
        return b""
    chunks = index.chunks_for_range(target, offset, end - offset)
    # chunks the range covers in part: only their part is kept (decode_chunk_window)
    windows = {c.index: (max(offset, c.chunk_offset) - c.chunk_offset,
                         min(end, c.chunk_offset + c.chunk_size) - c.chunk_offset)
               for c in chunks
               if c.chunk_offset < offset or c.chunk_offset + c.chunk_size > end}
    zeros = index.zero_chunks
    if zeros and any(c.index in zeros for c in chunks):
        # Holes stay zeros in the answer: nothing the size of a hole allocated.
        buf = bytearray(end - offset)
        async for c, data in fetch_chunks(index, source,
                                          [c for c in chunks if c.index not in zeros], windows,
                                          on_chunk):
            lo = max(offset, c.chunk_offset)  # a window's data starts there too
            buf[lo - offset : lo - offset + len(data)] = data
        return bytes(buf)
    parts: dict[int, bytes] = {}
    async for c, data in fetch_chunks(index, source, chunks, windows, on_chunk):
        parts[c.chunk_offset] = data
    return b"".join(parts[c.chunk_offset] for c in chunks)


async def iter_file(index: LayerIndex, source: BlobSource, entry: Entry,
                    window: int = 8 << 20):
    """Yield a file's bytes in pieces of at most ``window`` bytes (for
    ``cat``): its chunks in file order, about ``COALESCE_BYTES`` of them
    fetched and verified at a time, each inflated once (a chunk is at most
    ``MAX_CHUNK_BYTES``: the memory a read holds is bounded)."""
    target = index.entry(entry.target_id) if entry.target_id is not None else entry
    if target.type_code != REG:
        raise FormatError(f"{entry.path} is a {entry.type}, not a regular file")
    chunks = index.chunks(target)  # file order, tiling the file (checked by the index)
    i = 0
    while i < len(chunks):
        batch = [chunks[i]]
        total = chunks[i].chunk_size
        i += 1
        while i < len(chunks) and total + chunks[i].chunk_size <= COALESCE_BYTES:
            batch.append(chunks[i])
            total += chunks[i].chunk_size
            i += 1
        got: dict[int, bytes] = {}
        async for c, data in fetch_chunks(index, source, batch):
            got[c.index] = data
        for c in batch:
            data = got.pop(c.index)
            for k in range(0, len(data), window):
                yield data[k : k + window] if len(data) > window else data


async def verify_file(index: LayerIndex, source: BlobSource, entry: Entry) -> None:
    """Check every chunk and the whole-file digest of a regular file."""
    h = hashlib.sha256()
    async for piece in iter_file(index, source, entry):
        h.update(piece)
    want = entry.digest
    if want and want.startswith("sha256:"):
        got = "sha256:" + h.hexdigest()
        if got != want:
            raise DigestMismatchError(f"{entry.path}: file digest mismatch ({want[:19]}... vs {got[:19]}...)")
