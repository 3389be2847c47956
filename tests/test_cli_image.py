"""End to end: inspect, ls, cat and verify on every tag of the fixture layout,
against the -gzip ground truth (tarfile), run as a subprocess."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import struct
import tarfile

import anyio
import pytest
import zstandard
from fixture_truth import (
    ALL_TAGS,
    LAYOUT,
    blob_path,
    cli,
    compare_listing,
    config,
    layer_digests,
    manifest,
    merge,
    ref,
    truth_layers,
)

from core.image import open_image
from core.inspect import ImageTree

EXPECTED_FORMAT = {"esgz": "estargz", "64k": "estargz", "prefetch": "estargz",
                   "zstdchunked": "zstdchunked", "gzip": "gzip"}


def _toc_digest_from_blob(path: str, fmt: str) -> str:
    """The TOC digest computed independently of core: gzip/zstd by hand."""
    data = open(path, "rb").read()
    if fmt == "estargz":
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tf:
            toc = tf.extractfile("stargz.index.json").read()
    else:
        off, clen, _ulen, _t = struct.unpack_from("<QQQQ", data, len(data) - 40)
        toc = zstandard.ZstdDecompressor().decompressobj().decompress(data[off : off + clen])
    return "sha256:" + hashlib.sha256(toc).hexdigest()


@pytest.mark.parametrize("tag", ALL_TAGS)
def test_inspect_json_every_tag(tag):
    data = json.loads(cli("inspect", ref(tag), "--json").stdout)
    m = manifest(tag)
    diff_ids = config(tag)["rootfs"]["diff_ids"]
    assert data["manifestDigest"].startswith("sha256:")
    assert len(data["layers"]) == len(m["layers"])
    fmt = EXPECTED_FORMAT[tag.rsplit("-", 1)[1]]
    truth = truth_layers(tag)
    for i, (la, ld) in enumerate(zip(data["layers"], m["layers"], strict=True)):
        assert (la["digest"], la["mediaType"], la["size"]) == (ld["digest"], ld["mediaType"], ld["size"])
        assert la["format"] == fmt
        assert la["diffID"] == diff_ids[i]
        ann = (ld.get("annotations") or {}).get("containerd.io/snapshot/stargz/toc.digest")
        assert la["tocDigestAnnotated"] == ann
        if fmt == "gzip":
            assert la["tocDigest"] is None and la["tocDigestVerified"] is None
            continue
        assert la["tocDigest"] == _toc_digest_from_blob(blob_path(ld["digest"]), fmt)
        assert la["tocDigestVerified"] is True
        assert la["entries"] == len(truth[i])
        nonempty = sum(1 for r in truth[i].values() if r["type"] == "reg" and r["size"])
        assert la["chunks"] >= nonempty
        if tag.endswith("prefetch"):
            assert la["prefetchSize"] and la["prefetchSize"] > 0
    human = cli("inspect", ref(tag)).stdout.decode()
    assert m["layers"][0]["digest"] in human and "diffID" in human


@pytest.mark.parametrize("tag", ALL_TAGS)
def test_ls_raw_layers_match_ground_truth(tag):
    truth = truth_layers(tag)
    for i, layer in enumerate(truth):
        records = json.loads(cli("ls", ref(tag), "--layer", str(i), "-R", "--json").stdout)
        compare_listing(records, layer)
        assert all(r["layer"] == i for r in records)
    # Whiteouts are visible in the raw view of the upper layer.
    if tag.startswith("mini"):
        raw = json.loads(cli("ls", ref(tag), "--layer", "1", "-R", "--json").stdout)
        paths = {r["path"] for r in raw}
        assert {"usr/lib/app/.wh.remove-me.py", "data/old/.wh..wh..opq"} <= paths


@pytest.mark.parametrize("tag", ALL_TAGS)
def test_ls_merged_matches_ground_truth(tag):
    records = json.loads(cli("ls", ref(tag), "-R", "--json").stdout)
    want = merge(truth_layers(tag))
    compare_listing(records, want)
    assert not any(r["path"].rsplit("/", 1)[-1].startswith(".wh.") for r in records)
    if tag.startswith("mini"):
        paths = {r["path"] for r in records}
        assert "usr/lib/app/remove-me.py" not in paths
        assert "data/old/a.txt" not in paths and "data/old/c.txt" in paths
    # A directory listing (not recursive) shows the directory's children only.
    top = json.loads(cli("ls", ref(tag), "--json").stdout)
    assert sorted(r["path"] for r in top) == sorted(p for p in want if "/" not in p)


@pytest.mark.parametrize("tag", ALL_TAGS)
def test_cat_every_file_matches_ground_truth(tag):
    """Every regular file of the merged view and of each raw layer reads back
    byte for byte (core path), and `cat` as a subprocess for a selection."""
    truth = truth_layers(tag)
    merged = merge(truth)

    async def main():
        image = await open_image(ref(tag))
        tree = await ImageTree.open(image)
        for p, rec in merged.items():
            if rec["type"] in ("reg", "hardlink"):
                assert await tree.read(p) == rec["data"], p
        for i, layer in enumerate(truth):
            raw = await ImageTree.open(image, i)
            for p, rec in layer.items():
                if rec["type"] in ("reg", "hardlink"):
                    assert await raw.read(p) == rec["data"], (i, p)

    anyio.run(main)
    if tag.startswith("mini"):
        picks = {"data/random.bin": merged["data/random.bin"]["data"],
                 "data/hardlink.bin": merged["data/random.bin"]["data"],
                 "data/link-to-os-release": merged["etc/os-release"]["data"],
                 "data/old/c.txt": merged["data/old/c.txt"]["data"]}
    else:
        picks = {"sparse-ish.bin": merged["sparse-ish.bin"]["data"],
                 "links/h2": merged["links/target"]["data"],
                 "links/dir/café-日本語.txt": merged["unicode/café-日本語.txt"]["data"],
                 "/unicode/spaces and 'quotes'.txt": merged["unicode/spaces and 'quotes'.txt"]["data"]}
    for p, want in picks.items():
        assert cli("cat", ref(tag), p).stdout == want, p
    if tag.startswith("mini"):
        # The whited-out file is gone from the merged view but in layer 0.
        gone = cli("cat", ref(tag), "usr/lib/app/remove-me.py", check=False)
        assert gone.returncode == 1 and b"no such file" in gone.stderr
        raw = cli("cat", ref(tag), "--layer", "0", "usr/lib/app/remove-me.py")
        assert raw.stdout == truth[0]["usr/lib/app/remove-me.py"]["data"]


@pytest.mark.parametrize("tag", ALL_TAGS)
def test_verify_full_every_tag(tag):
    p = cli("verify", ref(tag), "--full")
    out = p.stdout.decode()
    assert "all checks hold" in out and p.stderr == b""
    for d in config(tag)["rootfs"]["diff_ids"]:
        assert d in out
    assert "chain-id" in out
    data = json.loads(cli("verify", ref(tag), "--json").stdout)
    assert data["ok"] is True


def test_ls_long_shows_special_bits_devices_and_links():
    out = cli("ls", ref("special-esgz"), "-lR").stdout.decode()
    lines = {line.split()[-1] if "->" not in line and "link to" not in line else line: line
             for line in out.splitlines()}
    assert any(line.startswith("-rwsr-xr-x") and line.endswith("bin/suid-tool") for line in lines.values())
    assert any(line.startswith("-rwxr-sr-x") and line.endswith("bin/sgid-tool") for line in lines.values())
    assert any(line.startswith("crw-rw-rw-") and "1, 3" in line for line in lines.values())
    assert any(line.startswith("prw") and line.endswith("dev/fifo") for line in lines.values())
    assert any("links/abs -> /etc/passwd" in line for line in lines.values())
    plain = cli("ls", ref("special-esgz"), "links").stdout.decode().split()
    assert plain == ["abs", "dangling", "dir", "h1", "h2", "target"]


def test_symlinks_resolve_inside_the_image():
    # links/abs points at /etc/passwd, which this image does not have: the
    # host's /etc/passwd must never be read.
    p = cli("cat", ref("special-esgz"), "links/abs", check=False)
    assert p.returncode == 1 and p.stdout == b"" and b"no such file" in p.stderr
    p = cli("cat", ref("special-esgz"), "links/dangling", check=False)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1
    # ../ past the root stays at the root, as in a container.
    want = merge(truth_layers("mini-esgz"))["etc/os-release"]["data"]
    assert cli("cat", ref("mini-esgz"), "../../data/../etc/os-release").stdout == want


@pytest.mark.parametrize("cmd", ["inspect", "ls", "cat", "verify", "convert"])
def test_help_has_examples(cmd):
    out = cli(cmd, "--help").stdout.decode()
    assert "examples:" in out and "stargz-tui " + cmd in out


def _one_line_error(*args):
    p = cli(*args, check=False)
    err = p.stderr.decode()
    assert p.returncode != 0, args
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("stargz-tui"), err
    return err


def test_errors_are_one_line(tmp_path):
    assert "not found" in _one_line_error("inspect", ref("no-such-tag"))
    assert "index.json" in _one_line_error("ls", f"oci:{tmp_path}/nothing:x")
    _one_line_error("inspect", "Bad Reference!!")
    _one_line_error("ls", ref("mini-esgz"), "--layer", "9")
    _one_line_error("ls", ref("mini-esgz"), "--layer", "sha256:ffff")
    assert "no such file" in _one_line_error("cat", ref("mini-esgz"), "etc/nope")
    assert "directory" in _one_line_error("cat", ref("mini-esgz"), "etc")
    assert "not a regular file" in _one_line_error("cat", ref("special-esgz"), "dev/null")
    _one_line_error("verify", ref("mini-esgz"), "--layer", "5")
    _one_line_error("convert", ref("mini-gzip"), "oci:" + str(tmp_path) + "/o:x", "--chunk-size", "-1")


def _copy_layout(tmp_path) -> str:
    dst = tmp_path / "layout"
    shutil.copytree(LAYOUT, dst)
    return str(dst)


def test_unknown_format_is_one_line(tmp_path):
    layout = _copy_layout(tmp_path)
    digest = layer_digests("special-esgz", layout)[0]
    path = blob_path(digest, layout)
    junk = bytes(range(256)) * 40
    # Same digest file name, unrecognisable content: a corrupt / unknown blob.
    with open(path, "wb") as f:
        f.write(junk)
    err = _one_line_error("ls", ref("special-esgz", layout))
    assert "unrecognised" in err or "format" in err
    err = _one_line_error("cat", ref("special-esgz", layout), "xattr-file")
    p = cli("verify", ref("special-esgz", layout), "--full", check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr.decode()
