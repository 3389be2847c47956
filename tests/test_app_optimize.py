"""The app's optimize marks: files before a layer's prefetch landmark are
marked in the layer tree; a recording mount shows its count on the Mounts
screen (a real mount, a real reader)."""

from __future__ import annotations

import os

import anyio
import pytest
from app_support import (
    LAYOUT_REF,
    app_env,  # noqa: F401 - fixture
    find_node,
    open_image_screen,
    open_layer_session,
    screen_named,
    screen_text,
    wait_for,
)
from fuse_helpers import isolated_mount_env
from textual.widgets import DataTable, Static, Tree

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


def _marked(tree, mark: str) -> set[str]:
    """Paths of the tree's loaded nodes whose label carries ``mark``."""
    out, stack = set(), list(tree.root.children)
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if getattr(node.data, "path", None) is not None and mark in node.label.plain:
            out.add(node.data.path)
    return out


async def _expand_all(pilot, tree) -> None:
    """Open every directory of the tree (a bounded number of passes)."""
    for _ in range(16):
        closed = [n for n in _iter(tree.root)
                  if getattr(n.data, "is_dir", False) and not n.is_expanded]
        if not closed:
            return
        for n in closed:
            n.expand()
        await pilot.pause(0.05)
    raise AssertionError("the tree kept growing")


def _iter(node):
    for c in node.children:
        yield c
        yield from _iter(c)


@pytest.mark.fuse
async def test_recorded_files_are_marked_in_the_layer_tree(mount_env, tmp_path):
    """A real recording merged mount; a scripted reader opens some files of
    both layers and only lists or stats others. The layer tree marks exactly
    the files opened from that layer (raw view), the merged view marks them
    across layers, and a file opened while the screen is open gets its mark
    from the refresh; the legend counts them."""
    mp = tmp_path / "mnt"
    mp.mkdir()
    rec = tmp_path / "rec.json"
    await core_mount.mount_image(f"{LAYOUT_REF}:mini-esgz", str(mp), record=str(rec))

    def reader():
        for p in ("usr/lib/app/mod_05.py", "etc/os-release", "data/new.txt"):
            (mp / p).read_bytes()
        os.listdir(mp / "usr" / "lib" / "app")   # listed, not opened
        (mp / "data" / "random.bin").stat()      # stat'ed, not opened
        (mp / "data" / "old" / "c.txt").stat()

    await anyio.to_thread.run_sync(reader)
    layer0 = {"usr/lib/app/mod_05.py", "etc/os-release"}   # (data/new.txt is layer 1's)
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(120, 40)) as pilot:
        layer = await open_layer_session(pilot, app, 0)
        tree = layer.query_one("#toc", Tree)
        await _expand_all(pilot, tree)
        await wait_for(pilot, lambda: _marked(tree, "● recorded") == layer0, "the marks")
        legend = layer.query_one("#tree-legend", Static)
        assert "● recorded: 2 opened so far" in str(legend.render())
        # the detail pane says where in the record the file is
        tree.move_cursor(find_node(tree, "etc/os-release"))
        await wait_for(pilot, lambda: "opened #2 of 2" in screen_text(app), "the detail pane")
        # opened while the screen is open: the timer reads the record again
        await anyio.to_thread.run_sync((mp / "data" / "text.txt").read_bytes)
        layer0.add("data/text.txt")
        await wait_for(pilot, lambda: _marked(tree, "● recorded") == layer0, "the new mark",
                       timeout=15)
        assert "● recorded: 3 opened so far" in str(legend.render())
        await wait_for(pilot, lambda: "opened #2 of 3" in screen_text(app), "the detail's count")
        # layer 1 alone: its one opened file
        await pilot.press("right_square_bracket")
        layer1 = await wait_for(pilot, lambda: (s := screen_named(app, "LayerScreen")) is not None
                                and s.n == 1 and s.browser is not None and s, "layer 1")
        tree1 = layer1.query_one("#toc", Tree)
        await _expand_all(pilot, tree1)
        await wait_for(pilot, lambda: _marked(tree1, "● recorded") == {"data/new.txt"},
                       "layer 1's mark")
        # layer 1's merged view (the image): every opened file, from both layers
        await pilot.press("m")
        await wait_for(pilot, lambda: layer1.merged and find_node(tree1, "etc"), "the merged view")
        await _expand_all(pilot, tree1)
        await wait_for(pilot, lambda: _marked(tree1, "● recorded") == layer0 | {"data/new.txt"},
                       "the merged marks")
    await anyio.to_thread.run_sync(core_mount.unmount, str(mp))
    # (after the unmount no mount serves the layer: no marks, the legend says so)
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(120, 40)) as pilot:
        layer = await open_layer_session(pilot, app, 0, expand=["etc"])
        await pilot.press("R")
        await wait_for(pilot, lambda: "no recording mount" in str(
            layer.query_one("#tree-legend", Static).render()), "the legend")
        assert _marked(layer.query_one("#toc", Tree), "● recorded") == set()


def _landmark_offsets(blob: str) -> dict[str, int]:
    """Compressed offset of each landmark file in an eStargz blob, found by
    walking its gzip members with zlib (not with our TOC reader): a
    landmark's one byte of data starts a member of its own, as every file's
    data does in eStargz."""
    import tarfile
    import zlib

    with open(blob, "rb") as f:
        data = f.read()
    starts, pos, upos = {}, 0, 0   # uncompressed offset -> compressed offset
    while pos < len(data):
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = d.decompress(data[pos:])
        except zlib.error:
            break  # (the footer)
        starts[upos] = pos
        upos += len(out)
        pos = len(data) - len(d.unused_data)
        if not d.eof:
            break
    with tarfile.open(blob) as tf:
        return {m.name: starts[m.offset_data] for m in tf.getmembers()
                if m.name in (".prefetch.landmark", ".no.prefetch.landmark")}


async def test_image_screen_shows_each_layers_landmark(app_env):  # noqa: F811
    """The layers table's landmark column: the compressed bytes before a
    .prefetch.landmark (its offset, found here from the gzip members), 'no
    prefetch' for a .no.prefetch.landmark, '-' without a TOC."""
    from fixture_truth import blob_path, layer_digests

    from core.units import human_size

    want = {}
    for tag in ("mini-esgz-prefetch", "mini-esgz"):
        for n, d in enumerate(layer_digests(tag)):
            marks = _landmark_offsets(blob_path(d))
            want[tag, n] = (f"after {human_size(marks['.prefetch.landmark'])}"
                            if ".prefetch.landmark" in marks else "no prefetch")
    assert want["mini-esgz-prefetch", 0] == "after 39.3 KiB"  # (what inspect says too)
    want["mini-gzip", 0] = want["mini-gzip", 1] = "-"
    for tag in ("mini-esgz-prefetch", "mini-esgz", "mini-gzip"):
        app = StargzApp(f"{LAYOUT_REF}:{tag}")
        async with app.run_test(size=(100, 30)) as pilot:
            image = await open_image_screen(pilot, app)
            table = image.query_one("#layers", DataTable)
            for n in (0, 1):
                cell = table.get_cell(str(n), "landmark")
                assert str(cell) == want[tag, n], (tag, n, str(cell))


@pytest.mark.fuse
async def test_recording_mount_from_the_mounts_screen(mount_env, tmp_path):
    """The Mounts screen's mount dialog starts a recording mount: the files a
    reader opens are in the record file, in order, and counted on screen."""
    from core.record import read_record

    mp = tmp_path / "mnt"
    mp.mkdir()
    rec = tmp_path / "rec.json"
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(120, 30)) as pilot:
        await open_image_screen(pilot, app)
        await pilot.press("M")
        mounts = await wait_for(pilot, lambda: screen_named(app, "MountsScreen"), "mounts")
        await pilot.press("n")
        dialog = await wait_for(pilot, lambda: screen_named(app, "MountDialog"), "the dialog")
        dialog.query_one("#mount-point").value = str(mp)
        dialog.query_one("#mount-record").value = str(rec)
        await pilot.click("#mount-go")
        await wait_for(pilot, lambda: screen_named(app, "MountsScreen"), "the mount", 90)
        detail = mounts.query_one("#mount-detail", Static)
        await wait_for(pilot, lambda: f"recording: 0 file(s) to {rec}" in str(detail.render()),
                       "the recording mount")
        opened = ["data/text.txt", "etc/os-release", "usr/lib/app/mod_07.py"]

        def reader():
            for p in opened:
                (mp / p).read_bytes()
            (mp / "data" / "random.bin").stat()

        await anyio.to_thread.run_sync(reader)
        await wait_for(pilot, lambda: f"recording: 3 file(s) to {rec}" in str(detail.render()),
                       "the count")
        assert [e.path for e in read_record(str(rec))] == opened
    await anyio.to_thread.run_sync(core_mount.unmount, str(mp))
