"""Shapes of real registries' images (issue 12, point 6), each pushed to the
loopback registry as-is (tests/shape_images.py) and read by inspect / ls /
cat / mount against the tar it was made from, or refused in one line."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import subprocess
import tarfile

import pytest
from fixture_truth import cli, compare_listing, merge, read_tar_layer
from fuse_helpers import compare_tree, isolated_mount_env, merged_expected
from registry_helpers import Registry
from shape_images import DOCKER_FOREIGN, DOCKER_MANIFEST, RawPusher, d, digest_of, f, tar_of

from core import mount as core_mount
from core.estargz.writer import build_estargz
from core.estargz.zstdwriter import build_zstdchunked

pytestmark = [pytest.mark.fuse, pytest.mark.registry]

CAP = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0).decode("ascii")
BASE = tar_of(d("etc"), f("etc/hostname", b"base\n"), f("etc/common.txt", b"layer 0\n"))
EMPTY = tar_of()
NAMES = tar_of(
    d("n"),
    f("n/" + "long-directory-name-" * 8 + "/", type=tarfile.DIRTYPE),
    f("n/" + "long-directory-name-" * 8 + "/" + "f" * 150 + ".txt", b"a long path\n"),
    f("n/long-link", type=tarfile.SYMTYPE, linkname="/" + "t" * 300),
    f("n/caps", b"#!/bin/true\n", mode=0o755, pax_headers={
        "SCHILY.xattr.security.capability": CAP, "SCHILY.xattr.user.origin": "registry",
        "SCHILY.xattr.trusted.note": "x"}),
    f("n/unicodé ✓.txt", b"utf-8 name\n"),
)
NOT_UTF8 = tar_of(d("b"), f("b/n\udcff\udcfe.bin", b"latin-1 name\n"))
DEEP0 = tar_of(d("a"), d("a/b"), d("a/b/c"), d("a/b/c/d"), f("a/b/c/d/old.txt", b"old\n"),
               f("a/b/keep.txt", b"keep\n"), f("base.bin", b"B" * 5000))
DEEP1 = tar_of(d("a"), d("a/b"), d("a/b/c"), f("a/b/c/.wh..wh..opq"),
               f("a/b/c/new.txt", b"new\n"))
LATE = tar_of(f("late.txt", b"3\n"))
HARDLINK_BELOW = tar_of(f("hl.bin", type=tarfile.LNKTYPE, linkname="base.bin"))


def esgz(tar: bytes) -> dict:
    out = io.BytesIO()
    res = build_estargz(io.BytesIO(tar), out, chunk_size=64 << 10)
    return {"tar": tar, "blob": out.getvalue(), "diff_id": res.diff_id,
            "annotations": res.annotations()}


def zstdchunked(tar: bytes) -> dict:
    out = io.BytesIO()
    res = build_zstdchunked(io.BytesIO(tar), out, chunk_size=64 << 10)
    return {"tar": tar, "blob": out.getvalue(), "diff_id": res.diff_id,
            "annotations": res.annotations,
            "media_type": "application/vnd.oci.image.layer.v1.tar+zstd"}


def sparse_tars(tmp) -> tuple[bytes, bytes, bytes]:
    """GNU and PAX sparse tars of a 1 MiB file with 5 bytes of data (GNU tar)."""
    src = tmp / "sparse-src"
    (src / "s").mkdir(parents=True)
    data = bytearray(1 << 20)
    data[500000:500005] = b"hello"
    path = src / "s" / "sparse.img"
    with open(path, "wb") as fh:
        fh.truncate(1 << 20)
        fh.seek(500000)
        fh.write(b"hello")
    out = []
    for fmt in ("gnu", "pax"):
        t = tmp / f"sparse-{fmt}.tar"
        subprocess.run(["tar", "--sparse", f"--format={fmt}", "--mtime=@1700000000",
                        "-C", str(src), "-cf", str(t), "s"], check=True)
        out.append(t.read_bytes())
    return out[0], out[1], bytes(data)


class ForeignURLRegistry(Registry):
    """docker-registry accepting foreign layers' URLs, as Docker Hub does for
    Windows base layers (its default refuses every URL)."""

    def _config(self) -> str:
        return super()._config() + (
            "validation:\n  manifests:\n    urls:\n      allow:\n        - ^https?://\n")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes")
    reg = ForeignURLRegistry(str(tmp / "registry")).start()
    p = RawPusher(reg.url)
    try:
        arm = tar_of(d("etc"), f("etc/hostname", b"arm64\n"))
        amd = p.image("docker/app", "v2", [{"tar": BASE}], docker=True)
        arm_m = p.image("docker/app", "arm64", [{"tar": arm}], docker=True, arch="arm64")
        p.index("docker/app", "list", [(amd, {"os": "linux", "architecture": "amd64"}, {}),
                                       (arm_m, {"os": "linux", "architecture": "arm64"}, {})],
                docker=True)
        # buildx's shape: the image and its attestation manifest (unknown/unknown)
        img = p.image("attest/app", "img", [{"tar": BASE}])
        statement = json.dumps({"_type": "https://in-toto.io/Statement/v0.1"}).encode()
        att = p.image("attest/app", "att", [{"tar": statement, "blob": statement,
                                             "media_type": "application/vnd.in-toto+json",
                                             "diff_id": digest_of(statement)}])
        p.index("attest/app", "idx", [
            (img, {"os": "linux", "architecture": "amd64"}, {}),
            (att, {"os": "unknown", "architecture": "unknown"},
             {"vnd.docker.reference.type": "attestation-manifest",
              "vnd.docker.reference.digest": img[0]})])
        p.image("empty/app", "esgz", [esgz(BASE), esgz(EMPTY), esgz(LATE)])
        p.image("many/app", "esgz", [esgz(tar_of(f(f"layer-{i:02d}.txt", b"%d\n" % i),
                                                 f("common.txt", b"from %d\n" % i)))
                                     for i in range(22)])
        foreign_blob = gzip.compress(BASE, mtime=0)
        p.image("foreign/app", "v1", [
            {"descriptor": {"mediaType": DOCKER_FOREIGN, "digest": digest_of(foreign_blob),
                            "size": len(foreign_blob),
                            "urls": ["https://example.invalid/base-layer.tar.gz"]},
             "diff_id": digest_of(BASE)},
            {"tar": DEEP0}], docker=True)
        p.image("names/app", "esgz", [esgz(NAMES)])
        p.image("names/app", "zc", [zstdchunked(NAMES)])
        p.image("names/app", "gzip", [{"tar": NOT_UTF8}])
        p.image("deep/app", "gzip", [{"tar": DEEP0}, {"tar": DEEP1}, {"tar": HARDLINK_BELOW}])
        p.image("deep/app", "esgz", [esgz(DEEP0), esgz(DEEP1)])
        p.image("deep/app", "esgz-hl", [esgz(DEEP0), esgz(DEEP1), esgz(HARDLINK_BELOW)])
        gnu, pax, data = sparse_tars(tmp)
        p.image("sparse/app", "gnu", [{"tar": gnu}])
        p.image("sparse/app", "pax", [{"tar": pax}])
        reg.sparse_data = data
        reg.tmp = tmp
        yield reg
    finally:
        p.close()
        reg.stop()


@pytest.fixture
def mount_env(tmp_path, monkeypatch, isolated_env):
    yield from isolated_mount_env(tmp_path, monkeypatch)


def _ls(ref: str, *extra: str) -> list[dict]:
    # names that are not UTF-8 come out as their bytes
    return json.loads(cli("ls", ref, "-R", "--json", *extra).stdout.decode(
        "utf-8", "surrogateescape"))


def _truth(tmp, *tars: bytes) -> list[dict]:
    out = []
    for k, t in enumerate(tars):
        path = tmp / f"t{k}.tar"
        path.write_bytes(t)
        out.append(read_tar_layer(str(path)))
    return out


def _paths(tmp, *tars: bytes) -> list:
    out = []
    for k, t in enumerate(tars):
        path = tmp / f"p{k}.tar"
        path.write_bytes(t)
        out.append(path)
    return out


def test_docker_media_types_and_manifest_list(shapes, tmp_path):
    ref = f"{shapes.host}/docker/app:list"
    info = json.loads(cli("inspect", ref, "--json", "--platform", "linux/amd64").stdout)
    assert info["manifestMediaType"] == DOCKER_MANIFEST
    assert info["platforms"] == ["linux/amd64", "linux/arm64"]
    assert info["layers"][0]["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert info["layers"][0]["format"] == "gzip"
    compare_listing(_ls(ref, "--platform", "linux/amd64"), merge(_truth(tmp_path, BASE)))
    arm = cli("cat", ref, "--platform", "linux/arm64", "etc/hostname").stdout
    assert arm == b"arm64\n"


def test_attestation_manifests_are_skipped(shapes):
    ref = f"{shapes.host}/attest/app:idx"
    info = json.loads(cli("inspect", ref, "--json").stdout)  # no --platform: the one image
    assert info["platform"] == "linux/amd64"
    assert info["layers"][0]["format"] == "gzip"
    r = cli("inspect", ref, "--platform", "unknown/unknown", check=False)
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_empty_layer_and_22_layers_mount(mount_env, shapes, tmp_path):
    late = LATE
    ref = f"{shapes.host}/empty/app:esgz"
    compare_listing(_ls(ref), merge(_truth(tmp_path, BASE, EMPTY, late)))
    assert _ls(ref, "--layer", "1") == []
    mp = mount_env.mountpoint("empty")
    mount_env.mount(ref, mp)
    compare_tree(mp, merged_expected(_paths(tmp_path, BASE, EMPTY, late)),
                 drop_xattr_prefixes=("trusted.overlay.",))
    core_mount.unmount(mp)
    ref = f"{shapes.host}/many/app:esgz"
    mp = mount_env.mountpoint("many")
    rec = mount_env.mount(ref, mp)
    assert len(rec["layers"]) == 22
    with open(os.path.join(mp, "common.txt"), "rb") as fh:
        assert fh.read() == b"from 21\n"
    assert sorted(n for n in os.listdir(mp) if n.startswith("layer-")) == \
        [f"layer-{i:02d}.txt" for i in range(22)]
    core_mount.unmount(mp)


def test_foreign_layer_shown_not_fetched_not_mounted(mount_env, shapes):
    ref = f"{shapes.host}/foreign/app:v1"
    r = cli("inspect", ref, "--json")
    la = json.loads(r.stdout)["layers"]
    assert la[0]["foreign"] is True and la[0]["urls"] and la[0]["error"] is None
    assert la[1]["foreign"] is False and la[1]["format"] == "gzip"
    for args in (("ls", ref), ("verify", ref, "--full")):
        r = cli(*args, check=False)
        if args[0] == "ls":
            assert r.returncode != 0
            assert r.stderr.decode().strip().count("\n") == 0
            assert "non-distributable (foreign)" in r.stderr.decode()
        else:
            assert r.returncode == 0, r.stderr  # skipped, not failed
    mp = mount_env.mountpoint()
    r = mount_env.cli("mount", ref, mp)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "foreign" in lines[0] and "not mounted" in lines[0], r.stderr
    assert not os.path.ismount(mp)


@pytest.mark.parametrize("tag", ["esgz", "zc"])
def test_long_names_link_targets_and_xattrs(mount_env, shapes, tmp_path, tag):
    ref = f"{shapes.host}/names/app:{tag}"
    compare_listing(_ls(ref, "--layer", "0"), _truth(tmp_path, NAMES)[0])
    mp = mount_env.mountpoint()
    mount_env.mount(ref, mp, layer=0)
    # trusted.* is root's namespace on a FUSE mount too; the rest match the tar
    compare_tree(mp, merged_expected(_paths(tmp_path, NAMES)))
    assert os.getxattr(os.path.join(mp, "n/caps"), "security.capability") == CAP.encode()
    core_mount.unmount(mp)


def test_non_utf8_names(shapes, tmp_path):
    ref = f"{shapes.host}/names/app:gzip"
    name = "b/n\udcff\udcfe.bin"
    assert name in {r["path"] for r in _ls(ref)}
    assert cli("cat", ref, name).stdout == b"latin-1 name\n"
    for fmt in ("estargz", "zstd:chunked"):
        r = cli("convert", ref, f"oci:{tmp_path}/out:x", "--format", fmt, check=False)
        assert r.returncode != 0
        lines = r.stderr.decode().strip().splitlines()
        assert len(lines) == 1 and "not UTF-8" in lines[0], r.stderr


def test_deep_opaque_whiteouts_and_hardlink_below(mount_env, shapes, tmp_path):
    deep = merge(_truth(tmp_path, DEEP0, DEEP1))
    assert "a/b/c/d/old.txt" not in deep and "a/b/keep.txt" in deep
    compare_listing(_ls(f"{shapes.host}/deep/app:esgz"), deep)
    mp = mount_env.mountpoint()
    mount_env.mount(f"{shapes.host}/deep/app:esgz", mp)
    compare_tree(mp, merged_expected(_paths(tmp_path, DEEP0, DEEP1)),
                 drop_xattr_prefixes=("trusted.overlay.",))
    core_mount.unmount(mp)
    # a hardlink to a file of an earlier layer: the merged view is that file
    for tag in ("gzip", "esgz-hl"):
        ref = f"{shapes.host}/deep/app:{tag}"
        recs = {r["path"]: r for r in _ls(ref)}
        assert recs["hl.bin"]["type"] == "hardlink" and recs["hl.bin"]["size"] == 5000
        assert cli("cat", ref, "hl.bin").stdout == b"B" * 5000
        raw = {r["path"]: r for r in _ls(ref, "--layer", "2")}
        assert raw["hl.bin"]["linkTarget"] == "base.bin"
    mp = mount_env.mountpoint("hl")
    r = mount_env.cli("mount", f"{shapes.host}/deep/app:esgz-hl", mp)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "earlier layer" in lines[0], r.stderr


@pytest.mark.parametrize("kind", ["gnu", "pax"])
def test_sparse_files(shapes, tmp_path, kind):
    ref = f"{shapes.host}/sparse/app:{kind}"
    recs = {r["path"]: r for r in _ls(ref)}
    rec = recs["s/sparse.img"]
    assert rec["type"] == "reg" and rec["size"] == 1 << 20
    assert rec["digest"] == "sha256:" + hashlib.sha256(shapes.sparse_data).hexdigest()
    assert cli("cat", ref, "s/sparse.img").stdout == shapes.sparse_data
    r = cli("convert", ref, f"oci:{tmp_path}/out:x", check=False)
    assert r.returncode != 0
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "sparse" in lines[0], r.stderr
