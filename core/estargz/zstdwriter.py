"""tar (or tar.gz / tar.zst) to zstd:chunked, containers/storage's current
generation (the layout of its ``pkg/chunked/compressor``):

* the input tar's bytes, unchanged and in order, in zstd frames, so the whole
  blob decompresses to the exact input and the layer's diffID is the input
  tar's: tar headers and padding ride in the open frame; each chunk of a
  file's payload is a frame of its own (a TOC ``offset`` is a frame start);
* chunks: runs of at least 1024 zero bytes are ``chunkType: "zeros"`` chunks
  (holes, which readers make without fetching); data is cut every
  ``chunk_size`` bytes. Chunk fields are written only for files of more than
  one chunk, as upstream does; each file states ``digest``, ``offset`` and
  ``endOffset`` (the end of its last frame); xattrs are base64;
* the TOC (``version``, ``entries``, ``tarSplitDigest``) zstd-compressed in a
  skippable frame, the tar-split (vbatts/tar-split JSON lines: the tar's raw
  segments and its file records) zstd-compressed in a skippable frame, and
  the 72-byte footer frame (:func:`.zstdchunked.footer_frame`).

The input is read in pieces from a seekable file (a compressed input is first
inflated into a temporary file); the output is written as it is produced,
except the TOC and tar-split, which are held until the end. CPU-bound and
blocking: call it from a worker thread (``core.convert`` does).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import crcmod
import zstandard

from ..errors import FormatError
from .tarwrite import (
    TAR_TYPES,
    buffered_output,
    cancel_check,
    open_tar_input,
    reader_at,
    require_utf8,
    toc_entry,
)
from .zstdchunked import TarSplit, footer_frame, skippable_frame

ZSTD2_PREFIX = "io.github.containers.zstd-chunked."
DEFAULT_LEVEL = 3
HOLES_THRESHOLD = 1 << 10
_PIECE = 1 << 20
_ZERO_RUN = re.compile(rb"\x00+")
_ZEROS = bytes(_PIECE)
# tar-split's file records carry the content's CRC-64 (Go's crc64.ISO table,
# big-endian), which containers/storage checks when it rebuilds a tar.
_crc64 = crcmod.mkCrcFun(0x1000000000000001B, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)
# The TOC's key order: containers/storage's FileMetadata struct.
_KEY_ORDER = ("type", "name", "linkName", "mode", "size", "uid", "gid", "modtime",
              "devMajor", "devMinor", "xattrs", "digest", "offset", "endOffset",
              "chunkSize", "chunkOffset", "chunkDigest", "chunkType")


@dataclass
class ZstdChunkedResult:
    blob_digest: str
    blob_size: int
    diff_id: str
    toc_digest: str  # sha256 of the TOC JSON
    manifest_checksum: str  # sha256 of the compressed TOC: the trust anchor
    uncompressed_size: int
    toc_offset: int
    entries: int
    chunks: int
    holes: int
    annotations: dict[str, str]
    # zstd:chunked has no prefetch landmark, so no prioritised files to miss
    missed_prioritized: list[str] = field(default_factory=list)


def _runs(read_at, start: int, size: int, chunk_size: int) -> Iterator[tuple[int, int, bool]]:
    """(file offset, length, is_zeros) runs of a payload: zero runs of at
    least HOLES_THRESHOLD bytes, data between them cut every chunk_size."""
    data_start = 0
    z_start = z_end = -1  # the zero run being extended
    pos = 0

    def data_runs(lo: int, hi: int):
        for off in range(lo, hi, chunk_size):
            yield off, min(chunk_size, hi - off), False

    while pos < size:
        n = min(_PIECE, size - pos)
        buf = read_at(start + pos, n)
        for m in _ZERO_RUN.finditer(buf):
            a, b = pos + m.start(), pos + m.end()
            if a == z_end:
                z_end = b
                continue
            if z_end - z_start >= HOLES_THRESHOLD:
                yield from data_runs(data_start, z_start)
                yield z_start, z_end - z_start, True
                data_start = z_end
            z_start, z_end = a, b
        pos += n
    if z_end - z_start >= HOLES_THRESHOLD:
        yield from data_runs(data_start, z_start)
        yield z_start, z_end - z_start, True
        data_start = z_end
    yield from data_runs(data_start, size)


class _Out:
    """The blob as it is written: zstd frames, counted and hashed."""

    def __init__(self, dst, level: int):
        self.dst = dst
        self.cctx = zstandard.ZstdCompressor(level=level)
        self.cobj = None
        self.n = 0
        self.blob_hash = hashlib.sha256()
        self.diff_hash = hashlib.sha256()
        self.usize = 0

    def _emit(self, data: bytes) -> None:
        if data:
            self.dst.write(data)
            self.blob_hash.update(data)
            self.n += len(data)

    def write(self, data) -> None:
        if self.cobj is None:
            self.cobj = self.cctx.compressobj()
        self.diff_hash.update(data)
        self.usize += len(data)
        self._emit(self.cobj.compress(data))

    def restart(self) -> int:
        """Close the open frame (if any); the offset the next one starts at."""
        if self.cobj is not None:
            self._emit(self.cobj.flush())
            self.cobj = None
        return self.n

    def raw(self, data: bytes) -> None:
        self.restart()
        self._emit(data)


def build_zstdchunked(src, dst, *, chunk_size: int = 4 << 20, level: int = DEFAULT_LEVEL,
                      progress: Callable[[int, int], None] | None = None,
                      cancel: threading.Event | None = None,
                      tmpdir: str | None = None) -> ZstdChunkedResult:
    """Write a zstd:chunked blob for the tar in ``src`` (a path or a binary
    file; plain, gzip or zstd) to ``dst`` (a path or a writable binary file).
    ``progress(done, total)`` counts input bytes; ``cancel`` stops it."""
    if chunk_size <= 0:
        raise FormatError(f"chunk size must be positive, not {chunk_size}")
    if not 1 <= level <= 19:
        raise FormatError("zstd compression level must be 1..19")

    check = cancel_check(cancel)
    f, cleanup = open_tar_input(src, tmpdir, check)
    try:
        with buffered_output(dst) as out:
            return _write(f, out, chunk_size, level, check, progress)
    finally:
        cleanup()


def _write(f, dst, chunk_size, level, check, progress) -> ZstdChunkedResult:
    f.seek(0, os.SEEK_END)
    size_in = f.tell()
    total = size_in or 1
    read_at = reader_at(f)

    out = _Out(dst, level)
    entries: list[dict] = []
    split: list[bytes] = []
    nchunks = holes = nentries = 0
    pos = 0  # input bytes written so far

    def segment(end: int) -> None:
        """The input's raw bytes [pos, end) into the open frame and the tar-split."""
        nonlocal pos
        seg = bytearray()
        while pos < end:
            n = min(_PIECE, end - pos)
            data = read_at(pos, n)
            out.write(data)
            seg += data
            pos += n
        split.append(_split_line(2, payload=bytes(seg), position=len(split)))

    f.seek(0)
    try:
        tf = tarfile.open(fileobj=f, mode="r:", encoding="utf-8", errors="surrogateescape")
        while True:
            check()
            m = tf.next()
            if m is None:
                break
            tf.members = []  # keep no list of every member
            if m.issparse():
                raise FormatError(f"sparse tar member {m.name!r} is not supported")
            typ = TAR_TYPES.get(m.type)
            if typ is None:
                raise FormatError(f"unsupported tar entry type {m.type!r} for {m.name!r}")
            require_utf8(m)
            nentries += 1
            segment(m.offset_data)
            size = m.size if typ == "reg" else 0
            e = toc_entry(m, typ)
            group = [e]
            if size:
                offset = out.restart()
                file_hash = hashlib.sha256()
                crc = 0
                chunks = []
                for off, n, zeros in _runs(read_at, m.offset_data, size, chunk_size):
                    check()
                    ch = hashlib.sha256()
                    left = n
                    while left:
                        k = min(_PIECE, left)
                        piece = _ZEROS[:k] if zeros else read_at(m.offset_data + off + n - left, k)
                        ch.update(piece)
                        file_hash.update(piece)
                        crc = _crc64(piece, crc)
                        out.write(piece)
                        left -= k
                    chunks.append((off, n, offset, "sha256:" + ch.hexdigest(), zeros))
                    offset = out.restart()
                    if progress is not None:
                        progress(min(m.offset_data + off + n, total), total)
                pos = m.offset_data + size
                e["digest"] = "sha256:" + file_hash.hexdigest()
                e["offset"] = chunks[0][2]
                e["endOffset"] = offset
                nchunks += len(chunks)
                if len(chunks) > 1:
                    group += [{"type": "chunk", "name": m.name} for _ in chunks[1:]]
                    for g, (off, n, coff, digest, zeros) in zip(group, chunks, strict=True):
                        g["chunkSize"] = n
                        g["offset"] = coff
                        if off:
                            g["chunkOffset"] = off
                        g["chunkDigest"] = digest
                        if zeros:
                            g["chunkType"] = "zeros"
                            holes += 1
            entries.extend({k: g[k] for k in _KEY_ORDER if k in g} for g in group)
            split.append(_split_line(1, name=m.name, size=size, position=len(split),
                                     payload=crc.to_bytes(8, "big") if size else None))
    except tarfile.TarError as e:
        raise FormatError(f"input is not a valid tar: {e}") from None
    segment(size_in)  # the end-of-archive blocks and any padding after them
    end = out.restart()

    tar_split = b"".join(split)
    ts_compressed = zstandard.ZstdCompressor(level=level).compress(tar_split)
    toc = {"version": 1, "entries": entries,
           "tarSplitDigest": "sha256:" + hashlib.sha256(ts_compressed).hexdigest()}
    toc_json = json.dumps(toc, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8", "surrogateescape")
    toc_compressed = zstandard.ZstdCompressor(level=level).compress(toc_json)
    toc_offset = end + 8
    out.raw(skippable_frame(toc_compressed))
    ts = TarSplit(toc_offset + len(toc_compressed) + 8, len(ts_compressed), len(tar_split))
    out.raw(skippable_frame(ts_compressed))
    out.raw(footer_frame(toc_offset, len(toc_compressed), len(toc_json), ts))
    checksum = "sha256:" + hashlib.sha256(toc_compressed).hexdigest()
    if progress is not None:
        progress(total, total)
    return ZstdChunkedResult(
        blob_digest="sha256:" + out.blob_hash.hexdigest(), blob_size=out.n,
        diff_id="sha256:" + out.diff_hash.hexdigest(),
        toc_digest="sha256:" + hashlib.sha256(toc_json).hexdigest(),
        manifest_checksum=checksum, uncompressed_size=out.usize, toc_offset=toc_offset,
        entries=nentries, chunks=nchunks, holes=holes,
        annotations={
            ZSTD2_PREFIX + "manifest-checksum": checksum,
            ZSTD2_PREFIX + "manifest-position":
                f"{toc_offset}:{len(toc_compressed)}:{len(toc_json)}:1",
            ZSTD2_PREFIX + "tarsplit-position": f"{ts.offset}:{ts.size}:{ts.uncompressed_size}",
        })


def _split_line(typ: int, *, name: str | None = None, size: int = 0,
                payload: bytes | None = None, position: int) -> bytes:
    """One tar-split JSON line (vbatts/tar-split's storage.Entry): file
    records carry the name (``name_raw`` when it is not UTF-8) and size."""
    rec: dict = {"type": typ}
    if name is not None:
        try:
            name.encode("utf-8")
            rec["name"] = name
        except UnicodeEncodeError:
            rec["name_raw"] = base64.b64encode(name.encode("utf-8", "surrogateescape")).decode()
    if size:
        rec["size"] = size
    rec["payload"] = base64.b64encode(payload).decode() if payload is not None else None
    rec["position"] = position
    return json.dumps(rec, separators=(",", ":")).encode() + b"\n"
