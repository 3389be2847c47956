"""The format names every layer module shares (``Format``): the lazy ones
(eStargz, zstd:chunked, legacy stargz) and the plain ones (gzip, zstd, tar).
Imports nothing, so the footer, TOC and chunk modules can all use it."""

from __future__ import annotations


class Format:
    ESTARGZ = "estargz"
    ZSTDCHUNKED = "zstdchunked"
    STARGZ = "stargz"
    GZIP = "gzip"
    ZSTD = "zstd"
    TAR = "tar"

    LAZY = (ESTARGZ, ZSTDCHUNKED, STARGZ)
    ALL = (ESTARGZ, ZSTDCHUNKED, STARGZ, GZIP, ZSTD, TAR)


__all__ = ["Format"]
