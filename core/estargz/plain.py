"""Plain (non-lazy) layers: tar, tar+gzip and tar+zstd blobs.

They have no TOC and no random access, but the image still shows them: the
whole blob is streamed once (decompressed in a worker thread) to build a
:class:`LayerIndex` whose single "chunk" per file is the file's offset in the
*uncompressed* tar stream, and a file is read by streaming the blob again up
to that offset. The same streaming serves ``verify --full`` (blob digest and
diffID) for every format.
"""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import anyio
import anyio.from_thread
import anyio.to_thread
import zstandard
from isal import isal_zlib

from ..errors import BlobReadError, FormatError
from ..source import BlobSource
from .footer import Format
from .toc import REG, Entry, LayerIndex, build_index

PIECE = 4 << 20
# The most bytes one decompression step hands on: a bomb's gigabytes (a
# 64 KB zstd frame holding 2 GiB of zeros) pass through this many at a time,
# never all at once.
OUT_PIECE = 1 << 20
IN_PIECE = 64 << 10  # compressed bytes handed to zlib at once (see Inflater.feed)


class _Sink:
    """The writer a zstd stream writer hands its output pieces to."""

    def __init__(self):
        self.sink: Callable[[bytes], None] | None = None

    def write(self, data) -> int:
        self.sink(bytes(data))
        return len(data)


class Inflater:
    """Incremental decompressor of a whole blob: gzip (any number of
    members), zstd (frames, skippable frames skipped) or tar (as is). Its
    output goes to a callback in pieces of at most ``OUT_PIECE`` bytes, so
    memory stays bounded whatever one compressed piece inflates to."""

    def __init__(self, fmt: str):
        if fmt in (Format.GZIP, Format.ESTARGZ, Format.STARGZ):
            self.kind = "gzip"
            self._d = isal_zlib.decompressobj(31)
        elif fmt in (Format.ZSTD, Format.ZSTDCHUNKED):
            self.kind = "zstd"
            self._sink = _Sink()
            self._w = zstandard.ZstdDecompressor().stream_writer(
                self._sink, write_size=OUT_PIECE, write_return_read=True)
        elif fmt == Format.TAR:
            self.kind = "tar"
        else:
            raise FormatError(f"cannot decompress a {fmt} blob")
        self._member_open = False

    def feed(self, data: bytes, sink: Callable[[bytes], None]) -> None:
        """Decompress ``data``; ``sink`` gets the output, piece by piece."""
        if self.kind == "tar":
            if data:
                sink(data)
            return
        if self.kind == "zstd":
            self._sink.sink = sink
            try:
                self._w.write(data)
            except zstandard.ZstdError as e:
                raise FormatError(f"corrupt zstd stream: {e}") from None
            return
        # Input goes in IN_PIECE slices: a call that stops at OUT_PIECE
        # copies what it did not consume (unconsumed_tail), so a whole 4 MiB
        # piece would be copied again for every MiB a bomb inflates to.
        view = memoryview(data)
        for k in range(0, len(view), IN_PIECE):
            self._feed_gzip(view[k : k + IN_PIECE], sink)

    def _feed_gzip(self, data, sink: Callable[[bytes], None]) -> None:
        while True:
            if data:
                self._member_open = True
            try:
                out = self._d.decompress(data, OUT_PIECE)
            except isal_zlib.error as e:
                raise FormatError(f"corrupt gzip stream: {e}") from None
            if out:
                sink(out)
            if self._d.eof:
                data = self._d.unused_data
                self._d = isal_zlib.decompressobj(31)
                self._member_open = False
                if not data:
                    return
            else:
                data = self._d.unconsumed_tail
                if not data and len(out) < OUT_PIECE:
                    return  # everything in: more output needs more input

    def finish(self) -> None:
        """Raise unless the stream ended cleanly."""
        if self.kind == "gzip" and self._member_open:
            raise FormatError("gzip stream is truncated")


async def stream_blob(source: BlobSource, piece: int = PIECE) -> AsyncIterator[bytes]:
    """The blob's bytes in order, ``piece`` bytes per range read."""
    pos = 0
    while pos < source.size:
        n = min(piece, source.size - pos)
        data = await source.read_range(pos, n)
        if len(data) != n:
            raise BlobReadError(f"short read of blob {source.digest[:19]} at {pos}")
        yield data
        pos += n


class _SourceFile(io.RawIOBase):
    """A blocking file over an async blob source, for use in a worker thread
    started by ``anyio.to_thread`` (reads go back to the event loop)."""

    def __init__(self, source: BlobSource, stop: threading.Event,
                 progress: Callable[[int, int], None] | None):
        self.source = source
        self.pos = 0
        self.stop = stop
        self.progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.stop.is_set():
            raise anyio.get_cancelled_exc_class()()
        n = min(len(b), self.source.size - self.pos)
        if n <= 0:
            return 0
        data = anyio.from_thread.run(self.source.read_range, self.pos, n)
        b[: len(data)] = data
        self.pos += len(data)
        if self.progress is not None:
            anyio.from_thread.run_sync(self.progress, self.pos, self.source.size)
        return len(data)


def _decompressed(raw, fmt: str):
    """A blocking file of the decompressed stream of ``raw`` (pull-based:
    each read decompresses at most what it returns)."""
    if fmt == Format.TAR:
        return raw
    if fmt in (Format.ZSTD, Format.ZSTDCHUNKED):
        return io.BufferedReader(_ZstdReader(raw), 1 << 20)
    if fmt in (Format.GZIP, Format.ESTARGZ, Format.STARGZ):
        return io.BufferedReader(_GzipReader(raw), 1 << 20)
    raise FormatError(f"cannot decompress a {fmt} blob")


class _ZstdReader(io.RawIOBase):
    def __init__(self, raw):
        self._r = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                             closefd=False)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            data = self._r.read(len(b))
        except zstandard.ZstdError as e:
            raise FormatError(f"corrupt zstd stream: {e}") from None
        b[: len(data)] = data
        return len(data)


class _GzipReader(io.RawIOBase):
    """Gzip members one after the other, ``len(b)`` bytes at most per read."""

    def __init__(self, raw):
        self.raw = raw
        self._d = isal_zlib.decompressobj(31)
        self._in = b""
        self._member_open = False
        self._raw_eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = len(b)
        while True:
            if not self._in and not self._raw_eof:
                self._in = self.raw.read(IN_PIECE)  # small: see Inflater.feed
                self._raw_eof = not self._in
            if self._in:
                self._member_open = True
            try:
                out = self._d.decompress(self._in, n)
            except isal_zlib.error as e:
                raise FormatError(f"corrupt gzip stream: {e}") from None
            if self._d.eof:
                self._in = self._d.unused_data
                self._d = isal_zlib.decompressobj(31)
                self._member_open = False
            else:
                self._in = self._d.unconsumed_tail
            if out:
                b[: len(out)] = out
                return len(out)
            if self._raw_eof and not self._in:
                if self._member_open:
                    raise FormatError("gzip stream is truncated")
                return 0


def _rfc3339(mtime) -> str:
    try:
        return datetime.fromtimestamp(int(mtime), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError, TypeError):
        return ""


_TYPES = {
    tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.CONTTYPE: "reg",
    tarfile.GNUTYPE_SPARSE: "reg",
    tarfile.LNKTYPE: "hardlink", tarfile.SYMTYPE: "symlink", tarfile.DIRTYPE: "dir",
    tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
}


def _scan_tar(fileobj) -> tuple[list[dict], int, dict[str, tuple]]:
    """TOC-shaped entries for every member of a tar stream, the stream's
    length up to the end of the last member, and the sparse map of each
    sparse file (name -> ((file offset, length), ...) of its stored data,
    which follows its header packed, without the holes)."""
    entries: list[dict] = []
    sparse: dict[str, tuple] = {}
    end = 0
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r|", encoding="utf-8",
                          errors="surrogateescape")
        for m in tf:
            typ = _TYPES.get(m.type)
            if typ is None:
                continue  # GNU volume headers and the like
            e: dict = {"name": m.name, "type": typ, "mode": m.mode, "uid": m.uid,
                       "gid": m.gid, "modtime": _rfc3339(m.mtime)}
            if m.uname:
                e["userName"] = m.uname
            if m.gname:
                e["groupName"] = m.gname
            if typ in ("symlink", "hardlink"):
                e["linkName"] = m.linkname
            if typ in ("char", "block"):
                e["devMajor"] = m.devmajor
                e["devMinor"] = m.devminor
            xattrs = {}
            for k, v in m.pax_headers.items():
                if k.startswith("SCHILY.xattr."):
                    xattrs[k[13:]] = base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
            if xattrs:
                e["xattrs"] = xattrs
            if typ == "reg":
                e["size"] = m.size
                h = hashlib.sha256()
                f = tf.extractfile(m)
                while True:
                    piece = f.read(1 << 20)
                    if not piece:
                        break
                    h.update(piece)
                e["digest"] = "sha256:" + h.hexdigest()
                if m.size:
                    e["offset"] = m.offset_data
                    e["chunkSize"] = m.size
                if m.issparse():
                    sparse[m.name] = tuple((off, n) for off, n in m.sparse if n)
            entries.append(e)
            tf.members = []
            end = m.offset_data + ((m.size + 511) & ~511 if m.isreg() else 0)
    except tarfile.TarError as e:
        raise FormatError(f"layer is not a valid tar stream: {e}") from None
    except EOFError:
        raise FormatError("layer's tar stream is truncated") from None
    return entries, end, sparse


async def build_plain_index(source: BlobSource, fmt: str,
                            progress: Callable[[int, int], None] | None = None) -> LayerIndex:
    """Stream a plain layer once and index its entries (see module doc)."""
    stop = threading.Event()

    def work():
        raw = io.BufferedReader(_SourceFile(source, stop, progress), PIECE)
        entries, end, sparse = _scan_tar(io.BufferedReader(_decompressed(raw, fmt), 1 << 20))
        total = max(end, 1) + 1
        ix = build_index({"version": 1, "entries": entries}, format=fmt,
                         blob_digest=source.digest, blob_size=total,
                         toc_digest="", toc_offset=total)
        for name, smap in sparse.items():
            e = ix.lookup(name)
            if e is not None:
                ix.sparse_maps[e.id] = smap
        return ix

    try:
        ix = await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
    finally:
        stop.set()
    ix.toc_digest = None
    ix.toc_offset = None
    ix.plain_size = ix.blob_size - 1
    ix.blob_size = source.size
    return ix


async def iter_plain_file(index: LayerIndex, source: BlobSource, entry: Entry,
                          window: int = 1 << 20) -> AsyncIterator[bytes]:
    """A plain layer's file, streamed by decompressing the blob up to it:
    what comes before it is decompressed and dropped a piece at a time."""
    target = index.entry(entry.target_id) if entry.target_id is not None else entry
    if target.type_code != REG:
        raise FormatError(f"{entry.path} is a {entry.type}, not a regular file")
    chunks = index.chunks(target)
    if not chunks:
        return
    start, size = chunks[0].offset, target.size
    smap = index.sparse_maps.get(target.id)
    stored = sum(n for _, n in smap) if smap is not None else size
    pieces = _stored(index, source, start, stored, entry.path, window)
    if smap is not None:
        pieces = _expand_sparse(pieces, smap, size, window)
    async for part in pieces:
        yield part


async def _stored(index: LayerIndex, source: BlobSource, start: int, size: int,
                  what: str, window: int) -> AsyncIterator[bytes]:
    """``size`` bytes of the uncompressed stream from ``start``, at most
    ``window`` at a time (pulled: nothing is decompressed ahead of a read)."""
    stop = threading.Event()
    stream = _decompressed(io.BufferedReader(_SourceFile(source, stop, None), PIECE),
                           index.format)

    def skip(n: int) -> int:
        done = 0
        while done < n:
            got = len(stream.read(min(PIECE, n - done)))
            if not got:
                break
            done += got
        return done

    try:
        if await anyio.to_thread.run_sync(skip, start) < start:
            raise FormatError(f"{what}: layer ends before the file's data")
        sent = 0
        while sent < size:
            part = await anyio.to_thread.run_sync(stream.read, min(window, size - sent))
            if not part:
                raise FormatError(f"{what}: layer ends before the file's data")
            sent += len(part)
            yield part
    finally:
        stop.set()


async def _expand_sparse(stored, smap: tuple, size: int, window: int = 1 << 20):
    """A sparse file's bytes: its stored data placed at the map's offsets,
    zeros in between and up to ``size``."""
    pos = 0  # file offset written so far
    regions = list(smap)
    ri = 0
    left = regions[0][1] if regions else 0
    async for piece in stored:
        view = memoryview(piece)
        while view:
            while ri < len(regions) and left == 0:
                ri += 1
                left = regions[ri][1] if ri < len(regions) else 0
            if ri >= len(regions):
                break
            off = regions[ri][0] + regions[ri][1] - left
            while pos < off:
                n = min(window, off - pos)
                yield bytes(n)
                pos += n
            take = min(left, len(view))
            yield bytes(view[:take])
            view = view[take:]
            pos += take
            left -= take
    while pos < size:
        n = min(window, size - pos)
        yield bytes(n)
        pos += n
