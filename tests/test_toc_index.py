"""build_index's decoders (checked and lenient: same index), its column-wise paths (columns no entry has, single-chunk files
whose chunk digest is the file's, blob-ordered chunks) build what they
should; and the TOC digest is checked before anything built from a TOC is
used or reported."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from array import array

import pytest

from core.errors import DigestMismatchError, FormatError
from core.estargz.footer import MAX_FOOTER_SIZE, Footer, Format, parse_footer
from core.estargz.loader import (
    HASH_IN_THREAD,
    _inflate_gzip_toc,
    _inflate_zstd_toc,
    parse_toc_region,
)
from core.estargz.toc import _decode_toc, _digest_bytes, _sha256_column, build_index

KW = dict(format=Format.ESTARGZ, blob_digest="sha256:" + "0" * 64, blob_size=1 << 30,
          toc_digest="sha256:" + "1" * 64, toc_offset=1 << 29)
H1, H2 = "sha256:" + "ab" * 32, "sha256:" + "cd" * 32


def _reg(name, size=10, off=0, **kw):
    return {"name": name, "type": "reg", "size": size, "offset": off, "digest": H1,
            "chunkDigest": H2, **kw}


def _dir(name, **kw):
    return {"name": name, "type": "dir", **kw}


TYPICAL = [
    {"name": ".prefetch.landmark", "type": "reg", "size": 1, "offset": 50, "digest": H1},
    _dir("./", mode=0o700),
    _dir("etc/", mode=0o755, modtime="2023-11-14T22:13:20Z", userName="root", uid=0),
    _reg("etc/.hidden", off=100, mode=0o600),
    _reg("etc/passwd", off=200, uid=1000, gid=1000, userName="u", groupName="g"),
    _reg("etc/empty", size=0, off=0),
    {"name": "etc/link", "type": "symlink", "linkName": "passwd"},
    {"name": "etc/hard", "type": "hardlink", "linkName": "etc/passwd"},
    _dir("etc/sub/", xattrs={"user.a": "eHl6"}),
    _reg("etc/sub/big", size=300, off=300, chunkSize=100),
    {"name": "etc/sub/big", "type": "chunk", "offset": 400, "chunkOffset": 100,
     "chunkSize": 100, "chunkDigest": H1},
    {"name": "etc/sub/big", "type": "chunk", "offset": 500, "chunkOffset": 200,
     "chunkDigest": H2},
    {"name": "dev/", "type": "dir"},
    {"name": "dev/null", "type": "char", "devMajor": 1, "devMinor": 3},
    _reg("dev/.wh.gone", size=0),
    _reg("é/ü", off=600) | {"name": "dev/é ü"},
    _reg("weird", off=700, digest="md5:x", chunkDigest="sha256:zz"),
    _reg("nodigest", off=800, digest=None, mode=None, modtime=None),
]


def test_typical_toc():
    ix = build_index(json.dumps({"entries": TYPICAL}).encode(), **KW)
    assert ix.prefetch_end == 50 and ix.root.mode == 0o700
    assert [c.name for c in ix.children(ix.root)] == ["dev", "etc", "nodigest", "weird"]
    assert ix.lookup("etc/.hidden").mode == 0o600
    big = ix.lookup("etc/sub/big")
    assert [(c.chunk_offset, c.chunk_size, c.offset, c.end) for c in ix.chunks(big)] == [
        (0, 100, 300, 400), (100, 100, 400, 500), (200, 100, 500, 600)]
    assert ix.lookup("etc/hard").num_link == 2 and ix.lookup("etc/hard").size == 10
    assert ix.lookup("etc/sub").xattrs == {"user.a": b"xyz"}
    assert ix.lookup("weird").digest == "md5:x" and ix.chunks(ix.lookup("weird"))[0].digest is None
    nd = ix.lookup("nodigest")
    assert nd.digest is None and nd.mode == 0o644 and nd.mtime == 0.0
    assert ix.lookup("dev/null").dev_minor == 3 and ix.lookup("dev/é ü").size == 10
    assert ix.lookup("etc/passwd").uname == "u" and ix.lookup("etc").uname == "root"


def _ix(entries, **kw):
    return build_index(json.dumps({"version": 1, "entries": entries}).encode(), **{**KW, **kw})


def test_columns_no_entry_has_are_defaults():
    ix = _ix([{"name": "d", "type": "dir"}, {"name": "d/f", "type": "reg"},
              {"name": "d/l", "type": "symlink", "linkName": "f"}])
    d, f, link = (ix.lookup(p) for p in ("d", "d/f", "d/l"))
    assert (d.mode, f.mode, link.mode) == (0o755, 0o644, 0o644)
    assert (f.size, f.uid, f.gid, f.mtime, f.uname, f.digest, f.xattrs) == (0, 0, 0, 0.0, "", None, {})
    assert ix.chunks(f) == [] and ix.num_chunks == 0 and link.link_name == "f"


def test_modes_nulls_and_type_bits():
    ix = _ix([_dir("d", mode=None), _reg("d/f", mode=0o100755), _reg("d/g", off=20, mode=None)])
    assert [ix.lookup(p).mode for p in ("d", "d/f", "d/g")] == [0o755, 0o755, 0o644]
    with pytest.raises(FormatError, match="mode"):
        _ix([_reg("f", mode=True)])
    with pytest.raises(FormatError, match="uid"):
        _ix([_reg("f", uid=-1)])


def test_single_chunk_digests_reused_or_decoded():
    same = _ix([_reg("a", off=0, chunkDigest=H1), _reg("b", off=10, chunkDigest=H1),
                _reg("e", size=0, off=0)])
    assert [c.digest for c in same.all_chunks()] == [H1, H1]
    assert same.lookup("a").digest == H1 and same.lookup("e").digest == H1
    mixed = _ix([_reg("a", off=0, chunkDigest=H1), _reg("b", off=10),
                 {"name": "c", "type": "reg", "size": 5, "offset": 20}])
    assert [c.digest for c in mixed.all_chunks()] == [H1, H2, None]
    assert mixed.lookup("c").digest is None
    # Chunk entries after first chunks that all carry their file's digest.
    multi = _ix([_reg("a", off=0, chunkDigest=H1),
                 _reg("b", size=20, off=10, chunkDigest=H1, chunkSize=10),
                 {"name": "b", "type": "chunk", "offset": 30, "chunkOffset": 10,
                  "chunkDigest": H2}])
    assert [(multi.path_of(c.entry_id), c.digest) for c in multi.all_chunks()] == [
        ("a", H1), ("b", H1), ("b", H2)]
    # An all-zero digest that the TOC states is a digest, not a missing one.
    zero = "sha256:" + "0" * 64
    z = _ix([_reg("a", off=0, digest=zero, chunkDigest=zero)])
    assert z.lookup("a").digest == zero and next(z.all_chunks()).digest == zero


def test_chunk_digest_hexes_say_what_each_chunk_says():
    """The bulk digest column (the app's layer-wide cache look) agrees with
    every chunk's own digest: one digest per file, several, none, all-zero."""
    zero = "sha256:" + "0" * 64
    layers = [
        [_reg("a", off=0, chunkDigest=H1), _reg("b", off=10, chunkDigest=H1),
         _reg("e", size=0, off=0)],
        [_reg("a", off=0, chunkDigest=H1), _reg("b", off=10),
         {"name": "c", "type": "reg", "size": 5, "offset": 20}],
        [_reg("a", off=0, chunkDigest=H1), _reg("b", size=20, off=10, chunkDigest=H1, chunkSize=10),
         {"name": "b", "type": "chunk", "offset": 30, "chunkOffset": 10, "chunkDigest": H2}],
        [_reg("a", off=0, digest=zero, chunkDigest=zero)],
        [_dir("d")],
    ]
    for ents in layers:
        ix = _ix(ents)
        want = [c.digest.partition(":")[2] if c.digest else None for c in ix.all_chunks()]
        assert ix.chunk_digest_hexes() == want
        for lo, hi in ((0, 1), (1, None), (1, 2), (2, 2)):  # slices of them (the app's)
            assert ix.chunk_digest_hexes(lo, hi) == want[lo:hi]


def test_chunks_out_of_blob_order_and_stated_sizes():
    ix = _ix([_reg("b", size=10, off=500), _reg("a", size=10, off=100, chunkSize=10),
              _reg("c", size=10, off=300, chunkSize=0)], toc_offset=900)
    assert [(ix.path_of(c.entry_id), c.offset, c.end, c.chunk_size) for c in ix.all_chunks()] == [
        ("a", 100, 300, 10), ("c", 300, 500, 10), ("b", 500, 900, 10)]
    with pytest.raises(FormatError, match="gap or overlap"):
        _ix([_reg("a", size=10, off=100, chunkSize=4)])


def _region(toc_json: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("stargz.index.json")
        ti.size = len(toc_json)
        tf.addfile(ti, io.BytesIO(toc_json))
    return gzip.compress(buf.getvalue())


@pytest.mark.parametrize("pad", [0, HASH_IN_THREAD])  # hashed inline / in a thread
def test_toc_digest_is_checked_before_the_index_or_its_errors(pad):
    good = json.dumps({"version": 1, "pad": "x" * pad,
                       "entries": [_reg("f", off=0)]}).encode()
    bad = json.dumps({"version": 1, "pad": "x" * pad,
                      "entries": [_reg("../f", off=0)]}).encode()
    footer = Footer(format=Format.ESTARGZ, toc_offset=1000, footer_size=51)
    kw = dict(blob_digest="sha256:" + "0" * 64, blob_size=1 << 20)
    digest = "sha256:" + hashlib.sha256(good).hexdigest()
    ix = parse_toc_region(footer, _region(good), expected_toc_digest=digest, **kw)
    assert ix.toc_digest == digest and ix.lookup("f").size == 10
    # Unannotated: the computed digest is recorded.
    assert parse_toc_region(footer, _region(good), **kw).toc_digest == digest
    with pytest.raises(DigestMismatchError):
        parse_toc_region(footer, _region(good), expected_toc_digest="sha256:" + "2" * 64, **kw)
    # A TOC that is both invalid and not the annotated one: the mismatch is reported.
    with pytest.raises(DigestMismatchError):
        parse_toc_region(footer, _region(bad), expected_toc_digest=digest, **kw)
    with pytest.raises(FormatError, match="escapes"):
        parse_toc_region(footer, _region(bad),
                         expected_toc_digest="sha256:" + hashlib.sha256(bad).hexdigest(), **kw)


# -- the two decoders -------------------------------------------------------
# TOCs as writers make them are decoded with their numbers checked by msgspec;
# anything else (a wrong type or bound anywhere, even in a field the index
# ignores) is decoded again leniently, or parsed by json, and checked where
# it is used, as before. Both must build the same index.

FIXTURE_BLOBS = os.path.join(os.path.dirname(__file__), "fixtures", "estargz-oci", "blobs",
                             "sha256")


def _state(ix) -> dict:
    return {k: (type(v).__name__, bytes(v)) if isinstance(v, (array, bytearray)) else v
            for k, v in vars(ix).items()}


def _fixture_tocs():
    for name in sorted(os.listdir(FIXTURE_BLOBS)):
        with open(os.path.join(FIXTURE_BLOBS, name), "rb") as f:
            blob = f.read()
        try:
            footer = parse_footer(blob[-MAX_FOOTER_SIZE:], len(blob))
        except FormatError:
            continue
        if footer.format not in Format.LAZY:
            continue
        end = (footer.toc_offset + footer.toc_size if footer.toc_size is not None
               else len(blob) - footer.footer_size)
        region = blob[footer.toc_offset : end]
        if footer.format == Format.ZSTDCHUNKED:
            toc = _inflate_zstd_toc(region, footer.toc_uncompressed_size)
        else:
            toc = _inflate_gzip_toc(region)
        yield name[:12], toc, dict(format=footer.format, blob_digest="sha256:" + name,
                                   blob_size=len(blob), toc_digest="",
                                   toc_offset=footer.toc_offset)


def test_checked_and_lenient_decoding_build_the_same_index():
    seen = 0
    for name, toc, kw in _fixture_tocs():
        assert _decode_toc(toc)[1], f"{name}: a writer's TOC takes the checked decoder"
        ix = _state(build_index(toc, **kw))
        # The parsed document (plain layers' path) is decoded leniently.
        assert _state(build_index(json.loads(toc), **kw)) == ix, name
        # So is a TOC with a value out of the checked decoder's bounds in an
        # entry the index ignores (a chunk entry's size).
        doc = json.loads(toc)
        doc["entries"].append({"name": "x", "type": "reg", "size": 3, "offset": 1})
        doc["entries"].append({"name": "x", "type": "chunk", "size": True, "offset": 1,
                               "chunkOffset": 0, "chunkSize": 3})
        odd = json.dumps(doc).encode()
        assert not _decode_toc(odd)[1]
        del doc["entries"][-1]["size"]
        a, b = build_index(odd, **kw), build_index(json.dumps(doc).encode(), **kw)
        assert _state(a) == _state(b), name
        seen += 1
    assert seen >= 8


def test_lenient_decoding_keeps_json_semantics():
    base = [_dir("d"), _reg("d/f", off=0)]
    ix = _ix(base)
    # A null size is 0, a null mode the type's default: the lenient decoder.
    nulls = _ix([_dir("d", mode=None), _reg("d/f", off=0), _reg("d/e", size=None, off=0)])
    assert nulls.lookup("d/e").size == 0 and nulls.lookup("d").mode == 0o755
    # JSON that msgspec refuses but json reads (a BOM, NaN in an ignored field).
    bom = b"\xef\xbb\xbf" + json.dumps({"entries": base}).encode()
    assert _state(build_index(bom, **KW)) == _state(ix)
    nan = json.dumps({"entries": base + [{"name": "d/f", "type": "chunk", "size": float("nan"),
                                          "offset": 5, "chunkOffset": 5, "chunkSize": 5}]})
    assert build_index(nan.encode(), **KW).lookup("d/f").size == 10
    with pytest.raises(FormatError, match="TOC entry 1 is not an object"):
        _ix([_dir("d"), 5])
    with pytest.raises(FormatError, match="entries"):
        build_index(b'{"entries": {}}', **KW)
    with pytest.raises(FormatError, match="not valid JSON"):
        build_index(b'{"entries": [', **KW)
    for bad in (True, -1, 1.5, 1 << 63, "1"):
        with pytest.raises(FormatError, match="size"):
            _ix([_reg("f", size=bad)])


def test_sha256_column_batches():
    """Digests are hex-decoded a batch at a time: a malformed one in a later
    batch is found, and every other one still decoded."""
    good = [f"sha256:{k:064x}" for k in range(1500)]
    assert _sha256_column(good) == ([True] * 1500, b"".join(bytes.fromhex(d[7:]) for d in good))
    for bad in ("sha257:" + "0" * 64, "sha256:" + "g" * 64, "sha256:" + " " * 64,
                "sha256:" + "a" * 63, "sha256:" + "sha256:" + "0" * 57, "sha256:" + " " * 64,
                "sha256:" + " " * 62 + "ab", "sha256:" + "é" * 64, 5, None):
        digests = [*good[:1200], bad, *good[1201:]]
        ok, blob = _sha256_column(digests)
        assert ok == [k != 1200 for k in range(1500)]
        assert blob[1200 * 32 : 1201 * 32] == bytes(32)
        assert blob[:1200 * 32] == _sha256_column(good)[1][:1200 * 32]
        assert blob[1201 * 32:] == _sha256_column(good)[1][1201 * 32:]
    # One at a time (chunk entries): strict hex too, never fewer than 32 bytes.
    assert _digest_bytes("sha256:" + " " * 62 + "ab") is None
    assert _digest_bytes(good[3]) == bytes.fromhex(good[3][7:])
