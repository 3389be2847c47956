"""Mounts from the real registry: trees equal the ground truth; a small read
of a large layer fetches a small fraction (counted at the registry side) and
returns before background fetch is done; after background fetch the
registry can go away and reads keep working."""

from __future__ import annotations

import os
import time

import pytest
from fuse_helpers import (
    ALL_TAGS,
    CountingProxy,
    compare_tree,
    family,
    isolated_mount_env,
    layer_blobs,
    merged_expected,
    push_layout,
    raw_expected,
    write_big_layout,
)

from core import mount as core_mount

pytestmark = [pytest.mark.fuse, pytest.mark.registry]


@pytest.fixture
def mount_env(tmp_path, monkeypatch, isolated_env):
    yield from isolated_mount_env(tmp_path, monkeypatch)


@pytest.mark.parametrize("tag", ALL_TAGS)
def test_registry_mounts_match_ground_truth(mount_env, registry, tag):
    ref = registry.ref(tag)
    truth = layer_blobs(f"{family(tag)}-gzip")
    for i, blob in enumerate(truth):
        mp = mount_env.mountpoint(f"l{i}")
        mount_env.mount(ref, mp, layer=i)
        compare_tree(mp, raw_expected(blob))
        core_mount.unmount(mp)
    mp = mount_env.mountpoint("merged")
    rec = mount_env.mount(ref, mp)
    assert len(rec["layers"]) == len(truth)
    compare_tree(mp, merged_expected(truth), drop_xattr_prefixes=("trusted.overlay.",))
    core_mount.unmount(mp)
    assert core_mount.list_mounts() == []


def test_small_read_is_lazy_and_survives_registry_stop(mount_env, make_registry):
    big = write_big_layout(mount_env.tmp / "big")
    reg = make_registry()
    push_layout(big["layout"], big["tag"], f"{reg.host}/big/app:{big['tag']}")
    proxy = CountingProxy(reg.host)
    try:
        ref = f"{proxy.host}/big/app:{big['tag']}"
        mp = mount_env.mountpoint()
        mount_env.mount(ref, mp, layer=0, silence=2.0)
        resolved = proxy.bytes_down  # manifest, config, footer and TOC
        t0 = time.monotonic()
        with open(os.path.join(mp, "etc/hello.txt"), "rb") as f:
            assert f.read() == big["contents"]["etc/hello.txt"]
        elapsed = time.monotonic() - t0
        read_bytes = proxy.bytes_down - resolved
        st = mount_env.status(mp)
        assert not st["backgroundFetchDone"], "the read waited for background fetch"
        assert st["chunksCached"] < st["chunksTotal"] / 4
        assert read_bytes < big["blob_size"] / 20, (read_bytes, big["blob_size"])
        assert resolved < big["blob_size"] / 10
        assert elapsed < 5
        # background fetch completes the layer, then the registry can go away
        st = mount_env.wait_for(mp, lambda s: s["backgroundFetchDone"], timeout=120)
        assert st["chunksCached"] == st["chunksTotal"] and st["errors"] == 0
        assert proxy.bytes_down >= big["blob_size"] * 0.9
        reg.stop()
        for name, data in big["contents"].items():
            with open(os.path.join(mp, name), "rb") as f:
                assert f.read() == data, name
        assert mount_env.status(mp)["state"] == "serving"
    finally:
        proxy.close()
