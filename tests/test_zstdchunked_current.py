"""containers/storage's current zstd:chunked generation (podman 5, buildah
1.3x), as tests/zstdchunked_writer.py writes it from containers/storage's
source: the fixture layers and a layer with holes, pushed to the loopback
registry, read by ls / cat / inspect / verify and mounted, against the plain
tar they were written from."""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import tarfile
from pathlib import Path

import pytest
import zstandard
from fixture_truth import (
    blob_path,
    cli,
    compare_listing,
    layer_digests,
    merge,
    read_tar_layer,
)
from fuse_helpers import (
    compare_tree,
    isolated_mount_env,
    merged_expected,
    push_layout,
    raw_expected,
)
from layout_writer import Layer, write_layout
from registry_helpers import Registry
from zstdchunked_writer import PREFIX, write_zstdchunked

from core import mount as core_mount
from core.estargz.footer import Format, parse_footer

pytestmark = [pytest.mark.fuse, pytest.mark.registry]

HOLE = 256 << 10
MIXED = b"head" * 300 + bytes(HOLE) + b"tail" * 300 + bytes(2000) + b"end"
# A file ending in a hole: nothing after the hole in the file to fetch with it.
TAIL_HOLE = os.urandom(3000) + bytes(HOLE)


def holes_tar() -> bytes:
    """A layer with holes, xattrs, a PAX long name and a hardlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(name, data=b"", **kw):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = kw.pop("mode", 0o644)
            ti.mtime = 1700000000
            for k, v in kw.items():
                setattr(ti, k, v)
            tf.addfile(ti, io.BytesIO(data) if data else None)
        add("holes", type=tarfile.DIRTYPE, mode=0o755)
        add("holes/mixed.bin", MIXED)
        add("holes/tail-hole.bin", TAIL_HOLE)
        add("holes/cap", b"#!/bin/true\n", mode=0o755, pax_headers={
            # VFS_CAP_REVISION_2, effective, CAP_NET_BIND_SERVICE permitted
            "SCHILY.xattr.security.capability":
                struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0).decode("ascii"),
            "SCHILY.xattr.user.note": "zstd:chunked"})
        add("holes/" + "long-name-" * 15 + ".txt", b"a long name\n")
        add("holes/mixed-link.bin", type=tarfile.LNKTYPE, linkname="holes/mixed.bin")
    return buf.getvalue()


def fixture_tars(fam: str) -> list[bytes]:
    return [gzip.decompress(Path(blob_path(d)).read_bytes())
            for d in layer_digests(f"{fam}-gzip")]


IMAGES = {"mini": lambda: fixture_tars("mini"), "special": lambda: fixture_tars("special"),
          "holes": lambda: [holes_tar()]}


@pytest.fixture(scope="module")
def current(tmp_path_factory):
    """Registry ``zc2/FAM:current`` images; ``.tars[fam]`` are the tar paths
    (ground truth), ``.written[fam]`` the writer's output per layer."""
    root = tmp_path_factory.mktemp("zc2")
    reg = Registry(str(root / "registry")).start()
    reg.tars, reg.written = {}, {}
    try:
        for fam, make in IMAGES.items():
            tars = make()
            written = [write_zstdchunked(t, chunk_size=64 << 10) for t in tars]
            paths = []
            for i, t in enumerate(tars):
                p = root / f"{fam}-{i}.tar"
                p.write_bytes(t)
                paths.append(p)
            layout = str(root / "layout")
            write_layout(layout, fam, [Layer(w.blob, w.diff_id, annotations=w.annotations)
                                       for w in written])
            push_layout(layout, fam, f"{reg.host}/zc2/{fam}:current")
            reg.tars[fam], reg.written[fam] = paths, written
        reg.layout = layout
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def mount_env(tmp_path, monkeypatch, isolated_env):
    yield from isolated_mount_env(tmp_path, monkeypatch)


def test_writer_output_is_the_current_generation(current):
    for written in current.written.values():
        for w in written:
            # the whole blob decompresses to the original tar (diffIDs hold)
            tar = zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(w.blob), read_across_frames=True).read()
            assert "sha256:" + __import__("hashlib").sha256(tar).hexdigest() == w.diff_id
            f = parse_footer(w.blob[-72:], len(w.blob))
            assert f.format == Format.ZSTDCHUNKED and f.footer_size == 72
            assert f.tar_split is not None
            pos = w.annotations[PREFIX + "tarsplit-position"].split(":")
            assert (f.tar_split.offset, f.tar_split.size) == (int(pos[0]), int(pos[1]))
    assert current.written["holes"][0].holes, "the holes layer has zeros chunks"


@pytest.mark.parametrize("fam", list(IMAGES))
def test_ls_cat_match_the_tar(mount_env, current, fam):
    ref = f"{current.host}/zc2/{fam}:current"
    truths = [read_tar_layer(str(p)) for p in current.tars[fam]]
    for i, truth in enumerate(truths):
        r = mount_env.cli("ls", ref, "--layer", str(i), "-R", "--json", check=True)
        compare_listing(json.loads(r.stdout), truth)
        # cat: the largest files (multi-chunk, holes), byte for byte
        regs = sorted((r for r in truth.values() if r["type"] == "reg"), key=lambda r: -r["size"])
        for rec in regs[:3]:
            got = cli("cat", ref, "--layer", str(i), rec["path"])
            assert got.stdout == rec["data"], rec["path"]
    r = mount_env.cli("ls", ref, "-R", "--json", check=True)
    compare_listing(json.loads(r.stdout), {p: t for p, t in merge(truths).items()
                                           if not p.rsplit("/", 1)[-1].startswith(".wh.")})


@pytest.mark.parametrize("fam", list(IMAGES))
def test_mounts_match_the_tar(mount_env, current, fam):
    ref = f"{current.host}/zc2/{fam}:current"
    paths = current.tars[fam]
    for i, p in enumerate(paths):
        mp = mount_env.mountpoint(f"l{i}")
        mount_env.mount(ref, mp, layer=i)  # anchored by the manifest checksum
        compare_tree(mp, raw_expected(p))
        core_mount.unmount(mp)
    mp = mount_env.mountpoint("merged")
    mount_env.mount(ref, mp)
    compare_tree(mp, merged_expected(paths), drop_xattr_prefixes=("trusted.overlay.",))
    core_mount.unmount(mp)


def test_inspect_and_verify_full(mount_env, current):
    ref = f"{current.host}/zc2/holes:current"
    la = json.loads(mount_env.cli("inspect", ref, "--json", check=True).stdout)["layers"][0]
    assert la["format"] == "zstdchunked"
    assert la["tocDigestAnchor"] == PREFIX + "manifest-checksum"
    assert la["tocDigestVerified"] is True
    r = mount_env.cli("verify", ref, "--full", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["tar-split"]["ok"] and "diffID" in checks["tar-split"]["message"]
    assert checks["diff-id"]["ok"] and checks["files"]["ok"]


def test_verify_full_refuses_a_tampered_tar_split(mount_env, current, tmp_path):
    w = current.written["holes"][0]
    ts = parse_footer(w.blob[-72:], len(w.blob)).tar_split
    blob = bytearray(w.blob)
    blob[ts.offset + ts.size // 2] ^= 0x01
    layout = str(tmp_path / "layout")
    write_layout(layout, "bad", [Layer(bytes(blob), w.diff_id, annotations=w.annotations)])
    push_layout(layout, "bad", f"{current.host}/zc2/holes:bad-split")
    r = mount_env.cli("verify", f"{current.host}/zc2/holes:bad-split", "--full", "--json")
    assert r.returncode == 1
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert not checks["tar-split"]["ok"]
    assert "tar-split digest mismatch" in checks["tar-split"]["message"]
    # the rest of the layer still verifies (the tar-split is outside every file)
    assert checks["files"]["ok"] and checks["diff-id"]["ok"]


def test_holes_read_as_zeros_without_a_range_request(mount_env, current, front_proxy):
    proxy = front_proxy(current)
    ref = f"{proxy.host}/zc2/holes:current"
    w = current.written["holes"][0]
    # the compressed extent of tail-hole.bin's zeros chunk, from the writer's TOC
    entries = w.toc["entries"]
    k = next(k for k, e in enumerate(entries)
             if e["name"] == "holes/tail-hole.bin" and e.get("chunkType") == "zeros")
    first = next(e for e in entries if e["name"] == "holes/tail-hole.bin")
    holes = [(entries[k]["offset"], first["endOffset"])]
    mp = mount_env.mountpoint()
    mount_env.mount(ref, mp, layer=0, prefetch=False, background_fetch=False)
    proxy.requests.clear()
    with open(os.path.join(mp, "holes/tail-hole.bin"), "rb") as f:
        assert f.read() == TAIL_HOLE
    ranges = []
    for _method, _path, headers in proxy.requests:
        rng = {k.lower(): v for k, v in headers.items()}.get("range")
        if rng:
            lo, _, hi = rng.split("=", 1)[1].partition("-")
            ranges.append((int(lo), int(hi)))
    assert ranges, "the data chunks were fetched through the proxy"
    for lo, hi in ranges:
        for h_lo, h_hi in holes:
            assert hi < h_lo or lo >= h_hi, f"range {lo}-{hi} covers a hole at {h_lo}-{h_hi}"
    core_mount.unmount(mp)


def test_found_by_annotations_without_a_footer(mount_env, current, tmp_path):
    """containers/storage locates the TOC by the position annotations, not
    the footer: a blob without the footer frame still reads and mounts."""
    w = current.written["holes"][0]
    blob = w.blob[:-72]
    layout = str(tmp_path / "layout")
    write_layout(layout, "nofooter", [Layer(blob, w.diff_id, annotations=w.annotations)])
    push_layout(layout, "nofooter", f"{current.host}/zc2/holes:nofooter")
    ref = f"{current.host}/zc2/holes:nofooter"
    la = json.loads(mount_env.cli("inspect", ref, "--json", check=True).stdout)["layers"][0]
    assert la["format"] == "zstdchunked" and la["tocDigestVerified"] is True
    r = mount_env.cli("verify", ref, "--full", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    mp = mount_env.mountpoint()
    mount_env.mount(ref, mp, layer=0)
    compare_tree(mp, raw_expected(current.tars["holes"][0]))
    core_mount.unmount(mp)
