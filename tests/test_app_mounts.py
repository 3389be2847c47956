"""Mount and unmount from the app's Mounts screen (real FUSE daemons)."""

from __future__ import annotations

import os

import anyio
import pytest
from app_support import (
    LAYOUT_REF,
    app_env,  # noqa: F401 - fixture
    open_image_screen,
    screen_named,
    wait_for,
)
from fuse_helpers import isolated_mount_env
from textual.widgets import DataTable

from core import mount as core_mount
from stargz_tui.app import StargzApp

pytestmark = [pytest.mark.anyio, pytest.mark.fuse]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def mount_env(app_env, tmp_path, monkeypatch):  # noqa: F811
    yield from isolated_mount_env(tmp_path, monkeypatch)


async def test_mount_and_unmount_from_mounts_screen(mount_env, tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(120, 30)) as pilot:
        await open_image_screen(pilot, app)
        await pilot.press("M")
        mounts = await wait_for(pilot, lambda: screen_named(app, "MountsScreen"), "mounts")
        table = mounts.query_one("#mounts", DataTable)
        assert table.row_count == 0
        await pilot.press("n")
        dialog = await wait_for(pilot, lambda: screen_named(app, "MountDialog"), "the dialog")
        assert dialog.query_one("#mount-image").value == f"{LAYOUT_REF}:mini-esgz"
        dialog.query_one("#mount-point").value = str(mp)
        await pilot.click("#mount-go")
        await wait_for(pilot, lambda: screen_named(app, "MountsScreen"), "the mount", 90)
        await wait_for(pilot, lambda: table.row_count == 1, "the mount listed")
        await wait_for(pilot, lambda: mounts.mounts and mounts.mounts[0]["state"] == "serving",
                       "a serving mount")
        # the merged view is served: the whiteout hid remove-me.py, new.txt is there
        assert sorted(os.listdir(mp / "data")) == [
            "empty", "hardlink.bin", "link-to-os-release", "new.txt", "old", "random.bin",
            "text.txt"]
        assert "remove-me.py" not in os.listdir(mp / "usr" / "lib" / "app")
        # live stats: reading a file shows up in the next refresh (every second)
        before = mounts.mounts[0]["bytesFetched"]
        (mp / "data" / "random.bin").read_bytes()
        await wait_for(pilot, lambda: mounts.mounts and mounts.mounts[0]["bytesFetched"] > before,
                       "the fetched bytes to grow")
        # "open mount" on the image screen finds the layer in that mount
        await pilot.press("escape")
        image = await wait_for(pilot, lambda: screen_named(app, "ImageScreen"), "the image")
        await wait_for(pilot, lambda: image.mounts, "the image screen to see the mount")
        await pilot.press("o")
        await wait_for(pilot, lambda: screen_named(app, "MountsScreen"), "mounts again")
        assert app.clipboard == str(mp)
        mounts = screen_named(app, "MountsScreen")
        table = mounts.query_one("#mounts", DataTable)
        await wait_for(pilot, lambda: table.row_count == 1, "the mount listed")
        await pilot.press("u")
        await wait_for(pilot, lambda: table.row_count == 0, "the mount gone", 60)
        assert not core_mount.is_mounted(str(mp))
        assert core_mount.list_mounts() == []


async def test_layer_view_counts_chunks_in_a_mounts_own_cache_dir(mount_env, tmp_path):
    """A layer mounted with --cache-dir shows its cached chunks from that dir,
    not from the shared cache (which holds none of them)."""
    from core.cache import ChunkCache
    from stargz_tui.services import Services

    own = tmp_path / "own-cache"
    mp = mount_env.mountpoint("own")
    ref = f"{LAYOUT_REF}:mini-esgz"
    await core_mount.mount_image(ref, mp, layer=0, cache_dir=str(own), silence=0.2)
    try:
        for _ in range(600):
            if mount_env.status(mp)["backgroundFetchDone"]:
                break
            await anyio.sleep(0.05)
        st = mount_env.status(mp)
        assert st["chunksCached"] == st["chunksTotal"] > 0
        shared = ChunkCache(str(tmp_path / "shared-cache"))
        services = Services(cache=shared)
        session = await services.open_image(ref)
        view = await services.load_layer(session, 0)
        assert view.cached_chunks == view.index.num_chunks
        assert set(services.chunk_states(session, 0)) == {"cached"}
        assert shared.is_empty()
    finally:
        core_mount.unmount(mp)
    # with the mount gone, the shared cache decides again
    view = await services.load_layer(session, 0)
    assert view.cached_chunks == 0
