"""zstd:chunked images written by a real producer: Debian's podman 4.3
(containers/storage's older generation: ``io.containers.zstd-chunked.*``
annotations, 48-byte footer) pushes the fixture images to the loopback
registry; we inspect, verify and mount what it wrote and compare every file
with the source tar. The manifest-checksum annotation anchors the TOC, so the
mount needs no ``--allow-unverified``; a flipped byte in it refuses the mount.
"""

from __future__ import annotations

import json
import os

import pytest
from fuse_helpers import (
    compare_tree,
    isolated_mount_env,
    layer_blobs,
    merged_expected,
    raw_expected,
)
from podman_helpers import Podman, get_manifest, put_manifest
from registry_helpers import FIXTURE_LAYOUT, Registry

from core import mount as core_mount
from core.image import ZSTD_MANIFEST_CHECKSUM_ANNOTATION

pytestmark = [pytest.mark.fuse, pytest.mark.registry]

FAMILIES = ("mini", "special")


@pytest.fixture(scope="module")
def podman_registry(tmp_path_factory):
    """A private registry holding podman's zstd:chunked pushes of the
    ``mini`` and ``special`` fixture images (``podman/FAMILY:zc``)."""
    reg = Registry(str(tmp_path_factory.mktemp("podman-registry"))).start()
    pm = Podman(str(tmp_path_factory.mktemp("podman")))
    images = {}
    try:
        for fam in FAMILIES:
            image = pm.pull(f"oci:{FIXTURE_LAYOUT}:{fam}-gzip")
            pm.push(image, f"{reg.host}/podman/{fam}:zc")
            images[fam] = image
        reg.podman, reg.images = pm, images
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="module")
def plain_zstd_registry(podman_registry, tmp_path_factory):
    """podman's plain zstd pushes (``podman/FAMILY:zstd``), to a registry of
    their own: pushed beside the zstd:chunked ones, podman would reuse those
    blobs (they are zstd too) instead of compressing again."""
    reg = Registry(str(tmp_path_factory.mktemp("podman-zstd-registry"))).start()
    try:
        for fam, image in podman_registry.images.items():
            podman_registry.podman.push(image, f"{reg.host}/podman/{fam}:zstd", compression="zstd")
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def mount_env(tmp_path, monkeypatch, isolated_env):
    yield from isolated_mount_env(tmp_path, monkeypatch)


@pytest.mark.parametrize("fam", FAMILIES)
def test_podman_zstdchunked_mounts_verified_and_byte_exact(mount_env, podman_registry, fam):
    ref = f"{podman_registry.host}/podman/{fam}:zc"
    truth = layer_blobs(f"{fam}-gzip")
    for i, blob in enumerate(truth):
        mp = mount_env.mountpoint(f"l{i}")
        mount_env.mount(ref, mp, layer=i)  # no allow_unverified: the checksum anchors it
        compare_tree(mp, raw_expected(blob))
        core_mount.unmount(mp)
    mp = mount_env.mountpoint("merged")
    rec = mount_env.mount(ref, mp)
    assert len(rec["layers"]) == len(truth)
    compare_tree(mp, merged_expected(truth), drop_xattr_prefixes=("trusted.overlay.",))
    core_mount.unmount(mp)


def test_podman_zstdchunked_inspect_shows_the_anchor(mount_env, podman_registry):
    ref = f"{podman_registry.host}/podman/mini:zc"
    r = mount_env.cli("inspect", ref, "--json", check=True)
    layers = json.loads(r.stdout)["layers"]
    for la in layers:
        assert la["format"] == "zstdchunked"
        # podman 4.3 writes the older generation: no eStargz annotation
        assert "containerd.io/snapshot/stargz/toc.digest" not in la["annotations"]
        assert la["tocDigestAnchor"] == ZSTD_MANIFEST_CHECKSUM_ANNOTATION
        assert la["tocDigestAnnotated"] == la["annotations"][ZSTD_MANIFEST_CHECKSUM_ANNOTATION]
        assert la["manifestChecksum"] == la["tocDigestAnnotated"]
        assert la["tocDigestVerified"] is True
    text = mount_env.cli("inspect", ref, check=True).stdout
    assert "(not annotated)" not in text
    assert text.count("(verified)") == len(layers)
    assert f"anchored by:  {ZSTD_MANIFEST_CHECKSUM_ANNOTATION}" in text


def _flip(digest: str) -> str:
    last = digest[-1]
    return digest[:-1] + ("0" if last != "0" else "1")


def test_flipped_manifest_checksum_refuses_the_mount(mount_env, podman_registry):
    m = get_manifest(podman_registry.url, "podman/mini", "zc")
    ann = m["layers"][0]["annotations"]
    ann[ZSTD_MANIFEST_CHECKSUM_ANNOTATION] = _flip(ann[ZSTD_MANIFEST_CHECKSUM_ANNOTATION])
    put_manifest(podman_registry.url, "podman/mini", "zc-flipped", m)
    ref = f"{podman_registry.host}/podman/mini:zc-flipped"
    mp = mount_env.mountpoint()
    r = mount_env.cli("mount", ref, mp, "--layer", "0")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "manifest checksum mismatch" in lines[0], r.stderr
    assert not os.path.ismount(mp)
    # inspect reports the mismatch too (and exits 1)
    r = mount_env.cli("inspect", ref, "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["layers"][0]["tocDigestVerified"] is False


def test_verify_full_says_podman_rewrote_the_layer(mount_env, podman_registry):
    """podman 4.3 re-emits the tar, so the blob's diffID is not the config's:
    verify --full fails on it, in one line that says why and that the files
    verify (every chunk and file digest held)."""
    ref = f"{podman_registry.host}/podman/mini:zc"
    r = mount_env.cli("verify", ref, "--full", "--json")
    assert r.returncode == 1
    checks = json.loads(r.stdout)["checks"]
    diff = [c for c in checks if c["name"] == "diff-id"]
    assert diff and all(not c["ok"] for c in diff)
    for c in diff:
        assert "rewritten by its producer" in c["message"]
        assert "files themselves verify" in c["message"]
    assert all(c["ok"] for c in checks if c["name"] in ("chunks", "files", "manifest-checksum",
                                                         "blob-digest"))
    r = mount_env.cli("verify", ref, "--full")
    lines = [ln for ln in r.stderr.splitlines() if "diff-id" in ln]
    assert len(lines) == 2 and all("rewritten by its producer" in ln for ln in lines)


def test_tui_layer_view_shows_the_checksum_as_verified(podman_registry, isolated_env):
    """The app's layer table reads core.browse: a podman layer's TOC shows
    as verified, a flipped checksum as a mismatch (not as "absent")."""
    import anyio

    from core.browse import TOC_MISMATCH, TOC_VERIFIED, open_layer
    from core.image import open_image

    async def states(tag: str) -> list[str]:
        image = await open_image(f"{podman_registry.host}/podman/mini:{tag}")
        try:
            return [(await open_layer(image, d)).toc_state for d in image.layers]
        finally:
            await image.store.aclose()

    assert anyio.run(states, "zc") == [TOC_VERIFIED, TOC_VERIFIED]
    m = get_manifest(podman_registry.url, "podman/mini", "zc")
    ann = m["layers"][1]["annotations"]
    ann[ZSTD_MANIFEST_CHECKSUM_ANNOTATION] = _flip(ann[ZSTD_MANIFEST_CHECKSUM_ANNOTATION])
    put_manifest(podman_registry.url, "podman/mini", "zc-flipped-1", m)
    assert anyio.run(states, "zc-flipped-1") == [TOC_VERIFIED, TOC_MISMATCH]


@pytest.mark.parametrize("fam", FAMILIES)
def test_podman_plain_zstd_reads_and_verifies(mount_env, plain_zstd_registry, fam):
    """podman's plain zstd layers: shown as zstd, listed and read from the
    stream, every digest (diffIDs included) holds; a mount refuses them in one line."""
    from fixture_truth import cli, compare_listing, merge, read_tar_layer

    ref = f"{plain_zstd_registry.host}/podman/{fam}:zstd"
    info = json.loads(cli("inspect", ref, "--json").stdout)
    assert {la["format"] for la in info["layers"]} == {"zstd"}
    truth = [read_tar_layer(str(p)) for p in layer_blobs(f"{fam}-gzip")]
    recs = json.loads(cli("ls", ref, "-R", "--json").stdout.decode("utf-8", "surrogateescape"))
    compare_listing(recs, {p: t for p, t in merge(truth).items()
                           if not p.rsplit("/", 1)[-1].startswith(".wh.")})
    r = cli("verify", ref, "--full", check=False)
    assert r.returncode == 0, r.stderr
    mp = mount_env.mountpoint()
    r = mount_env.cli("mount", ref, mp)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "plain zstd" in r.stderr
