"""Mount and unmount from the app's Mounts screen (real FUSE daemons)."""

from __future__ import annotations

import os
import signal
import subprocess

import anyio
import pytest
from app_support import (
    LAYOUT_REF,
    ROOT,
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


async def _mounts_row(pilot, app, mp):
    await pilot.press("M")
    mounts = await wait_for(pilot, lambda: screen_named(app, "MountsScreen"), "mounts")
    table = mounts.query_one("#mounts", DataTable)
    await wait_for(pilot, lambda: table.row_count == 1, "the mount listed")
    return mounts, table


async def test_busy_unmount_names_the_key_and_force_asks_first(mount_env, tmp_path):
    mp = mount_env.mountpoint("busy")
    await core_mount.mount_image(f"{LAYOUT_REF}:mini-esgz", mp, layer=0, silence=0.2)
    holder = subprocess.Popen(["sleep", "60"], cwd=mp)  # keeps the mount busy
    try:
        app = StargzApp()
        async with app.run_test(size=(120, 30)) as pilot:
            await wait_for(pilot, lambda: screen_named(app, "HomeScreen"), "home")
            mounts, table = await _mounts_row(pilot, app, mp)
            await pilot.press("u")
            note = await wait_for(pilot, lambda: [n for n in app._notifications
                                                  if "busy" in n.message], "the busy error")
            assert "press F to force-unmount" in note[0].message
            assert "--force" not in note[0].message
            assert core_mount.is_mounted(str(mp))
            # F asks; "n" keeps the mount
            await pilot.press("F")
            await wait_for(pilot, lambda: screen_named(app, "ConfirmScreen"), "the question")
            await pilot.press("n")
            await wait_for(pilot, lambda: screen_named(app, "MountsScreen"), "no")
            await pilot.pause(0.3)
            assert core_mount.is_mounted(str(mp))
            # "y" detaches it under its user
            await pilot.press("F")
            await wait_for(pilot, lambda: screen_named(app, "ConfirmScreen"), "the question")
            await pilot.press("y")
            await wait_for(pilot, lambda: table.row_count == 0, "the mount gone", 60)
            assert not core_mount.is_mounted(str(mp))
    finally:
        holder.kill()
        holder.wait()


async def test_cached_column_follows_a_mount(mount_env):
    """The image screen's cached column follows the chunk cache a mount fills,
    without pressing r."""
    mp = mount_env.mountpoint("live")
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(120, 30)) as pilot:
        image = await open_image_screen(pilot, app)
        table = image.query_one("#layers", DataTable)
        assert str(table.get_cell("0", "cached")) == "0%"
        await core_mount.mount_image(f"{LAYOUT_REF}:mini-esgz", mp, layer=0, silence=0.2)
        try:
            await wait_for(pilot, lambda: mount_env.status(mp)["backgroundFetchDone"],
                           "the mount to fetch every chunk", 60)
            await wait_for(pilot, lambda: str(table.get_cell("0", "cached")) == "100%",
                           "the cached column at 100%")
        finally:
            core_mount.unmount(str(mp))


def test_shell_key_opens_shell_in_the_mountpoint(mount_env, tmp_path):
    """`s` on the Mounts screen suspends the app and runs $SHELL in the
    mountpoint: the real `stargz-tui tui` in a pseudo-terminal."""
    import pty
    import select
    import time

    mp = mount_env.mountpoint("shell")
    anyio.run(lambda: core_mount.mount_image(f"{LAYOUT_REF}:mini-esgz", mp, layer=0,
                                             silence=0.2))
    out = tmp_path / "shell-ran"
    shell = tmp_path / "fake-shell"
    shell.write_text(f"#!/bin/sh\npwd > '{out}'\nls >> '{out}'\n")
    shell.chmod(0o755)
    env = {**os.environ, "SHELL": str(shell), "TERM": "xterm-256color",
           "COLUMNS": "100", "LINES": "30"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the app on the pty
        os.execve(os.path.join(ROOT, ".venv", "bin", "stargz-tui"),
                  ["stargz-tui", "tui"], env)
    screen = b""

    def pump(until: float) -> None:
        nonlocal screen
        while time.monotonic() < until:
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                try:
                    screen += os.read(fd, 65536)
                except OSError:
                    return

    try:
        pump(time.monotonic() + 4)  # start-up
        os.write(fd, b"M")
        deadline = time.monotonic() + 30
        while b"shell" not in screen and time.monotonic() < deadline:
            pump(time.monotonic() + 0.5)  # the mount row shows its mountpoint
        os.write(fd, b"s")
        deadline = time.monotonic() + 30
        while not out.exists() and time.monotonic() < deadline:
            pump(time.monotonic() + 0.2)
        pump(time.monotonic() + 1.5)  # back in the app
        os.write(fd, b"q")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            pump(time.monotonic() + 0.2)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the app did not quit after the shell")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
        core_mount.unmount(str(mp), force=True)
    lines = out.read_text().splitlines()
    assert lines[0] == str(mp)
    assert "data" in lines[1:]  # the shell saw the mounted layer


async def _kill_and_revive(mp: str, pid: int) -> dict:
    """``kill -9`` the only mount's daemon ``pid``, wait (bounded) until the
    mount shows as crashed, and start it again as the mount service does
    (core.mount.revive, supervised: counted); returns the record."""
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if core_mount.crashed(core_mount.read_records()[0]):
            break
        await anyio.sleep(0.05)
    return await anyio.to_thread.run_sync(lambda: core_mount.revive(mp, supervised=True))


async def test_mounts_screen_shows_restarts_and_failure(mount_env):
    """A daemon killed with -9 and started again (core.mount.revive, what the
    mount service does) shows as restarted, with why, in the mounts screen;
    a mount given up on shows as failed with the dead daemon's last log line."""
    mp = mount_env.mountpoint("restarted")
    await core_mount.mount_image(f"{LAYOUT_REF}:mini-esgz", mp, layer=0, silence=0.2)
    try:
        victim = core_mount.read_records()[0]["layers"][0]["pid"]
        rec = await _kill_and_revive(mp, victim)
        assert rec["restarts"] == 1 and rec["layers"][0]["pid"] != victim
        app = StargzApp()
        async with app.run_test(size=(160, 30)) as pilot:
            await wait_for(pilot, lambda: screen_named(app, "HomeScreen"), "home")
            mounts, table = await _mounts_row(pilot, app, mp)
            detail = mounts.query_one("#mount-detail")
            await wait_for(pilot, lambda: "serving ↻1" in str(table.get_row_at(0)), "the count")
            text = str(detail.render())
            assert "restarted 1 time(s)" in text and f"daemon {victim} of layer 0 died" in text
            # the service gives up after MAX_RESTARTS in its window: failed
            rec = core_mount.read_records()[0]
            for _ in range(core_mount.MAX_RESTARTS):
                rec = await _kill_and_revive(mp, rec["layers"][0]["pid"])
            assert rec["failed"]
            await wait_for(pilot, lambda: "failed" in str(table.get_row_at(0)), "failed")
            await wait_for(pilot, lambda: "given up after" in str(detail.render()), "why")
    finally:
        core_mount.unmount(mp, force=True)
