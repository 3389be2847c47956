"""A test-only writer of containers/storage's current zstd:chunked generation,
written from its ``pkg/chunked/compressor/compressor.go`` and
``pkg/chunked/internal/minimal/compression.go`` (independently of
core/estargz, so the two can be checked against each other):

* the tar's raw bytes, unchanged, in zstd frames: tar headers (and padding)
  ride in the frame that is open; each chunk of a file's payload is a frame
  of its own, so the blob decompresses to the exact input tar;
* chunks: runs of >= 1024 zero bytes are ``chunkType: "zeros"`` chunks
  (containers/storage's hole finder); data between holes is cut every
  ``chunk_size`` bytes (upstream cuts by a rolling checksum: where it cuts
  changes nothing for a reader). Chunk fields are written only for files
  of more than one chunk, as upstream does;
* each regular file: ``digest``, ``offset`` (its first frame) and
  ``endOffset`` (the end of its last frame); xattrs base64-encoded;
* the TOC (``{"version":1,"entries":[...],"tarSplitDigest":...}``), zstd
  compressed, in a skippable frame; then the tar-split (vbatts/tar-split's
  JSON lines, zstd compressed; its digest is the sha256 of the compressed
  bytes) in a skippable frame; then the 72-byte footer frame;
* annotations ``io.github.containers.zstd-chunked.manifest-checksum``,
  ``manifest-position`` and ``tarsplit-position``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import tarfile
from dataclasses import dataclass, field
from datetime import UTC, datetime

import zstandard

PREFIX = "io.github.containers.zstd-chunked."
SKIPPABLE = struct.pack("<I", 0x184D2A50)
HOLES_THRESHOLD = 1 << 10
TYPES = {tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.LNKTYPE: "hardlink",
         tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.DIRTYPE: "dir",
         tarfile.FIFOTYPE: "fifo", tarfile.SYMTYPE: "symlink"}


def _crc64_table() -> list[int]:
    poly = 0xD800000000000000  # crc64.ISO, reflected
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC64 = _crc64_table()


def crc64_iso(data: bytes) -> bytes:
    crc = 0xFFFFFFFFFFFFFFFF
    t = _CRC64
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return struct.pack(">Q", crc ^ 0xFFFFFFFFFFFFFFFF)


def split_holes(data: bytes, chunk_size: int) -> list[tuple[int, int, bool]]:
    """(offset, size, is_zeros) runs of a payload."""
    runs: list[tuple[int, int, bool]] = []
    pos = 0
    n = len(data)
    data_start = 0
    while pos < n:
        if data[pos] == 0:
            end = pos
            while end < n and data[end] == 0:
                end += 1
            if end - pos >= HOLES_THRESHOLD:
                for off in range(data_start, pos, chunk_size):
                    runs.append((off, min(chunk_size, pos - off), False))
                runs.append((pos, end - pos, True))
                data_start = end
            pos = end
        else:
            pos += 1
    for off in range(data_start, n, chunk_size):
        runs.append((off, min(chunk_size, n - off), False))
    return runs


def _modtime(m: tarfile.TarInfo) -> str | None:
    if not m.mtime:
        return None
    return datetime.fromtimestamp(int(m.mtime), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Written:
    blob: bytes
    annotations: dict[str, str]
    toc: dict
    tar_split: bytes  # uncompressed JSON lines
    diff_id: str
    holes: list[tuple[str, int, int]] = field(default_factory=list)  # (name, file offset, size)

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.blob).hexdigest()


class _Out:
    def __init__(self, level: int):
        self.buf = bytearray()
        self.pending = bytearray()
        self.cctx = zstandard.ZstdCompressor(level=level)

    def write(self, data: bytes) -> None:
        self.pending += data

    def restart(self) -> int:
        """Close the open frame; the offset where the next one starts."""
        if self.pending:
            self.buf += self.cctx.compress(bytes(self.pending))
            self.pending.clear()
        return len(self.buf)


def write_zstdchunked(tar: bytes, *, chunk_size: int = 64 << 10, level: int = 3) -> Written:
    out = _Out(level)
    entries: list[dict] = []
    split_lines: list[dict] = []
    holes = []
    pos = 0
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:", encoding="utf-8",
                      errors="surrogateescape") as tf:
        for m in tf:
            segment = tar[pos:m.offset_data]
            out.write(segment)
            split_lines.append({"type": 2, "payload": base64.b64encode(segment).decode()})
            size = m.size if m.isreg() else 0
            payload = tar[m.offset_data:m.offset_data + size]
            pos = m.offset_data + size
            e: dict = {"type": TYPES[m.type], "name": m.name}
            if m.linkname:
                e["linkName"] = m.linkname
            if m.mode:
                e["mode"] = m.mode
            if m.size:
                e["size"] = m.size
            if m.uid:
                e["uid"] = m.uid
            if m.gid:
                e["gid"] = m.gid
            mt = _modtime(m)
            if mt:
                e["modtime"] = mt
            if m.devmajor and m.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                e["devMajor"] = m.devmajor
            if m.devminor and m.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                e["devMinor"] = m.devminor
            xattrs = {k[len("SCHILY.xattr."):]: base64.b64encode(
                v.encode("utf-8", "surrogateescape")).decode()
                for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
            if xattrs:
                e["xattrs"] = xattrs
            chunks = []
            if payload:
                offset = out.restart()  # the header frame ends where the payload starts
                for off, n, zeros in split_holes(payload, chunk_size):
                    piece = payload[off:off + n]
                    out.write(piece)
                    chunks.append({"chunkOffset": off, "chunkSize": n, "offset": offset,
                                   "chunkDigest": "sha256:" + hashlib.sha256(piece).hexdigest(),
                                   "chunkType": "zeros" if zeros else ""})
                    offset = out.restart()
                e["digest"] = "sha256:" + hashlib.sha256(payload).hexdigest()
                e["offset"] = chunks[0]["offset"]
                e["endOffset"] = offset
            group = [e]
            if len(chunks) > 1:
                for _ in chunks[1:]:
                    group.append({"type": "chunk", "name": m.name})
                for g, c in zip(group, chunks, strict=True):
                    g["chunkSize"] = c["chunkSize"]
                    g["offset"] = c["offset"]
                    if c["chunkOffset"]:
                        g["chunkOffset"] = c["chunkOffset"]
                    g["chunkDigest"] = c["chunkDigest"]
                    if c["chunkType"]:
                        g["chunkType"] = c["chunkType"]
                        holes.append((m.name, c["chunkOffset"], c["chunkSize"]))
            entries.extend(group)
            rec: dict = {"type": 1}
            rec["name"] = m.name
            if size:
                rec["size"] = size
            rec["payload"] = base64.b64encode(crc64_iso(payload)).decode() if size else None
            split_lines.append(rec)
    tail = tar[pos:]
    out.write(tail)
    split_lines.append({"type": 2, "payload": base64.b64encode(tail).decode()})
    end = out.restart()

    for k, rec in enumerate(split_lines):
        rec["position"] = k
    tar_split = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n"
                         for r in split_lines)
    ts_compressed = zstandard.ZstdCompressor(level=level).compress(tar_split)
    toc = {"version": 1, "entries": entries,
           "tarSplitDigest": "sha256:" + hashlib.sha256(ts_compressed).hexdigest()}
    manifest = json.dumps(toc, separators=(",", ":")).encode()
    compressed_manifest = zstandard.ZstdCompressor(level=level).compress(manifest)
    blob = bytearray(out.buf)
    manifest_offset = end + 8
    blob += SKIPPABLE + struct.pack("<I", len(compressed_manifest)) + compressed_manifest
    ts_offset = manifest_offset + len(compressed_manifest) + 8
    blob += SKIPPABLE + struct.pack("<I", len(ts_compressed)) + ts_compressed
    footer = struct.pack("<QQQQQQQ", manifest_offset, len(compressed_manifest), len(manifest), 1,
                         ts_offset, len(ts_compressed), len(tar_split)) + b"GnUlInUx"
    blob += SKIPPABLE + struct.pack("<I", len(footer)) + footer
    annotations = {
        PREFIX + "manifest-checksum": "sha256:" + hashlib.sha256(compressed_manifest).hexdigest(),
        PREFIX + "manifest-position":
            f"{manifest_offset}:{len(compressed_manifest)}:{len(manifest)}:1",
        PREFIX + "tarsplit-position": f"{ts_offset}:{len(ts_compressed)}:{len(tar_split)}",
    }
    return Written(bytes(blob), annotations, toc, tar_split,
                   "sha256:" + hashlib.sha256(tar).hexdigest(), holes)
