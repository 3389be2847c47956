"""build_index's bulk tree (whole-list operations over the names) must build
exactly what the per-entry loop builds, or hand the TOC to the loop; and the
TOC digest is checked before anything built from a TOC is used or reported."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import DigestMismatchError, FormatError
from core.estargz import toc as toc_mod
from core.estargz.footer import Footer, Format
from core.estargz.loader import HASH_IN_THREAD, parse_toc_region
from core.estargz.toc import build_index

KW = dict(format=Format.ESTARGZ, blob_digest="sha256:" + "0" * 64, blob_size=1 << 30,
          toc_digest="sha256:" + "1" * 64, toc_offset=1 << 29)
H1, H2 = "sha256:" + "ab" * 32, "sha256:" + "cd" * 32


def _snapshot(ix) -> dict:
    out = {}
    for k, v in vars(ix).items():
        if isinstance(v, array):
            v = (v.typecode, v.tolist())
        elif isinstance(v, bytearray):
            v = bytes(v)
        out[k] = v
    return out


def _both(entries: list, **kw) -> tuple:
    """(bulk result, loop result, whether the bulk tree took the TOC): each
    result a column snapshot or the FormatError's message."""
    args = {**KW, **kw}
    doc = json.dumps({"version": 1, "entries": entries}).encode()
    out = []
    for bulk in (True, False):
        old = toc_mod._USE_BULK_TREE
        toc_mod._USE_BULK_TREE = bulk
        try:
            out.append(_snapshot(build_index(doc, **args)))
        except FormatError as e:
            out.append(str(e))
        finally:
            toc_mod._USE_BULK_TREE = old
    took = toc_mod._tree_bulk(json.loads(doc)["entries"], args["blob_size"]) is not None
    return out[0], out[1], took


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


def test_bulk_tree_takes_typical_tocs_and_matches_the_loop():
    bulk, loop, took = _both(TYPICAL)
    assert took
    assert isinstance(bulk, dict) and bulk == loop
    # And the result is what it should be.
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


@pytest.mark.parametrize("entries", [
    [_reg("a/b", off=0), _dir("a/")],  # a directory after what it holds
    [_reg("a/b/c", off=0)],  # implicit directories
    [_reg("f", off=0), _reg("f", off=10)],  # a duplicate
    [_dir("d/"), _dir("d")],  # a duplicate directory
    [_dir("./"), _dir("/")],  # two root entries
    [_reg("x", off=0), {"name": "x//", "type": "dir"}],  # file then directory
    [{"name": "f", "type": "chunk", "offset": 5}, _reg("f", off=0)],  # chunk first
    [_reg("a", off=0), _reg("a/b", off=10)],  # a file used as a directory
    [{"name": "", "type": "reg"}],  # a root that is not a directory
    [{"name": "x\x00y", "type": "reg"}],
    [{"name": "x", "type": ["reg"]}],  # an unhashable type
    [{"name": "x", "type": "sock"}],
    [{"name": 5, "type": "reg"}],
    [{"name": ".prefetch.landmark", "type": "reg", "offset": True}],
    [{"name": ".prefetch.landmark", "type": "bogus", "offset": 3}],
    [_reg("a/" * 300 + "f", off=0)],
    [_reg("x" * 5000, off=0)],
    [_reg("../x", off=0)],
    [_reg("", off=0), _dir("./")],
    [],
])
def test_tocs_the_bulk_tree_hands_on_come_out_as_the_loop_builds_them(entries):
    bulk, loop, _ = _both(entries)
    assert bulk == loop


_NAMES = st.one_of(
    st.sampled_from(["a", "a/", "a/b", "a/b/", "./a/b/", "/a", "a/.b", ".a", "a//b", "", ".",
                     "./", "/", "..", "a/../b", "a\x00b", ".prefetch.landmark",
                     ".no.prefetch.landmark", "./.prefetch.landmark", "é/ü", "a/b/c"]),
    st.text(alphabet="ab/.\x00é", max_size=8))
_TYPES = st.sampled_from(["dir", "reg", "symlink", "hardlink", "char", "fifo", "chunk", "sock"])


@st.composite
def _entries(draw):
    e = {"name": draw(_NAMES), "type": draw(_TYPES)}
    for key, vals in (("size", st.integers(0, 50)), ("offset", st.integers(0, 200)),
                      ("chunkOffset", st.integers(0, 50)), ("chunkSize", st.integers(0, 50)),
                      ("mode", st.one_of(st.none(), st.integers(0, 0o177777))),
                      ("uid", st.integers(0, 5)), ("linkName", _NAMES),
                      ("digest", st.sampled_from([H1, H2, "x", None])),
                      ("chunkDigest", st.sampled_from([H1, H2, "x"]))):
        if draw(st.booleans()):
            e[key] = draw(vals)
    return e


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(entries=st.lists(_entries(), max_size=12), toc_offset=st.integers(0, 300))
def test_bulk_tree_matches_the_loop_on_random_tocs(entries, toc_offset):
    bulk, loop, _ = _both(entries, toc_offset=toc_offset, blob_size=400)
    assert bulk == loop


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
