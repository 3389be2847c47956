"""Turning a chunk's compressed bytes into verified file bytes.

A chunk's compressed extent ``[offset, end)`` starts with the gzip member (or
zstd frame) holding its data; the extent may run on into members holding the
tar headers of later entries, so we inflate member by member only until
``inner_offset + chunk_size`` bytes are out. These functions are CPU-bound:
async callers run them in worker threads.
"""

from __future__ import annotations

import hashlib
import io

from isal import isal_zlib

from ..errors import ChunkDigestError, FormatError
from .footer import Format
from .toc import Chunk

_GZIP_WBITS = 31


def _inflate_gzip(data: bytes, want: int) -> bytes:
    out = []
    got = 0
    pos = 0
    while got < want and pos < len(data):
        d = isal_zlib.decompressobj(_GZIP_WBITS)
        try:
            piece = d.decompress(memoryview(data)[pos:], want - got)
        except isal_zlib.error as e:
            raise FormatError(f"corrupt gzip data in chunk: {e}") from None
        out.append(piece)
        got += len(piece)
        if got >= want:
            break
        if not d.eof:
            # max_length reached would have filled `want`; not eof means the
            # member is truncated.
            raise FormatError("truncated gzip member in chunk")
        consumed = len(data) - pos - len(d.unused_data)
        if consumed <= 0:
            break
        pos += consumed
    return b"".join(out)


def _inflate_zstd(data: bytes, want: int) -> bytes:
    import zstandard  # zstd layers only: not on every daemon's start-up path

    try:
        reader = zstandard.ZstdDecompressor().stream_reader(
            io.BytesIO(data), read_across_frames=True
        )
        out = reader.read(want)
        # stream_reader.read may return less than asked; keep reading.
        while len(out) < want:
            more = reader.read(want - len(out))
            if not more:
                break
            out += more
    except zstandard.ZstdError as e:
        raise FormatError(f"corrupt zstd data in chunk: {e}") from None
    return out


def decompress_chunk(fmt: str, compressed: bytes, chunk: Chunk) -> bytes:
    """The ``chunk_size`` file bytes of ``chunk`` from its compressed extent
    (``compressed`` starts at ``chunk.offset``). Raises :class:`FormatError`
    when the data is corrupt or short."""
    want = chunk.inner_offset + chunk.chunk_size
    if fmt == Format.ZSTDCHUNKED:
        raw = _inflate_zstd(compressed, want)
    elif fmt in (Format.ESTARGZ, Format.STARGZ):
        raw = _inflate_gzip(compressed, want)
    else:
        raise FormatError(f"{fmt} layers have no chunks")
    if len(raw) < want:
        raise FormatError(
            f"chunk at blob offset {chunk.offset} inflates to {len(raw)} bytes, expected {want}"
        )
    return raw[chunk.inner_offset : want] if chunk.inner_offset else raw


def verify_chunk(data: bytes, chunk: Chunk, path: str = "") -> None:
    """Raise :class:`ChunkDigestError` unless ``data`` matches the chunk digest."""
    if not chunk.digest:
        return
    algo, _, want = chunk.digest.partition(":")
    if algo != "sha256":
        raise ChunkDigestError(f"unsupported chunk digest algorithm {algo!r}")
    got = hashlib.sha256(data).hexdigest()
    if got != want:
        where = f" of {path}" if path else ""
        raise ChunkDigestError(
            f"chunk{where} at file offset {chunk.chunk_offset} fails verification "
            f"(chunkDigest {chunk.digest[:19]}..., got sha256:{got[:12]}...)"
        )


def decode_chunk(fmt: str, compressed: bytes, chunk: Chunk, path: str = "") -> bytes:
    """Decompress and verify in one call (what a worker thread runs)."""
    try:
        data = decompress_chunk(fmt, compressed, chunk)
    except FormatError as e:
        where = f" of {path}" if path else ""
        raise ChunkDigestError(f"chunk{where} at file offset {chunk.chunk_offset}: {e}") from None
    verify_chunk(data, chunk, path)
    return data
