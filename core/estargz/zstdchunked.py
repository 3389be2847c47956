"""containers/storage's zstd:chunked, both generations, beyond what eStargz has.

A zstd:chunked blob is a zstd stream whose frames hold tar headers and file
chunks (each chunk starts a frame, so a TOC ``offset`` is a frame boundary),
followed by skippable frames (magic 0x184D2A50) the decoder ignores, so the
whole blob still decompresses to the layer's tar:

* older generation (podman 4.x, containers/storage < 1.50): the TOC frame,
  then a 48-byte footer frame with a 40-byte payload: TOC offset, compressed
  length, uncompressed length, manifest type (1), ``GnUlInUx``; annotations
  ``io.containers.zstd-chunked.manifest-checksum`` / ``-position``;
* current generation (podman 5, buildah 1.3x): the TOC frame, a tar-split
  frame, then a 72-byte footer frame with a 64-byte payload: TOC offset,
  compressed length, uncompressed length, manifest type, tar-split offset,
  compressed length, uncompressed length, ``GnUlInUx``; annotations under
  ``io.github.containers.zstd-chunked.`` (``manifest-checksum``,
  ``manifest-position``, ``tarsplit-position``). Its TOC has
  ``tarSplitDigest`` (sha256 of the compressed tar-split), entries carry
  ``endOffset``, and chunks of ``chunkType: "zeros"`` are runs of zeros
  (holes) that a reader produces without fetching them.

The tar-split (vbatts/tar-split's JSON packer, zstd-compressed) lists, in tar
order, raw segments of the tar (headers, padding, the end-of-archive blocks)
and file entries (name, size); the segments plus each file's content rebuild
the exact original tar, so a layer's diffID can be checked from its chunks.

Contracts: :func:`parse_footer_frame` reads only the bytes it is given;
:func:`annotate_index` runs in a worker thread next to ``build_index``;
:func:`zero_chunk_data` never touches the blob; :func:`read_tar_split`
fetches exactly the tar-split frame and refuses one whose digest is not the
TOC's ``tarSplitDigest``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from ..errors import ChunkDigestError, DigestMismatchError, FormatError

if TYPE_CHECKING:  # type names only: toc.py builds on the footer, which uses this module
    from .toc import Chunk, LayerIndex

SKIPPABLE_MAGIC = 0x184D2A50
MAGIC = b"GnUlInUx"
FOOTER_V1_SIZE = 48  # 8-byte frame header + 40-byte payload
FOOTER_V2_SIZE = 72  # 8-byte frame header + 64-byte payload
FRAME_HEADER = 8
MANIFEST_TYPE_CRFS = 1
CHUNK_TYPE_ZEROS = "zeros"
# A tar-split lists one small JSON line per tar member: refuse absurd sizes.
MAX_TAR_SPLIT_BYTES = 1 << 30
MAX_TAR_SPLIT_RATIO = 100
TAR_SPLIT_RATIO_FLOOR = 16 << 20
# tar-split entry types (vbatts/tar-split storage.Type).
TS_FILE = 1
TS_SEGMENT = 2


@dataclass(frozen=True)
class FooterFrame:
    """What a zstd:chunked footer states. ``tar_split`` is None in the older
    generation (no tar-split in the blob)."""

    size: int
    toc_offset: int
    toc_size: int
    toc_uncompressed_size: int
    tar_split: TarSplit | None


@dataclass(frozen=True)
class TarSplit:
    """Where the compressed tar-split lives in the blob (its frame's payload)."""

    offset: int
    size: int
    uncompressed_size: int
    digest: str | None = None  # the TOC's tarSplitDigest, once the TOC is read


def parse_footer_frame(tail: bytes) -> FooterFrame | None:
    """The zstd:chunked footer at the end of ``tail`` (either generation), or
    None when ``tail`` does not end with one."""
    if len(tail) < FOOTER_V1_SIZE or tail[-8:] != MAGIC:
        return None
    for size in (FOOTER_V2_SIZE, FOOTER_V1_SIZE):
        if len(tail) < size:
            continue
        f = tail[-size:]
        magic, frame_len = struct.unpack_from("<II", f, 0)
        if magic != SKIPPABLE_MAGIC or frame_len != size - FRAME_HEADER:
            continue
        off, clen, ulen, _mtype = struct.unpack_from("<QQQQ", f, 8)
        ts = None
        if size == FOOTER_V2_SIZE:
            ts_off, ts_clen, ts_ulen = struct.unpack_from("<QQQ", f, 40)
            ts = TarSplit(ts_off, ts_clen, ts_ulen)
        return FooterFrame(size, off, clen, ulen, ts)
    return None


def footer_frame(toc_offset: int, toc_size: int, toc_uncompressed: int,
                 tar_split: TarSplit) -> bytes:
    """The current generation's 72-byte footer (for the writer)."""
    payload = struct.pack("<QQQQQQQ", toc_offset, toc_size, toc_uncompressed,
                          MANIFEST_TYPE_CRFS, tar_split.offset, tar_split.size,
                          tar_split.uncompressed_size) + MAGIC
    return skippable_frame(payload)


def skippable_frame(payload: bytes) -> bytes:
    return struct.pack("<II", SKIPPABLE_MAGIC, len(payload)) + payload


def parse_position(value: str | None, fields: int) -> tuple[int, ...] | None:
    """``offset:length:uncompressed[:type]`` of a position annotation, or None."""
    if not value:
        return None
    parts = value.split(":")
    if len(parts) != fields or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)


MANIFEST_POSITION_KEYS = ("io.github.containers.zstd-chunked.manifest-position",
                          "io.containers.zstd-chunked.manifest-position")
TARSPLIT_POSITION_KEY = "io.github.containers.zstd-chunked.tarsplit-position"


def frame_from_annotations(annotations: dict | None) -> FooterFrame | None:
    """Where the TOC (and tar-split) live according to the layer's position
    annotations (containers/storage itself reads these, not the footer); a
    blob without a footer we know is still found this way. Positions are
    checked against the blob like a footer's."""
    if not annotations:
        return None
    for key in MANIFEST_POSITION_KEYS:
        pos = parse_position(annotations.get(key), 4)
        if pos is None:
            continue
        off, clen, ulen, _mtype = pos
        ts = None
        if key.startswith("io.github."):
            tpos = parse_position(annotations.get(TARSPLIT_POSITION_KEY), 3)
            if tpos is not None:
                ts = TarSplit(*tpos)
        return FooterFrame(0, off, clen, ulen, ts)
    return None


# ---------------------------------------------------------------- TOC extras
class _ZEntry(msgspec.Struct, gc=False):
    name: Any = None
    type: Any = None
    chunkOffset: Any = 0
    chunkType: Any = None


class _ZToc(msgspec.Struct, gc=False):
    tarSplitDigest: Any = None
    entries: list[_ZEntry] = []


_ZTOC_DECODER = msgspec.json.Decoder(_ZToc)


def annotate_index(ix: LayerIndex, toc_json: bytes, tar_split: TarSplit | None) -> None:
    """Record what only zstd:chunked TOCs say: the holes (``zeros`` chunks)
    and the tar-split's place (from the footer) and digest (from the TOC).
    Blocking (run in a thread)."""
    has_zeros = b'"zeros"' in toc_json
    if not (has_zeros or tar_split):
        return
    try:
        doc = _ZTOC_DECODER.decode(toc_json)
    except msgspec.DecodeError:
        return  # build_index accepted it; its leniency decides, not ours
    digest = doc.tarSplitDigest if isinstance(doc.tarSplitDigest, str) else None
    if tar_split is not None and tar_split.size:
        ix.tar_split = TarSplit(tar_split.offset, tar_split.size,
                                tar_split.uncompressed_size, digest)
    if not has_zeros:
        return
    zeros: set[int] = set()
    for e in doc.entries:
        if e.chunkType != CHUNK_TYPE_ZEROS or not isinstance(e.name, str):
            continue
        entry = ix.lookup(e.name)
        if entry is None:
            continue
        for c in ix.chunks(entry):
            if c.chunk_offset == e.chunkOffset:
                zeros.add(c.index)
                break
    ix.zero_chunks = frozenset(zeros)


@functools.lru_cache(maxsize=64)
def _zeros_hold(size: int, digest: str | None) -> bool:
    if not digest:
        return True
    algo, _, want = digest.partition(":")
    if algo != "sha256":
        return False
    h = hashlib.sha256()
    block = memoryview(bytes(min(size, 1 << 20)))
    left = size
    while left:
        n = min(left, len(block))
        h.update(block[:n])
        left -= n
    return h.hexdigest() == want


def zero_chunk_data(chunk: Chunk, path: str = "") -> bytes:
    """A hole's bytes, checked against the chunk digest the TOC states (a
    TOC that calls data a hole fails here as a corrupt chunk would)."""
    if not _zeros_hold(chunk.chunk_size, chunk.digest):
        where = f" of {path}" if path else ""
        raise ChunkDigestError(f"chunk{where} at file offset {chunk.chunk_offset} is marked as "
                               f"zeros but its digest {chunk.digest[:19]}... is not of zeros")
    return bytes(chunk.chunk_size)


# ---------------------------------------------------------------- tar-split
def check_tar_split(ix: LayerIndex, compressed: bytes) -> str:
    """The digest of a compressed tar-split; raises unless it is the TOC's
    ``tarSplitDigest``."""
    got = "sha256:" + hashlib.sha256(compressed).hexdigest()
    want = ix.tar_split.digest if ix.tar_split else None
    if not want:
        raise DigestMismatchError("the TOC states no tarSplitDigest to check the tar-split with")
    if got != want:
        raise DigestMismatchError(f"tar-split digest mismatch: TOC says {want}, computed {got}")
    return got


def inflate_tar_split(compressed: bytes, uncompressed_size: int) -> bytes:
    import zstandard

    limit = min(MAX_TAR_SPLIT_BYTES,
                max(TAR_SPLIT_RATIO_FLOOR, MAX_TAR_SPLIT_RATIO * len(compressed)))
    if uncompressed_size > limit:
        raise FormatError(f"tar-split says it inflates to {uncompressed_size} bytes; refused")
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(compressed),
                                                            read_across_frames=True)
        out = reader.read(limit + 1)
        while len(out) <= limit:
            more = reader.read(limit + 1 - len(out))
            if not more:
                break
            out += more
    except zstandard.ZstdError as e:
        raise FormatError(f"tar-split is not valid zstd: {e}") from None
    if len(out) > limit:
        raise FormatError("tar-split inflates past its limit; refused")
    return out


async def read_tar_split(ix: LayerIndex, source) -> bytes:
    """Fetch, check (against ``tarSplitDigest``) and inflate the tar-split."""
    ts = ix.tar_split
    if ts is None:
        raise FormatError("this zstd:chunked layer has no tar-split (older generation)")
    if ts.offset + ts.size > source.size:
        raise FormatError("the tar-split runs past the blob's end")
    compressed = await source.read_range(ts.offset, ts.size)
    check_tar_split(ix, compressed)
    import anyio.to_thread

    return await anyio.to_thread.run_sync(inflate_tar_split, compressed, ts.uncompressed_size)


@dataclass(frozen=True)
class SplitItem:
    """One tar-split record: raw tar bytes (``segment``) or a file whose
    ``size`` content bytes come from the layer (``name``)."""

    segment: bytes | None
    name: str | None
    size: int


def iter_tar_split(data: bytes) -> Iterator[SplitItem]:
    """The records of an inflated tar-split, in tar order."""
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = msgspec.json.decode(line)
        except msgspec.DecodeError:
            raise FormatError(f"tar-split line {n} is not JSON") from None
        if not isinstance(rec, dict):
            raise FormatError(f"tar-split line {n} is not an object")
        typ = rec.get("type")
        payload = rec.get("payload")
        if typ == TS_SEGMENT:
            try:
                seg = base64.b64decode(payload or "", validate=True)
            except (ValueError, TypeError):
                raise FormatError(f"tar-split line {n}: payload is not base64") from None
            yield SplitItem(seg, None, len(seg))
        elif typ == TS_FILE:
            name = rec.get("name")
            if not name and rec.get("name_raw"):
                try:
                    name = base64.b64decode(rec["name_raw"]).decode("utf-8", "surrogateescape")
                except (ValueError, TypeError):
                    raise FormatError(f"tar-split line {n}: name_raw is not base64") from None
            size = rec.get("size") or 0
            if not isinstance(name, str) or not isinstance(size, int) or size < 0:
                raise FormatError(f"tar-split line {n}: a file entry without a name or size")
            yield SplitItem(None, name, size)
        else:
            raise FormatError(f"tar-split line {n}: unknown entry type {typ!r}")
