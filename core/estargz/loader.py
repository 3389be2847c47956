"""Fetching and parsing a layer's footer and TOC from a blob source.

One range request reads the blob's tail (footer and, for small layers, the
whole TOC); a second fetches exactly the part of the TOC before that tail. Decompressing and
parsing run in a worker thread so an event loop serving FUSE stays free.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading

import anyio.to_thread
from isal import isal_zlib

from ..errors import DigestMismatchError, FormatError
from ..source import BlobSource
from .footer import MAX_FOOTER_SIZE, Footer, Format, footer_from_annotations, parse_footer
from .toc import TOC_TAR_NAME, LayerIndex, ObjectCounter, decode_entries, index_entries
from .zstdchunked import annotate_index

# How much of the tail to read in the first request: the footer and the TOC
# of a layer with up to several thousand files (a compressed TOC takes ~30 B
# per entry), so most layers resolve in one request; a larger TOC costs one
# more request for exactly the bytes missing before this tail.
TAIL_READ = 256 << 10
# The largest TOC (JSON) we agree to inflate: room for MAX_ENTRIES entries
# as writers state them (~310 B each, tab-indented, as B10's 1M-entry
# layer: 312 MB). What a TOC at the limits costs in memory is measured by
# tests/reliability/test_resource_bounds.py (test_toc_entry_limit_holds_memory);
# core.estargz.toc.MAX_ENTRIES bounds entries that say less.
MAX_TOC_BYTES = 384 << 20
# TOC JSON (names, hex digests) compresses a few times over, never 100x:
# a TOC claiming more than this ratio (above a small floor) is a bomb.
MAX_TOC_RATIO = 100
TOC_RATIO_FLOOR = 16 << 20
HEAD_READ = 512
# TOC JSON is inflated (and its objects counted) this much at a time.
INFLATE_PIECE = 4 << 20
# TOC JSON larger than this is hashed in a thread while it is parsed.
HASH_IN_THREAD = 1 << 20


async def read_footer(source: BlobSource, annotations: dict | None = None) -> Footer:
    """Detect the blob's format (one or two small range reads); without a
    footer, a zstd:chunked layer's position ``annotations`` tell."""
    tail_len = min(source.size, MAX_FOOTER_SIZE)
    tail = await source.read_range(source.size - tail_len, tail_len)
    try:
        return parse_footer(tail, source.size)
    except FormatError:
        head = await source.read_range(0, min(source.size, HEAD_READ))
        footer = parse_footer(tail, source.size, head)
    return _by_annotations(footer, annotations, source.size)


def _by_annotations(footer: Footer, annotations: dict | None, size: int) -> Footer:
    if footer.format == Format.ZSTD:
        return footer_from_annotations(annotations, size) or footer
    return footer


def _inflate_gzip_toc(region: bytes) -> bytes:
    # Inflate the tar header first and trust nothing past the size it states:
    # a TOC member that inflates to gigabytes (a gzip bomb) is refused after
    # 512 bytes of output, not after MAX_TOC_BYTES of memory.
    d = isal_zlib.decompressobj(31)
    try:
        head = d.decompress(region, 512)
    except isal_zlib.error as e:
        raise FormatError(f"TOC is not valid gzip: {e}") from None
    if len(head) < 512:
        raise FormatError("TOC member is too short to hold a tar header")
    try:
        info = tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")
    except tarfile.TarError as e:
        raise FormatError(f"TOC tar header is invalid: {e}") from None
    if info.name != TOC_TAR_NAME:
        raise FormatError(f"TOC member is {info.name!r}, not {TOC_TAR_NAME!r}")
    if info.size > MAX_TOC_BYTES:
        raise FormatError(
            f"TOC says it inflates to {info.size} bytes, more than {MAX_TOC_BYTES >> 20} MiB; refused"
        )
    if info.size > max(TOC_RATIO_FLOOR, MAX_TOC_RATIO * len(region)):
        raise FormatError(
            f"TOC says it inflates {len(region)} compressed bytes to {info.size} "
            f"(over {MAX_TOC_RATIO}x); refused as a decompression bomb"
        )
    # A piece at a time, objects counted as they come, so a TOC of millions
    # of tiny entries is refused a few MiB past the limit rather than after
    # all of it is in memory. (Joining the pieces holds the JSON twice for a
    # moment: less than decoding it costs next, which bounds the peak.)
    parts = []
    objects = ObjectCounter()
    pos, data = 0, d.unconsumed_tail
    try:
        while pos < info.size:
            piece = d.decompress(data, min(INFLATE_PIECE, info.size - pos))
            if not piece:
                break
            data = d.unconsumed_tail
            objects.feed(piece)
            parts.append(piece)
            pos += len(piece)
    except isal_zlib.error as e:
        raise FormatError(f"TOC is not valid gzip: {e}") from None
    if pos < info.size:
        raise FormatError("TOC member is truncated")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _inflate_zstd_toc(region: bytes, uncompressed_size: int | None) -> bytes:
    import zstandard  # zstd layers only: not on every daemon's start-up path

    if uncompressed_size and uncompressed_size > MAX_TOC_BYTES:
        raise FormatError(f"TOC inflates to more than {MAX_TOC_BYTES >> 20} MiB; refused")
    limit = min(uncompressed_size or MAX_TOC_BYTES, MAX_TOC_BYTES,
                max(TOC_RATIO_FLOOR, MAX_TOC_RATIO * len(region)))
    # Read at most limit + 1 bytes: a frame that inflates further (a zstd
    # bomb, or a footer that lies) is refused without holding all of it;
    # objects are counted as they come (see _inflate_gzip_toc).
    objects = ObjectCounter()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(region))
        parts, got = [], 0
        while got <= limit:
            piece = reader.read(min(INFLATE_PIECE, limit + 1 - got))
            if not piece:
                break
            objects.feed(piece)
            parts.append(piece)
            got += len(piece)
    except zstandard.ZstdError as e:
        raise FormatError(f"TOC is not valid zstd: {e}") from None
    if got > limit:  # say which bound it broke
        if uncompressed_size and limit == uncompressed_size:
            raise FormatError(f"TOC inflates to more than the {uncompressed_size} bytes its "
                              "footer says; refused")
        if limit == MAX_TOC_BYTES:
            raise FormatError(f"TOC inflates to more than {MAX_TOC_BYTES >> 20} MiB; refused")
        raise FormatError(f"TOC inflates {len(region)} compressed bytes to more than {limit} "
                          f"(over {MAX_TOC_RATIO}x); refused as a decompression bomb")
    return b"".join(parts)


def parse_toc_region(footer: Footer, region: bytes, *, blob_digest: str, blob_size: int,
                     expected_toc_digest: str | None = None,
                     expected_manifest_checksum: str | None = None) -> LayerIndex:
    """Inflate, check and index a TOC region (blocking; run in a thread)."""
    manifest_checksum = None
    if footer.format == Format.ZSTDCHUNKED:
        got = manifest_checksum = "sha256:" + hashlib.sha256(region).hexdigest()
        if expected_manifest_checksum:
            if got != expected_manifest_checksum:
                raise DigestMismatchError(
                    f"zstd:chunked manifest checksum mismatch: annotated "
                    f"{expected_manifest_checksum}, computed {got}"
                )
        toc_json = _inflate_zstd_toc(region, footer.toc_uncompressed_size)
    else:
        if expected_manifest_checksum and not expected_toc_digest:
            # The checksum anchors only a zstd:chunked TOC: an anchor that
            # cannot be checked is no anchor.
            raise DigestMismatchError(
                f"layer is {footer.format}, but its only TOC anchor is a zstd:chunked "
                "manifest-checksum; refusing to trust its TOC")
        toc_json = _inflate_gzip_toc(region)
    # The TOC digest is the sha256 of the TOC JSON (what the annotation
    # states). hashlib releases the GIL over large buffers, so a big TOC is
    # hashed on the other core while it is parsed; nothing built from it is
    # returned (or its errors reported) before the digest has been checked.
    hasher = hashlib.sha256()
    hashing = None
    if len(toc_json) >= HASH_IN_THREAD:
        hashing = threading.Thread(target=hasher.update, args=(toc_json,),
                                   name="toc-digest", daemon=True)
        hashing.start()
    else:
        hasher.update(toc_json)

    def check_digest() -> str:
        if hashing is not None:
            hashing.join()
        toc_digest = "sha256:" + hasher.hexdigest()
        if expected_toc_digest and toc_digest != expected_toc_digest:
            raise DigestMismatchError(
                f"TOC digest mismatch: annotated {expected_toc_digest}, computed {toc_digest}"
            )
        return toc_digest

    try:
        # both inflaters counted its objects
        ents, checked = decode_entries(toc_json, counted=True)
    except FormatError:
        check_digest()  # a TOC that is not the annotated one: say that instead
        raise
    # Checked before indexing (the hash ran beside the decoding, which takes
    # longer), so nothing is indexed from a TOC that is not the annotated one
    # and, for eStargz, the JSON is dropped here: indexing a large TOC then
    # peaks without it (a 1M-entry one: ~300 MB less).
    toc_digest = check_digest()
    if footer.format != Format.ZSTDCHUNKED:
        del toc_json
    ix = index_entries(ents, checked, format=footer.format, blob_digest=blob_digest,
                       blob_size=blob_size, toc_digest=toc_digest,
                       toc_offset=footer.toc_offset)
    del ents
    ix.toc_verified = bool(expected_toc_digest)
    ix.toc_size = len(region)
    ix.manifest_checksum = manifest_checksum
    if footer.format == Format.ZSTDCHUNKED:
        annotate_index(ix, toc_json, footer.tar_split)
    return ix


async def load_layer_index(source: BlobSource, *, expected_toc_digest: str | None = None,
                           require_toc_digest: bool = False,
                           expected_manifest_checksum: str | None = None,
                           annotations: dict | None = None) -> LayerIndex:
    """Fetch, verify and index a layer's TOC (see docs/CONTRACTS.md)."""
    if require_toc_digest and not (expected_toc_digest or expected_manifest_checksum):
        raise DigestMismatchError(
            "layer has no TOC digest annotation (containerd.io/snapshot/stargz/toc.digest "
            "or a zstd:chunked manifest-checksum); refusing to trust its TOC"
        )
    size = source.size
    tail_len = min(size, TAIL_READ)
    tail_start = size - tail_len
    tail = await source.read_range(tail_start, tail_len)
    try:
        footer = parse_footer(tail[-MAX_FOOTER_SIZE:], size)
    except FormatError:
        head = tail[:HEAD_READ] if tail_start == 0 else await source.read_range(0, min(size, HEAD_READ))
        footer = _by_annotations(parse_footer(tail[-MAX_FOOTER_SIZE:], size, head),
                                 annotations, size)
    if footer.format not in Format.LAZY:
        raise FormatError(
            f"layer {source.digest[:19]} is plain {footer.format}: it has no TOC and "
            "cannot be read lazily (convert it to eStargz)"
        )
    region_end = size - footer.footer_size
    if footer.toc_size is not None:
        region_end = footer.toc_offset + footer.toc_size
    if region_end - footer.toc_offset > MAX_TOC_BYTES:
        raise FormatError(f"TOC region is larger than {MAX_TOC_BYTES >> 20} MiB; refused")
    if footer.toc_offset < 0 or region_end < footer.toc_offset or region_end > size:
        raise FormatError("footer points the TOC outside the blob")
    if footer.toc_offset >= tail_start:
        region = tail[footer.toc_offset - tail_start : region_end - tail_start]
    elif region_end <= tail_start:
        region = await source.read_range(footer.toc_offset, region_end - footer.toc_offset)
    else:  # only the part before the tail we already hold
        head_part = await source.read_range(footer.toc_offset, tail_start - footer.toc_offset)
        region = head_part + tail[: region_end - tail_start]
    return await anyio.to_thread.run_sync(
        lambda: parse_toc_region(
            footer, region, blob_digest=source.digest, blob_size=size,
            expected_toc_digest=expected_toc_digest,
            expected_manifest_checksum=expected_manifest_checksum,
        )
    )
