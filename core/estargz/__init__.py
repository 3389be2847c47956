"""The layer formats: eStargz, zstd:chunked, legacy stargz (plain tar/gzip/zstd
too): footers, TOC -> LayerIndex, chunk decoding and verification, the two writers.
"""

from .chunks import decode_chunk, decompress_chunk, verify_chunk
from .footer import Footer, Format, parse_footer
from .loader import load_layer_index, parse_toc_region, read_footer
from .reader import fetch_chunks, iter_file, read_file_range, verify_file
from .toc import (
    NO_PREFETCH_LANDMARK,
    PREFETCH_LANDMARK,
    TYPES,
    Chunk,
    Entry,
    LayerIndex,
    build_index,
)

__all__ = [
    "Chunk", "Entry", "Footer", "Format", "LayerIndex", "NO_PREFETCH_LANDMARK",
    "PREFETCH_LANDMARK", "TYPES", "build_index", "decode_chunk", "decompress_chunk",
    "fetch_chunks", "iter_file", "load_layer_index", "parse_footer", "parse_toc_region",
    "read_file_range", "read_footer", "verify_chunk", "verify_file",
]
