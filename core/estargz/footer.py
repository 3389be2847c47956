"""Footers: how a blob's tail tells its format and where its TOC lives.

* eStargz: a 51-byte empty gzip member whose extra field is the ``SG``
  subfield holding ``%016x`` (TOC offset) + ``STARGZ``.
* legacy stargz (CRFS): a 47-byte empty gzip member whose extra field is
  ``%016xSTARGZ`` without a subfield header.
* zstd:chunked: a zstd skippable frame ending in the ``GnUlInUx`` magic,
  48 bytes (older generation) or 72 bytes with the tar-split's place
  (current generation); see :mod:`.zstdchunked`.
* anything else: plain gzip / zstd / tar, told apart by the blob's head.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import FormatError
from .formats import Format
from .zstdchunked import FOOTER_V2_SIZE, TarSplit, frame_from_annotations, parse_footer_frame

ESTARGZ_FOOTER_SIZE = 51
STARGZ_FOOTER_SIZE = 47
ZSTDCHUNKED_FOOTER_SIZE = 48
# Enough tail to recognise any of the footers in one range request.
MAX_FOOTER_SIZE = FOOTER_V2_SIZE
ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Footer:
    """What a blob's tail says. ``toc_offset`` is None for non-lazy formats.

    ``toc_size`` is the compressed length of the TOC region when the footer
    states it (zstd:chunked); for gzip formats the TOC runs to the footer.
    """

    format: str
    footer_size: int = 0
    toc_offset: int | None = None
    toc_size: int | None = None
    toc_uncompressed_size: int | None = None
    tar_split: TarSplit | None = None  # zstd:chunked's current generation


def _parse_hex_offset(s: bytes) -> int | None:
    try:
        text = s.decode("ascii")
    except UnicodeDecodeError:
        return None
    if len(text) != 16 or any(c not in "0123456789abcdefABCDEF" for c in text):
        return None
    return int(text, 16)


def _gzip_footer_extra(tail: bytes, size: int) -> bytes | None:
    """The FEXTRA payload of an empty gzip member of exactly ``size`` bytes
    at the end of ``tail``, or None."""
    if len(tail) < size:
        return None
    f = tail[-size:]
    if f[:3] != b"\x1f\x8b\x08" or not (f[3] & 0x04):
        return None
    xlen = struct.unpack_from("<H", f, 10)[0]
    if 12 + xlen + 5 + 8 != size:
        return None
    return f[12 : 12 + xlen]


def parse_footer(tail: bytes, blob_size: int, head: bytes = b"") -> Footer:
    """Recognise the format from the last bytes of a blob (``tail``, at least
    :data:`MAX_FOOTER_SIZE` bytes when the blob is that large) and optionally
    its first bytes (``head``) to tell plain gzip / zstd / tar apart."""
    extra = _gzip_footer_extra(tail, ESTARGZ_FOOTER_SIZE)
    if extra is not None and extra[:2] == b"SG" and len(extra) == 26:
        sub_len = struct.unpack_from("<H", extra, 2)[0]
        payload = extra[4:]
        if sub_len == 22 and payload[16:] == b"STARGZ":
            off = _parse_hex_offset(payload[:16])
            if off is not None:
                return _checked(Footer(Format.ESTARGZ, ESTARGZ_FOOTER_SIZE, off), blob_size)
    extra = _gzip_footer_extra(tail, STARGZ_FOOTER_SIZE)
    if extra is not None and len(extra) == 22 and extra[16:] == b"STARGZ":
        off = _parse_hex_offset(extra[:16])
        if off is not None:
            return _checked(Footer(Format.STARGZ, STARGZ_FOOTER_SIZE, off), blob_size)
    zf = parse_footer_frame(tail)
    if zf is not None:
        return _checked(Footer(Format.ZSTDCHUNKED, zf.size, zf.toc_offset, zf.toc_size,
                               zf.toc_uncompressed_size, zf.tar_split), blob_size)
    if head.startswith(GZIP_MAGIC):
        return Footer(Format.GZIP)
    if head.startswith(ZSTD_FRAME_MAGIC):
        return Footer(Format.ZSTD)
    if len(head) >= 262 and head[257:262] == b"ustar":
        return Footer(Format.TAR)
    if not head:
        raise FormatError("unrecognised blob: no eStargz, stargz or zstd:chunked footer")
    raise FormatError("unrecognised blob format: neither gzip, zstd nor tar")


def footer_from_annotations(annotations: dict | None, blob_size: int) -> Footer | None:
    """A zstd:chunked layer's TOC place from its position annotations, for a
    blob whose tail has no footer we recognise (checked like a footer)."""
    zf = frame_from_annotations(annotations)
    if zf is None:
        return None
    return _checked(Footer(Format.ZSTDCHUNKED, 0, zf.toc_offset, zf.toc_size,
                           zf.toc_uncompressed_size, zf.tar_split), blob_size)


def _checked(footer: Footer, blob_size: int) -> Footer:
    end = blob_size - footer.footer_size
    if footer.toc_offset is None or footer.toc_offset < 0 or footer.toc_offset >= end:
        raise FormatError(
            f"{footer.format} footer points its TOC at offset {footer.toc_offset}, "
            f"outside the blob (size {blob_size})"
        )
    if footer.toc_size is not None and footer.toc_offset + footer.toc_size > end:
        raise FormatError(f"{footer.format} footer says the TOC runs past the blob's end")
    ts = footer.tar_split
    if ts is not None and ts.size and (ts.offset < 0 or ts.offset + ts.size > end):
        raise FormatError(f"{footer.format} footer puts the tar-split outside the blob")
    return footer


def estargz_footer(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer pointing at ``toc_offset`` (for the writer)."""
    payload = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(payload)) + payload
    header = b"\x1f\x8b\x08\x04" + b"\x00\x00\x00\x00" + b"\x00\xff" + struct.pack("<H", len(extra))
    # An empty final deflate block, then CRC32 and ISIZE of nothing.
    return header + extra + b"\x01\x00\x00\xff\xff" + b"\x00" * 8
