"""Cache poisoning across images (issue 19, hole 3).

A chunk without a ``chunkDigest`` is verified by nothing but the image it
came from; a hostile image that claims a genuine layer's blob digest must
never get its bytes for such a chunk served to the genuine image through
the shared chunk cache. Real layouts, real FUSE mounts, one cache dir.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
from rel_layers import BlobBuilder, sha256, write_layout

from core import mount as core_mount

pytestmark = [pytest.mark.reliability, pytest.mark.fuse]

HERE = os.path.dirname(os.path.abspath(__file__))
GENUINE = b"genuine bytes of the file, served to the genuine image only\n" * 4
EVIL = b"EVIL".ljust(len(GENUINE), b"!")


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.dirname(HERE))
    from fuse_helpers import isolated_mount_env

    yield from isolated_mount_env(tmp_path, monkeypatch)


def _digestless_layer(data: bytes, extra: list[dict] | None = None) -> bytes:
    """A one-file layer whose TOC states no chunk or file digest."""
    b = BlobBuilder()
    ents = b.add_file("data/f", data)
    for e in ents:
        e.pop("chunkDigest", None)
        e.pop("digest", None)
    return b.finish({"version": 1, "entries": [{"name": "data/", "type": "dir"}, *ents,
                                               *(extra or [])]})


def _claiming(root: str, blob: bytes, claimed: bytes) -> str:
    """A layout whose layer says it is ``claimed``'s blob (digest and size)
    but whose file under that digest holds ``blob``."""
    ref = write_layout(root, [blob])
    want = sha256(claimed)
    blobs = os.path.join(root, "blobs", "sha256")
    os.replace(os.path.join(blobs, sha256(blob)[7:]), os.path.join(blobs, want[7:]))
    # re-point the manifest's layer at the claimed digest (the TOC annotation stays the
    # hostile blob's own: its TOC verifies)
    index = json.load(open(os.path.join(root, "index.json")))
    mpath = os.path.join(blobs, index["manifests"][0]["digest"][7:])
    manifest = json.load(open(mpath))
    manifest["layers"][0]["digest"] = want
    manifest["layers"][0]["size"] = len(blob)
    mbytes = json.dumps(manifest).encode()
    with open(os.path.join(blobs, sha256(mbytes)[7:]), "wb") as f:
        f.write(mbytes)
    index["manifests"][0]["digest"] = sha256(mbytes)
    index["manifests"][0]["size"] = len(mbytes)
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)
    return ref


def _read_through_mount(mount_env, ref: str, name: str) -> bytes:
    mp = mount_env.mountpoint(name)
    mount_env.mount(ref, mp, layer=0, prefetch=False, background_fetch=False)
    try:
        with open(os.path.join(mp, "data/f"), "rb") as f:
            return f.read()
    finally:
        core_mount.unmount(mp, force=True)


@pytest.mark.parametrize("variant", ["other-toc", "same-toc"])
def test_digestless_chunks_not_shared_across_images(variant, mount_env, tmp_path, rel):
    genuine = _digestless_layer(GENUINE)
    if variant == "other-toc":
        hostile = _digestless_layer(EVIL, [{"name": "data/x", "type": "reg", "size": 0}])
    else:  # no digest in it: the TOC of a same-sized file is byte for byte the genuine one
        hostile = _digestless_layer(EVIL)
    good_ref = write_layout(str(tmp_path / "genuine"), [genuine])
    bad_ref = _claiming(str(tmp_path / "hostile"), hostile, genuine)
    # the hostile image is read first, filling the shared cache dir
    assert _read_through_mount(mount_env, bad_ref, "mnt-hostile") == EVIL
    got = _read_through_mount(mount_env, good_ref, "mnt-genuine")
    assert got == GENUINE, f"the genuine image served the hostile image's bytes: {got[:16]!r}"
    what = ("a different TOC" if variant == "other-toc"
            else "the genuine TOC byte for byte (no digests in it)")
    rel.row("security", f"hostile layout claims a genuine layer's blob digest with {what} and "
            "other bytes in its digest-less chunk; mounted and read first, then the genuine "
            "image with the same cache dir",
            "the genuine image reads its own bytes: digest-less chunks are cached per TOC "
            "digest and source, never found by another image")
