"""Every fixture tag mounted raw (--layer) and merged from an oci: layout
equals the plain -gzip ground truth read with tarfile."""

from __future__ import annotations

import os

import pytest
from fuse_helpers import (
    ALL_TAGS,
    FIXTURES,
    compare_tree,
    family,
    isolated_mount_env,
    layer_blobs,
    merged_expected,
    raw_expected,
)

from core import mount as core_mount

pytestmark = pytest.mark.fuse


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    yield from isolated_mount_env(tmp_path, monkeypatch)


@pytest.mark.parametrize("tag", ALL_TAGS)
def test_raw_layers_match_ground_truth(mount_env, tag):
    truth = layer_blobs(f"{family(tag)}-gzip")
    assert len(layer_blobs(tag)) == len(truth)
    for i, blob in enumerate(truth):
        mp = mount_env.mountpoint(f"l{i}")
        rec = mount_env.mount(f"oci:{FIXTURES}:{tag}", mp, layer=i)
        assert rec["kind"] == "layer"
        compare_tree(mp, raw_expected(blob))
        st = os.statvfs(mp)
        assert st.f_flag & os.ST_RDONLY and st.f_flag & os.ST_NOSUID and st.f_flag & os.ST_NODEV
        core_mount.unmount(mp)
        assert not core_mount.is_mounted(mp)


@pytest.mark.parametrize("tag", ALL_TAGS)
def test_merged_matches_ground_truth(mount_env, tag):
    truth = layer_blobs(f"{family(tag)}-gzip")
    mp = mount_env.mountpoint()
    rec = mount_env.mount(f"oci:{FIXTURES}:{tag}", mp)
    assert rec["kind"] == "merged" and len(rec["layers"]) == len(truth)
    # overlayfs keeps its own trusted.overlay.* to itself
    compare_tree(mp, merged_expected(truth), drop_xattr_prefixes=("trusted.overlay.",))
    if family(tag) == "mini":
        # the whiteout and the opaque dir of layer 1 are applied
        assert not os.path.exists(os.path.join(mp, "usr/lib/app/remove-me.py"))
        assert sorted(os.listdir(os.path.join(mp, "data/old"))) == ["c.txt"]
    core_mount.unmount(mp)
    assert not core_mount.is_mounted(mp)
    assert core_mount.list_mounts() == []
