"""The simple, uncached read path: file ranges straight from a blob source.

Used by ``cat``, ``verify`` and extraction; the FUSE core has its own cached,
coalescing reader (core/layer.py) over the same chunk functions.
"""

from __future__ import annotations

import hashlib

import anyio.to_thread

from ..errors import DigestMismatchError, FormatError
from ..source import BlobSource
from .chunks import decode_chunk
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


async def fetch_chunks(index: LayerIndex, source: BlobSource, chunks: list[Chunk]):
    """Yield ``(chunk, data)`` for ``chunks``, verified, fetching neighbours
    together. Raises :class:`ChunkDigestError` for a chunk that fails."""
    # Holes (zstd:chunked "zeros" chunks) are made here, never fetched.
    zeros = index.zero_chunks
    for c in chunks:
        if c.index in zeros:
            yield c, zero_chunk_data(c, index.path_of(c.entry_id))
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
            data = await anyio.to_thread.run_sync(decode_chunk, index.format, piece, c, path)
            yield c, data


async def read_file_range(index: LayerIndex, source: BlobSource, entry: Entry,
                          offset: int = 0, size: int | None = None) -> bytes:
    """Bytes ``[offset, offset+size)`` of a regular file (or hardlink to one)."""
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
    zeros = index.zero_chunks
    if zeros and any(c.index in zeros for c in chunks):
        # Holes stay zeros in the answer: nothing the size of a hole allocated.
        buf = bytearray(end - offset)
        async for c, data in fetch_chunks(index, source,
                                          [c for c in chunks if c.index not in zeros]):
            lo, hi = max(offset, c.chunk_offset), min(end, c.chunk_offset + len(data))
            buf[lo - offset : hi - offset] = data[lo - c.chunk_offset : hi - c.chunk_offset]
        return bytes(buf)
    parts: dict[int, bytes] = {}
    async for c, data in fetch_chunks(index, source, chunks):
        parts[c.chunk_offset] = data
    buf = b"".join(parts[c.chunk_offset] for c in chunks)
    base = chunks[0].chunk_offset if chunks else offset
    return buf[offset - base : end - base]


async def iter_file(index: LayerIndex, source: BlobSource, entry: Entry,
                    window: int = 8 << 20):
    """Yield a file's bytes in pieces of about ``window`` bytes (for ``cat``)."""
    target = index.entry(entry.target_id) if entry.target_id is not None else entry
    pos = 0
    while pos < target.size:
        n = min(window, target.size - pos)
        yield await read_file_range(index, source, target, pos, n)
        pos += n


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
