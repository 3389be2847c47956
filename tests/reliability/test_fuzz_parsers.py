"""Fuzzing the footer, TOC and layer-index parsers with hypothesis.

The property everywhere: whatever the bytes, only ``core.errors.CoreError``
subclasses escape (never KeyError, TypeError, IndexError, RecursionError,
MemoryError...), and an index that *is* built can be walked and read without
anything else escaping either.
"""

from __future__ import annotations

import json
import os
import struct
import zlib

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import CoreError
from core.estargz import load_layer_index, parse_footer, parse_toc_region, read_file_range
from core.estargz.footer import Format, estargz_footer
from core.estargz.toc import build_index
from core.image import OCILayoutStore, open_image
from core.source import LocalBlobSource

pytestmark = pytest.mark.reliability

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "estargz-oci")
FUZZ = settings(max_examples=int(os.environ.get("RELIABILITY_FUZZ_EXAMPLES", "150")),
                deadline=None, suppress_health_check=list(HealthCheck))


def _layer_blobs() -> dict[str, tuple[str, str, int]]:
    """tag -> (path, digest, size) of the first layer of each lazy fixture image."""
    out = {}

    async def go():
        store = OCILayoutStore(FIXTURES)
        for tag in ("mini-esgz", "mini-esgz-64k", "mini-zstdchunked", "special-esgz"):
            img = await open_image(f"oci:{FIXTURES}:{tag}", store=store)
            d = img.layers[0]
            out[tag] = (os.path.join(FIXTURES, "blobs", "sha256", d.digest[7:]), d.digest, d.size)

    anyio.run(go)
    return out


BLOBS = _layer_blobs()


def _exercise(ix) -> None:
    """Walk everything an index offers, as the CLI and FUSE layer would."""
    for e in ix.iter_entries():
        _ = (e.path, e.name, e.type, e.size, e.mode, e.uid, e.gid, e.mtime, e.link_name,
             e.xattrs, e.digest, e.num_link, e.target_id, e.is_whiteout, e.is_opaque_marker)
        if e.type == "dir":
            for c in ix.children(e):
                assert ix.parent(c).id == e.id
        ix.lookup(e.path)
        if e.type in ("reg", "hardlink"):
            chunks = ix.chunks(e)
            ix.chunks_for_range(e, 0, max(1, e.size))
            for c in chunks:
                assert 0 <= c.offset < c.end <= ix.blob_size
                assert c.chunk_size >= 0
    list(ix.all_chunks())
    ix.memory_estimate()


def _only_core_errors(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except CoreError as e:
        msg = str(e)
        assert msg and "\n" not in msg, f"error message is not one line: {msg!r}"
        return None


# ---------------------------------------------------------------- footers

@FUZZ
@given(tail=st.binary(min_size=0, max_size=80), head=st.binary(max_size=600),
       size=st.integers(min_value=0, max_value=1 << 64))
def test_parse_footer_random_bytes(tail, head, size):
    f = _only_core_errors(parse_footer, tail, size, head)
    if f is not None and f.toc_offset is not None:
        assert 0 <= f.toc_offset < size


@FUZZ
@given(off=st.integers(min_value=0, max_value=(1 << 64) - 1),
       pos=st.integers(min_value=0, max_value=50), val=st.integers(0, 255),
       size=st.integers(min_value=0, max_value=1 << 40))
def test_parse_footer_mutated_valid_footers(off, pos, val, size):
    for footer in (
        estargz_footer(off % (1 << 63)),
        struct.pack("<II", 0x184D2A50, 40) + struct.pack("<QQQQ", off, off >> 3, off >> 1, 1)
        + b"GnUlInUx",
    ):
        b = bytearray(footer)
        b[pos % len(b)] = val
        f = _only_core_errors(parse_footer, bytes(b), size)
        if f is not None and f.toc_offset is not None:
            assert f.toc_offset < size
            if f.toc_size is not None:
                assert f.toc_offset + f.toc_size <= size


# ---------------------------------------------------------------- TOC JSON

_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
                    st.floats(allow_nan=False), st.text(max_size=12))
_JSONISH = st.recursive(_SCALAR, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=6), kids, max_size=3)),
    max_leaves=8)
_NAMES = st.one_of(
    st.sampled_from(["a", "a/b", "./a/b/", "/abs", "..", "a/../b", "", ".", "a//b", "x\x00y",
                     "a/b/c/d", ".wh.a", "a/.wh..wh..opq", ".prefetch.landmark",
                     ".no.prefetch.landmark", "é/ü", "a/" * 50]),
    st.text(max_size=20))
_TYPES = st.one_of(st.sampled_from(["dir", "reg", "symlink", "hardlink", "char", "block", "fifo",
                                    "chunk", "sock", ""]), _SCALAR)
_INTS = st.one_of(st.integers(min_value=-5, max_value=5000), st.integers(), _SCALAR)


@st.composite
def toc_entries(draw):
    e = {"name": draw(_NAMES), "type": draw(_TYPES)}
    for key in ("size", "offset", "endOffset", "chunkOffset", "chunkSize", "innerOffset", "mode",
                "uid", "gid", "devMajor", "devMinor"):
        if draw(st.booleans()):
            e[key] = draw(_INTS)
    if draw(st.booleans()):
        e["linkName"] = draw(st.one_of(_NAMES, _SCALAR))
    if draw(st.booleans()):
        e["xattrs"] = draw(st.one_of(
            st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=12), _SCALAR),
                            max_size=3), _JSONISH))
    if draw(st.booleans()):
        e["modtime"] = draw(st.one_of(st.sampled_from(
            ["2020-01-01T00:00:00Z", "2020-01-01T00:00:00.123456789Z", "0001-01-01T00:00:00Z",
             "9999-12-31T23:59:59.999999999+14:00", "nope"]), _SCALAR))
    if draw(st.booleans()):
        e["chunkDigest"] = draw(st.one_of(
            st.just("sha256:" + "ab" * 32), st.text(max_size=71), _SCALAR))
    if draw(st.booleans()):
        e["digest"] = draw(st.one_of(st.just("sha256:" + "cd" * 32), _SCALAR))
    if draw(st.booleans()):
        e[draw(st.text(max_size=6))] = draw(_JSONISH)
    return e


@FUZZ
@given(entries=st.lists(toc_entries(), max_size=25),
       blob_size=st.integers(min_value=0, max_value=1 << 40),
       toc_offset=st.integers(min_value=0, max_value=1 << 40))
def test_build_index_random_tocs(entries, blob_size, toc_offset):
    toc = json.dumps({"version": 1, "entries": entries}).encode()
    ix = _only_core_errors(build_index, toc, format=Format.ESTARGZ, blob_digest="sha256:" + "0" * 64,
                           blob_size=blob_size, toc_digest="sha256:" + "1" * 64,
                           toc_offset=toc_offset)
    if ix is not None:
        _exercise(ix)


@FUZZ
@given(doc=_JSONISH)
def test_build_index_arbitrary_json(doc):
    toc = json.dumps(doc).encode()
    _only_core_errors(build_index, toc, format=Format.ESTARGZ, blob_digest="sha256:" + "0" * 64,
                      blob_size=1000, toc_digest="sha256:" + "1" * 64, toc_offset=500)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_build_index_arbitrary_bytes(raw):
    _only_core_errors(build_index, raw, format=Format.ESTARGZ, blob_digest="sha256:" + "0" * 64,
                      blob_size=1000, toc_digest="sha256:" + "1" * 64, toc_offset=500)


def test_build_index_deep_json_nesting(rel):
    """100k nested arrays: the JSON parser's recursion limit becomes a FormatError."""
    deep = b'{"entries": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}"
    with pytest.raises(CoreError) as ei:
        build_index(deep, format=Format.ESTARGZ, blob_digest="sha256:" + "0" * 64, blob_size=1000,
                    toc_digest="sha256:" + "1" * 64, toc_offset=500)
    rel.row("fuzz", "TOC JSON nested 100,000 arrays deep",
            f"refused: {type(ei.value).__name__}: {str(ei.value)[:80]}")


# ---------------------------------------------------------------- TOC regions and whole blobs

def _region(tag):
    path, digest, size = BLOBS[tag]
    with open(path, "rb") as f:
        blob = f.read()
    footer = parse_footer(blob[-64:], size)
    end = size - footer.footer_size if footer.toc_size is None else footer.toc_offset + footer.toc_size
    return footer, blob, footer.toc_offset, end


@FUZZ
@given(tag=st.sampled_from(sorted(BLOBS)), data=st.data())
def test_parse_toc_region_mutated(tag, data):
    footer, blob, start, end = _region(tag)
    region = bytearray(blob[start:end])
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "zero"]))
        pos = data.draw(st.integers(0, max(0, len(region) - 1)))
        if kind == "flip" and region:
            region[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "truncate":
            del region[pos:]
        elif kind == "insert":
            region[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "zero":
            region[pos : pos + 16] = bytes(len(region[pos : pos + 16]))
    ix = _only_core_errors(parse_toc_region, footer, bytes(region), blob_digest=BLOBS[tag][1],
                           blob_size=len(blob))
    if ix is not None:
        _exercise(ix)


@FUZZ
@given(tag=st.sampled_from(sorted(BLOBS)), data=st.data())
def test_load_layer_index_mutated_blobs(tag, data, tmp_path_factory):
    path, digest, size = BLOBS[tag]
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    footer = parse_footer(bytes(blob[-64:]), size)
    # Mutate mostly around the TOC and footer, sometimes anywhere (chunk data).
    for _ in range(data.draw(st.integers(1, 6))):
        where = data.draw(st.sampled_from(["toc", "footer", "anywhere", "truncate"]))
        if where == "toc":
            pos = data.draw(st.integers(min(footer.toc_offset, len(blob) - 1), len(blob) - 1))
        elif where == "footer":
            pos = data.draw(st.integers(max(0, len(blob) - 64), len(blob) - 1))
        elif where == "truncate":
            cut = data.draw(st.integers(0, len(blob)))
            if cut % 2:
                del blob[len(blob) - cut // 64 :]
            else:
                del blob[cut:]
            if not blob:
                break
            continue
        else:
            pos = data.draw(st.integers(0, len(blob) - 1))
        if pos < len(blob):
            blob[pos] = data.draw(st.integers(0, 255))
    p = tmp_path_factory.mktemp("mut") / "blob"
    p.write_bytes(bytes(blob))

    async def go():
        src = LocalBlobSource(p, digest, len(blob))
        try:
            ix = await load_layer_index(src)
        except CoreError as e:
            assert "\n" not in str(e)
            return
        _exercise(ix)
        # Reading files of a corrupted blob: right bytes or a CoreError.
        for e in list(ix.iter_entries())[:60]:
            if e.type in ("reg", "hardlink"):
                try:
                    await read_file_range(ix, src, e, 0, min(e.size, 70_000))
                except CoreError:
                    pass

    anyio.run(go)


def test_fuzz_summary(rel):
    """Records what the hypothesis tests above covered (one row per target)."""
    n = FUZZ.max_examples
    for what in (
        f"parse_footer: random tails/heads/sizes and single-byte mutations of valid eStargz and "
        f"zstd:chunked footers ({n}+{n} examples)",
        f"build_index: random TOC entries (hostile names, types, ints, xattrs, times, digests), "
        f"arbitrary JSON and arbitrary bytes ({3 * n} examples)",
        f"parse_toc_region: bit flips, truncation, insertion, zeroing of the fixture TOC regions "
        f"(gzip and zstd:chunked, {n} examples)",
        f"load_layer_index + read_file_range over LocalBlobSource of mutated fixture blobs "
        f"(footer, TOC, chunk data, truncation; {n} examples)",
    ):
        rel.row("fuzz", what, "only CoreError subclasses escape; one-line messages; built "
                "indexes walk cleanly with chunks inside the blob")
    assert zlib  # keep import used for readers who extend the mutators
