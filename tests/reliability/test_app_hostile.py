"""The terminal app against a hostile image: every string an image or a
registry controls (layout path, tag names, config labels and fields, history,
file names, link targets, xattrs, whiteouts) is Rich/Textual markup. The app
must show each one literally on every screen — never interpret it, never
crash on it (a MarkupError used to end the app, with exit status 0).
"""

from __future__ import annotations

import base64
import json
import os
import re

import pytest
from app_support import (
    find_node,
    open_layer_screen,
    screen_named,
    screen_text,
    wait_for,
)
from fuse_helpers import isolated_mount_env
from rel_layers import BlobBuilder, write_layout
from textual.widgets import DataTable, OptionList, Tree

from core import mount as core_mount
from stargz_tui.app import StargzApp

pytestmark = [pytest.mark.anyio, pytest.mark.fuse]

CLOSE = "[/]"                 # closes nothing: MarkupError when parsed
STYLED = "[bold red]x[/]"     # would turn into a red "x" when parsed
BAD_TAG = "[/]"               # a tag that also is no valid tag (a '/' in it)
OPEN_TAG = "t[bold]x"         # a usable tag: no '/', still markup
# names of one path component (no '/'), each markup
NAMES = ["[bold red]x", "[link=https:example.com]click", "[@click=app.quit]q"]
# paths whose '/' makes them closing tags: "[/bold]" is dir "[" + file "bold]"
XATTR_FILE = "data/[/bold]"
NESTED = "data/x[/]y"
# a file whose text would write the clipboard (OSC 52) and clear the screen
OSC52 = "\x1b]52;c;cHduZWQ=\x1b\\"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    for name in ("CONFIG", "CACHE", "STATE", "RUNTIME"):
        d = tmp_path / name.lower()
        d.mkdir(mode=0o700)
        monkeypatch.setenv(f"STARGZ_TUI_{name}_DIR", str(d))
    yield from isolated_mount_env(tmp_path, monkeypatch)


def hostile_layout(root) -> str:
    """Two eStargz layers and a config whose every string is markup."""
    b = BlobBuilder()
    entries = [{"name": "data/", "type": "dir", "mode": 0o755},
               {"name": "data/x[/", "type": "dir", "mode": 0o755},
               {"name": "data/[/", "type": "dir", "mode": 0o755}]
    for i, name in enumerate(NAMES):
        entries += b.add_file(f"data/{name}", f"{CLOSE} {STYLED} {i}\n".encode())
    ents = b.add_file(XATTR_FILE, f"{CLOSE} {STYLED}\n{OSC52}\x1b[2J\r\n".encode())
    ents[0]["xattrs"] = {f"user.{CLOSE}": base64.b64encode(STYLED.encode()).decode()}
    entries += ents
    entries += b.add_file(NESTED, b"nested\n")
    entries.append({"name": "data/lnk", "type": "symlink", "linkName": STYLED, "mode": 0o777})
    layer0 = b.finish({"version": 1, "entries": entries})
    b1 = BlobBuilder()
    entries1 = [{"name": "data/", "type": "dir", "mode": 0o755},
                {"name": "data/.wh.[bold red]x", "type": "reg", "size": 0, "mode": 0o644}]
    entries1 += b1.add_file(f"data/new{CLOSE}", b"new\n")
    layer1 = b1.finish({"version": 1, "entries": entries1})
    config = {
        "architecture": "amd64", "os": "linux", "created": CLOSE,
        "config": {"Labels": {CLOSE: STYLED, "org.example": f"a{CLOSE}b"},
                   "Env": [f"EVIL={STYLED}", "TITLE=\x1b]0;pwned\x07"], "Cmd": [CLOSE, STYLED],
                   "WorkingDir": f"/w{CLOSE}", "User": "[/bold]"},
        "history": [{"created_by": f"RUN echo {STYLED} {CLOSE}"}],
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64] * 2},
    }

    def more_tags(index, _put):
        first = index["manifests"][0]
        bad = json.loads(json.dumps(first))
        bad["annotations"]["org.opencontainers.image.ref.name"] = BAD_TAG
        index["manifests"].append(bad)
        return index

    return write_layout(str(root), [layer0, layer1], tag=OPEN_TAG, config=config,
                        index_override=more_tags)


def shown(app) -> str:
    return screen_text(app)


async def test_hostile_strings_render_literally_on_every_screen(mount_env, tmp_path, rel):
    # the layout's own path holds "[/]" too: "lay[" / "]out"
    layout = tmp_path / "lay[" / "]out"
    layout.mkdir(parents=True)
    ref = hostile_layout(layout)
    registry = ref.rsplit(":", 1)[0]
    assert CLOSE in registry
    app = StargzApp(registry)
    async with app.run_test(size=(160, 48)) as pilot:
        # -- repositories and tags: the repository name and the tags
        repos = await wait_for(pilot, lambda: screen_named(app, "ReposScreen"), "repos")
        tags = repos.query_one("#tags", OptionList)
        await wait_for(pilot, lambda: tags.option_count == 2, "the two tags")
        text = shown(app)
        assert "]out" in text and OPEN_TAG in text and f" {BAD_TAG}" in text
        # a tag that is no valid reference: the error names it, literally
        tags.focus()
        ids = [tags.get_option_at_index(i).id for i in range(tags.option_count)]
        tags.highlighted = ids.index(f"t:{BAD_TAG}")
        await pilot.press("enter")
        await wait_for(pilot, lambda: any(n.severity == "error" for n in app._notifications),
                       "the error for the bad tag")
        await pilot.pause(0.5)  # the toast is painted (markup would end the app here)
        assert any(BAD_TAG in n.message for n in app._notifications)
        app.clear_notifications()
        if screen_named(app, "ImageScreen"):
            await pilot.press("escape")
        repos = await wait_for(pilot, lambda: screen_named(app, "ReposScreen"), "repos again")
        tags = repos.query_one("#tags", OptionList)
        tags.focus()
        tags.highlighted = ids.index(f"t:{OPEN_TAG}")
        await pilot.press("enter")
        # -- image: reference, config, history, manifest
        image = await wait_for(pilot, lambda: (s := screen_named(app, "ImageScreen"))
                               and s.session is not None and all(s.session.views) and s,
                               "the image screen")
        await pilot.pause(0.2)
        assert OPEN_TAG in shown(app)
        tabs = image.query_one("#image-tabs")
        tabs.active = "tab-config"
        await pilot.pause(0.2)
        text = shown(app)
        for s in (f"{CLOSE}={STYLED}", f"EVIL={STYLED}", "TITLE=\\x1b]0;pwned\\x07", f"/w{CLOSE}", "[/bold]",
                  f"a{CLOSE}b"):
            assert s in text, s
        tabs.active = "tab-history"
        await pilot.pause(0.2)
        assert f"RUN echo {STYLED} {CLOSE}" in shown(app)
        tabs.active = "tab-manifest"
        await pilot.pause(0.2)
        assert "containerd.io/snapshot/stargz/toc.digest" in shown(app)
        tabs.active = "tab-layers"
        image.query_one("#layers", DataTable).focus()
        await pilot.pause(0.1)
        # -- layer 0: tree labels, detail pane (path, link, xattr), viewer, extract
        await pilot.press("enter")
        layer = await open_layer_screen(pilot, app)
        tree = layer.query_one("#toc", Tree)
        find_node(tree, "data").expand()
        await wait_for(pilot, lambda: find_node(tree, "data/x["), "data/ expanded")
        find_node(tree, "data/x[").expand()
        find_node(tree, "data/[").expand()
        await wait_for(pilot, lambda: find_node(tree, XATTR_FILE) and find_node(tree, NESTED),
                       "the nested directories")
        await pilot.pause(0.2)
        text = shown(app)
        for name in NAMES + ["x[/", "]y", "bold]", f"lnk → {STYLED}"]:
            assert name in text, name
        for path in (XATTR_FILE, "data/lnk", NESTED):
            tree.move_cursor(find_node(tree, path))
            await wait_for(pilot, lambda p=path: layer.current and layer.current.path == p, path)
            await pilot.pause(0.2)
            text = shown(app)
            assert f"/{path}" in text, path
        tree.move_cursor(find_node(tree, "data/lnk"))
        await wait_for(pilot, lambda: layer.current.path == "data/lnk", "the link")
        await pilot.pause(0.2)
        assert re.search(r"\blink +" + re.escape(STYLED), shown(app))
        tree.move_cursor(find_node(tree, XATTR_FILE))
        await wait_for(pilot, lambda: layer.current.path == XATTR_FILE, "the xattr file")
        await pilot.pause(0.2)
        assert f"xattr user.{CLOSE}" in shown(app) and STYLED in shown(app)
        await pilot.press("o")
        viewer = await wait_for(pilot, lambda: screen_named(app, "FileViewer"), "the viewer")
        area = viewer.query_one("#viewer-text")
        await wait_for(pilot, lambda: area.text, "the text")
        assert f"/{XATTR_FILE}" in shown(app)
        # the file's escape sequences are shown, not sent to the terminal
        assert "\x1b" not in area.text and "\r" not in area.text
        assert "\\x1b]52;c;cHduZWQ=\\x1b\\" in area.text and "\\x1b[2J\\r" in area.text
        assert area.text.startswith(f"{CLOSE} {STYLED}\n")
        await pilot.press("escape")
        await wait_for(pilot, lambda: screen_named(app, "LayerScreen"), "back on the layer")
        await pilot.press("x")
        await wait_for(pilot, lambda: screen_named(app, "ExtractScreen"), "extract")
        assert f"/{XATTR_FILE}" in shown(app)
        await pilot.press("escape")
        await wait_for(pilot, lambda: screen_named(app, "LayerScreen"), "back on the layer")
        # wasted: layer 1 removes "[bold red]x"
        await wait_for(pilot, lambda: layer.wasted_bytes is not None, "wasted bytes")
        await pilot.press("w")
        await wait_for(pilot, lambda: screen_named(app, "TextModal"), "the wasted list")
        assert f"/data/{NAMES[0]}" in shown(app)
        await pilot.press("escape")
        # search with markup typed in: no crash, the match found
        await pilot.press("slash", *"bold]")
        await wait_for(pilot, lambda: layer.matches == {XATTR_FILE}, "a markup search")
        await pilot.press("escape")
        # -- layer 1: the whiteout, raw and merged
        await pilot.press("right_square_bracket")
        layer1 = await wait_for(pilot, lambda: (s := screen_named(app, "LayerScreen"))
                                and s.n == 1 and s.browser is not None and s, "layer 1")
        tree = layer1.query_one("#toc", Tree)
        find_node(tree, "data").expand()
        wh = await wait_for(pilot, lambda: find_node(tree, f"data/.wh.{NAMES[0]}"), "the whiteout")
        tree.move_cursor(wh)
        await wait_for(pilot, lambda: layer1.current and layer1.current.path == wh.data.path,
                       "the whiteout's detail")
        await pilot.pause(0.2)
        text = shown(app)
        assert f"{NAMES[0]} (whiteout)" in text and f"hides {NAMES[0]} in lower layers" in text
        await pilot.press("m")
        await wait_for(pilot, lambda: layer1.merged and find_node(tree, "data"), "merged")
        find_node(tree, "data").expand()
        (await wait_for(pilot, lambda: find_node(tree, "data/new["), "merged data/")).expand()
        await wait_for(pilot, lambda: find_node(tree, f"data/new{CLOSE}"), "merged data/new[")
        await pilot.pause(0.2)
        text = shown(app)
        assert "new[/" in text and f"- {NAMES[0]}" in text
        # verify: the layer's messages
        await pilot.press("v")
        verify = await wait_for(pilot, lambda: screen_named(app, "VerifyScreen"), "verify")
        await wait_for(pilot, lambda: str(verify.query_one("#verify-result").render()),
                       "the verification result")
        await pilot.press("escape")
        await wait_for(pilot, lambda: screen_named(app, "LayerScreen"), "the layer")
        await pilot.press("escape")  # ("]" switched layer 0 for layer 1)
        image = await wait_for(pilot, lambda: screen_named(app, "ImageScreen"), "the image")
        # -- mounts: the mount dialog and the mounts table show the hostile
        # image reference and a hostile mountpoint
        mp = tmp_path / "mnt[" / "]x"
        mp.mkdir(parents=True)
        await pilot.press("m")
        dialog = await wait_for(pilot, lambda: screen_named(app, "MountDialog"), "mount dialog")
        dialog.query_one("#mount-point").value = str(mp)
        await pilot.click("#mount-go")
        await wait_for(pilot, lambda: core_mount.is_mounted(str(mp)), "the mount", 90)
        await wait_for(pilot, lambda: screen_named(app, "ImageScreen"), "dialog closed")
        await pilot.press("M")
        mounts = await wait_for(pilot, lambda: screen_named(app, "MountsScreen"), "mounts")
        table = mounts.query_one("#mounts", DataTable)
        await wait_for(pilot, lambda: table.row_count == 1, "the mount listed")
        await pilot.pause(0.3)
        text = shown(app)
        assert "]x" in text and OPEN_TAG in text
        assert os.listdir(mp / "data")
        await pilot.press("u")
        await wait_for(pilot, lambda: table.row_count == 0, "unmounted", 60)
        await wait_for(pilot, lambda: any(n.message == f"Unmounted {mp}."
                                          for n in app._notifications),
                       "the unmount notification")
        await pilot.pause(0.5)  # the toast is painted (markup would end the app here)
        assert app.return_code is None  # still running: nothing crashed it
    rel.row("security", "an image whose layout path, tags, config labels/env/cmd/history, "
            "file names, link targets, xattrs and whiteouts are Rich markup (`[/]`, "
            "`[bold red]x[/]`, `[@click=app.quit]`) or hold terminal escapes (OSC title, "
            "OSC 52 clipboard, clear screen), browsed through every app screen and mounted "
            "from it",
            "every string shown literally (tags, config, history, tree, detail pane, "
            "viewer, extract, wasted list, merged view, verify, mounts, notifications), "
            "control characters as visible escapes; no MarkupError, the app keeps running")
