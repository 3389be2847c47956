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


_PIECE = 1 << 20  # inflated bytes per step of a windowed decode
_IN_STEP = 64 << 10  # compressed bytes handed to zlib at once (its unconsumed tail is copied)


def _gzip_pieces(data: bytes, want: int):
    """:func:`_inflate_gzip` as pieces of at most ``_PIECE`` bytes."""
    mv = memoryview(data)
    got = 0
    pos = 0
    while got < want and pos < len(data):
        d = isal_zlib.decompressobj(_GZIP_WBITS)
        at = pos  # start of the input slice being fed
        feed = mv[at : at + _IN_STEP]
        while got < want:
            limit = min(_PIECE, want - got)
            try:
                piece = d.decompress(feed, limit)
            except isal_zlib.error as e:
                raise FormatError(f"corrupt gzip data in chunk: {e}") from None
            if piece:
                got += len(piece)
                yield piece
            if d.eof:
                break
            tail = d.unconsumed_tail
            at += len(feed) - len(tail)
            if tail:
                feed = tail
            elif len(piece) == limit:
                feed = b""  # output may be pending: ask again before feeding more
            else:
                feed = mv[at : at + _IN_STEP]
                if not feed:
                    raise FormatError("truncated gzip member in chunk")
        if got >= want:
            return
        # the member ended: the next one starts after what it consumed
        pos = at + len(feed) - len(d.unused_data)


def _zstd_pieces(data: bytes, want: int):
    import zstandard

    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data),
                                                            read_across_frames=True)
        got = 0
        while got < want:
            piece = reader.read(min(_PIECE, want - got))
            if not piece:
                return
            got += len(piece)
            yield piece
    except zstandard.ZstdError as e:
        raise FormatError(f"corrupt zstd data in chunk: {e}") from None


def decode_chunk_window(fmt: str, compressed: bytes, chunk: Chunk, lo: int, hi: int,
                        path: str = "") -> bytes:
    """Bytes ``[lo, hi)`` (relative to the chunk's start) of a verified
    chunk: the chunk is inflated and hashed a piece at a time and only the
    window kept, so a read of a few KiB never holds the whole chunk.
    Raises :class:`ChunkDigestError` as :func:`decode_chunk` does."""
    where = f" of {path}" if path else ""
    skip = chunk.inner_offset
    want = skip + chunk.chunk_size
    if fmt == Format.ZSTDCHUNKED:
        pieces = _zstd_pieces(compressed, want)
    elif fmt in (Format.ESTARGZ, Format.STARGZ):
        pieces = _gzip_pieces(compressed, want)
    else:
        raise FormatError(f"{fmt} layers have no chunks")
    h = hashlib.sha256() if chunk.digest else None
    keep = []
    pos = -skip  # chunk-relative offset of the next inflated byte
    try:
        for piece in pieces:
            start = pos
            pos += len(piece)
            if pos <= 0:
                continue
            view = memoryview(piece)[max(0, -start):]
            start = max(start, 0)
            if h is not None:
                h.update(view)
            a, b = max(lo, start), min(hi, pos)
            if b > a:
                keep.append(bytes(view[a - start : b - start]))
    except FormatError as e:
        raise ChunkDigestError(f"chunk{where} at file offset {chunk.chunk_offset}: {e}") from None
    if pos < chunk.chunk_size:
        raise ChunkDigestError(
            f"chunk{where} at file offset {chunk.chunk_offset}: chunk at blob offset "
            f"{chunk.offset} inflates to {pos + skip} bytes, expected {want}")
    if h is not None:
        algo, _, hexd = chunk.digest.partition(":")
        if algo != "sha256":
            raise ChunkDigestError(f"unsupported chunk digest algorithm {algo!r}")
        got = h.hexdigest()
        if got != hexd:
            raise ChunkDigestError(
                f"chunk{where} at file offset {chunk.chunk_offset} fails verification "
                f"(chunkDigest {chunk.digest[:19]}..., got sha256:{got[:12]}...)")
    return b"".join(keep)


def decode_chunk(fmt: str, compressed: bytes, chunk: Chunk, path: str = "") -> bytes:
    """Decompress and verify in one call (what a worker thread runs)."""
    try:
        data = decompress_chunk(fmt, compressed, chunk)
    except FormatError as e:
        where = f" of {path}" if path else ""
        raise ChunkDigestError(f"chunk{where} at file offset {chunk.chunk_offset}: {e}") from None
    verify_chunk(data, chunk, path)
    return data
