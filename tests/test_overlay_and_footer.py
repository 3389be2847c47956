"""Footer recognition and the merged (overlay) view, on hand-built TOCs."""

import json
import struct

import pytest

from core.errors import FormatError
from core.estargz.footer import Format, estargz_footer, parse_footer
from core.estargz.toc import build_index
from core.overlay import MergedTree, layer_status


def _index(entries):
    return build_index(json.dumps({"version": 1, "entries": entries}).encode(),
                       format=Format.ESTARGZ, blob_digest="sha256:" + "0" * 64,
                       blob_size=1 << 20, toc_digest="sha256:" + "1" * 64, toc_offset=1 << 19)


def test_estargz_footer_round_trip_and_bounds():
    f = estargz_footer(12345)
    assert len(f) == 51
    footer = parse_footer(b"x" * 13 + f, 100_000)
    assert (footer.format, footer.toc_offset, footer.footer_size) == (Format.ESTARGZ, 12345, 51)
    with pytest.raises(FormatError):
        parse_footer(f, 1000)  # TOC offset beyond the blob


def test_legacy_stargz_and_zstd_chunked_footers():
    payload = b"%016xSTARGZ" % 777
    legacy = b"\x1f\x8b\x08\x04\0\0\0\0\0\xff" + struct.pack("<H", 22) + payload + b"\x01\0\0\xff\xff" + b"\0" * 8
    assert len(legacy) == 47
    f = parse_footer(legacy, 10_000)
    assert (f.format, f.toc_offset) == (Format.STARGZ, 777)
    zf = struct.pack("<II", 0x184D2A50, 40) + struct.pack("<QQQQ", 900, 50, 400, 1) + b"GnUlInUx"
    f = parse_footer(zf, 2000)
    assert (f.format, f.toc_offset, f.toc_size, f.toc_uncompressed_size) == (Format.ZSTDCHUNKED, 900, 50, 400)


def test_plain_formats_from_the_head():
    tail = b"\0" * 64
    assert parse_footer(tail, 5000, b"\x1f\x8b\x08\0" + b"\0" * 20).format == Format.GZIP
    assert parse_footer(tail, 5000, b"\x28\xb5\x2f\xfd" + b"\0" * 20).format == Format.ZSTD
    head = bytearray(512)
    head[257:262] = b"ustar"
    assert parse_footer(tail, 5000, bytes(head)).format == Format.TAR
    with pytest.raises(FormatError):
        parse_footer(tail, 5000, b"garbage" * 10)


def _d(name):
    return {"name": name, "type": "dir", "mode": 0o755}


def _f(name, size=0):
    return {"name": name, "type": "reg", "size": size, "mode": 0o644}


def test_merged_view_applies_whiteouts_opaque_dirs_and_shadowing():
    lower = _index([_d("a/"), _f("a/x"), _f("a/y"), _d("b/"), _f("b/old"), _d("c/"), _f("c/inner"),
                    _f("keep")])
    upper = _index([_d("a/"), _f("a/.wh.x"), _f("a/z"), _d("b/"), _f("b/.wh..wh..opq"), _f("b/new"),
                    _f("c")])
    t = MergedTree([lower, upper])
    assert [n for n, _, _ in t.children("a")] == ["y", "z"]
    assert [n for n, _, _ in t.children("b")] == ["new"]
    assert t.lookup("a/x") is None and t.lookup("b/old") is None
    # A file in the upper layer hides the lower directory and all under it.
    layer_no, entry = t.lookup("c")
    assert layer_no == 1 and entry.type == "reg"
    assert t.lookup("c/inner") is None
    assert t.lookup("keep")[0] == 0
    assert sorted(p for p, _, _ in t.walk()) == ["a", "a/y", "a/z", "b", "b/new", "c", "keep"]
    status = layer_status([lower, upper], 1)
    assert status["a/x"] == "removed" and status["a/z"] == "added" and status["c"] == "modified"


def test_whiteout_does_not_hide_its_own_layer():
    lower = _index([_f("f")])
    upper = _index([_f(".wh.f"), _f("f", 3)])
    layer_no, entry = MergedTree([lower, upper]).lookup("f")
    assert layer_no == 1 and entry.size == 3


@pytest.mark.parametrize("bad", [
    [{"name": "../etc/passwd", "type": "reg"}],
    [{"name": "a\x00b", "type": "reg"}],
    [{"name": "x", "type": "bogus"}],
    [{"name": "f", "type": "reg", "size": 10, "offset": 5, "chunkSize": 4}],
    [{"name": "f", "type": "reg", "size": -1}],
])
def test_hostile_tocs_are_refused(bad):
    with pytest.raises(FormatError):
        _index(bad)


def test_hardlink_to_an_entry_not_in_the_layer_is_kept_as_outside():
    """A hardlink whose target is not in its layer names an earlier layer's
    file (issue 12): kept, listed, and left for the merged view to resolve."""
    ix = _index([{"name": "l", "type": "hardlink", "linkName": "missing"}])
    (e,) = [x for x in ix.iter_entries() if x.id]
    assert e.type == "hardlink" and e.target_id is None and e.link_name == "missing"
    assert ix.outside_hardlinks == [e.id]
    assert any("not in this layer" in w for w in ix.warnings)


def test_index_entries_with_odd_platforms_are_handled():
    from core.errors import NotFoundError
    from core.image import pick_manifest

    amd = {"digest": "sha256:" + "a" * 64, "platform": {"os": "linux", "architecture": "amd64"}}
    arm = {"digest": "sha256:" + "b" * 64,
           "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}
    att = {"digest": "sha256:" + "c" * 64, "platform": {"os": "unknown", "architecture": "unknown"}}
    odd = {"digest": "sha256:" + "d" * 64, "platform": "linux/amd64"}
    index = {"manifests": [att, odd, arm, amd, "junk"]}
    assert pick_manifest(index, "linux/arm64")["digest"] == arm["digest"]
    assert pick_manifest(index, "linux/arm64/v8")["digest"] == arm["digest"]
    assert pick_manifest(index, "linux/amd64")["digest"] == amd["digest"]
    with pytest.raises(NotFoundError) as info:
        pick_manifest(index, "windows/amd64")
    assert "linux/arm64/v8" in str(info.value)
    with pytest.raises(NotFoundError):
        pick_manifest({"manifests": "nope"}, None)
