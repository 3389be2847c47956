"""The app's optimize marks: files before a layer's prefetch landmark are
marked in the layer tree; a recording mount shows its count on the Mounts
screen (a real mount, a real reader)."""

from __future__ import annotations

import anyio
import pytest
from app_support import (
    LAYOUT_REF,
    app_env,  # noqa: F401 - fixture
    find_node,
    open_image_screen,
    open_layer_session,
    screen_named,
    wait_for,
)
from fuse_helpers import isolated_mount_env
from textual.widgets import Static, Tree

from core import mount as core_mount
from stargz_tui.app import StargzApp

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def mount_env(app_env, tmp_path, monkeypatch):  # noqa: F811
    yield from isolated_mount_env(tmp_path, monkeypatch)


def _label(tree, path: str) -> str:
    return find_node(tree, path).label.plain


async def test_prioritized_files_are_marked_in_the_layer_tree(app_env):  # noqa: F811
    # mini-esgz-prefetch's layer 0 has etc/os-release, mod_01.py and text.txt first
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz-prefetch")
    async with app.run_test(size=(120, 40)) as pilot:
        layer = await open_layer_session(pilot, app, 0,
                                         expand=["etc", "data", "usr", "usr/lib", "usr/lib/app"])
        tree = layer.query_one("#toc", Tree)
        for p in ("etc/os-release", "data/text.txt", "usr/lib/app/mod_01.py"):
            assert _label(tree, p).endswith("▓ prefetch"), p
        for p in ("data/random.bin", "usr/lib/app/mod_02.py", "data/empty"):
            assert "prefetch" not in _label(tree, p), p
    # an image without a landmark marks nothing
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(120, 40)) as pilot:
        layer = await open_layer_session(pilot, app, 0, expand=["etc"])
        assert "prefetch" not in _label(layer.query_one("#toc", Tree), "etc/os-release")


@pytest.mark.fuse
async def test_mounts_screen_shows_the_recording_count(mount_env, tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    rec = tmp_path / "rec.json"
    await core_mount.mount_image(f"{LAYOUT_REF}:mini-esgz", str(mp), record=str(rec))
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(120, 30)) as pilot:
        await open_image_screen(pilot, app)
        await pilot.press("M")
        mounts = await wait_for(pilot, lambda: screen_named(app, "MountsScreen"), "mounts")
        detail = mounts.query_one("#mount-detail", Static)
        await wait_for(pilot, lambda: f"recording: 0 file(s) to {rec}" in str(detail.render()),
                       "the count")
        (mp / "etc" / "os-release").read_bytes()
        (mp / "data" / "new.txt").read_bytes()
        await wait_for(pilot, lambda: f"recording: 2 file(s) to {rec}" in str(detail.render()),
                       "the count to follow the reads")
    await anyio.to_thread.run_sync(core_mount.unmount, str(mp))
