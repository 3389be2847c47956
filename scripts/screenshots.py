#!/usr/bin/env python3
"""Regenerate screenshots/*.svg by driving the real app headless.

    .venv/bin/python scripts/screenshots.py [--registry] [--text] [--only NAME]

Runs against the fixture OCI layout (tests/fixtures/estargz-oci); with
``--registry`` it also starts Debian's docker-registry on a loopback port,
pushes the fixtures and shoots the repositories/tags screen. Config, cache,
state and runtime dirs are private temporary dirs, so what you have cached or
mounted never shows. ``--text`` also prints each screen as plain text.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
OUT = ROOT / "screenshots"
LAYOUT = "oci:tests/fixtures/estargz-oci"


def _text(app) -> str:
    from app_support import screen_text

    return screen_text(app)


class Shooter:
    def __init__(self, show_text: bool):
        self.show_text = show_text
        self.written: list[Path] = []

    def shot(self, app, name: str) -> None:
        OUT.mkdir(exist_ok=True)
        path = OUT / f"{name}.svg"
        path.write_text(app.export_screenshot(title=f"stargz-tui — {name}"))
        self.written.append(path)
        print(f"wrote {path.relative_to(ROOT)}", flush=True)
        if self.show_text:
            print(_text(app))


async def _layer_session(pilot, app, layer_no=0, keys=(), expand=(), cursor=None):
    from app_support import open_layer_session

    return await open_layer_session(pilot, app, layer_no, keys, expand, cursor)


async def shoot_layout(sh: Shooter, only: str | None) -> None:
    from app_support import corrupt_layout, open_image_screen, screen_named, wait_for

    from stargz_tui.app import StargzApp

    def want(name):
        return only is None or only == name

    size = (110, 32)
    if want("home"):
        app = StargzApp()
        app.config.recent_images[:] = [f"{LAYOUT}:mini-esgz", f"{LAYOUT}:special-zstdchunked"]
        app.config.recent_registries[:] = ["localhost:5000"]
        app.config.path = None  # don't write the demo entries anywhere
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: screen_named(app, "HomeScreen"), "home")
            sh.shot(app, "home")
    if want("repos-layout"):
        app = StargzApp(LAYOUT)
        async with app.run_test(size=size) as pilot:
            s = await wait_for(pilot, lambda: screen_named(app, "ReposScreen"), "repos")
            await wait_for(pilot, lambda: s.query_one("#tags").option_count > 5, "tags")
            s.query_one("#tags").focus()
            await pilot.pause(0.2)
            sh.shot(app, "repos-layout")
    if want("image") or want("image-config") or want("image-history"):
        app = StargzApp(f"{LAYOUT}:mini-esgz-prefetch")
        async with app.run_test(size=size) as pilot:
            s = await open_image_screen(pilot, app)
            sh.shot(app, "image")
            s.query_one("#image-tabs").active = "tab-config"
            await pilot.pause(0.2)
            sh.shot(app, "image-config")
            s.query_one("#image-tabs").active = "tab-history"
            await pilot.pause(0.2)
            sh.shot(app, "image-history")
    if want("layer"):
        app = StargzApp(f"{LAYOUT}:mini-esgz-64k")
        async with app.run_test(size=(140, 40)) as pilot:
            await _layer_session(pilot, app, 0, expand=["data"], cursor="data/random.bin")
            sh.shot(app, "layer")
    if want("layer-80x24"):
        app = StargzApp(f"{LAYOUT}:mini-esgz-prefetch")
        async with app.run_test(size=(80, 24)) as pilot:
            await _layer_session(pilot, app, 0, expand=["etc"], cursor="etc/os-release")
            sh.shot(app, "layer-80x24")
    if want("layer-merged"):
        app = StargzApp(f"{LAYOUT}:mini-esgz")
        async with app.run_test(size=(140, 40)) as pilot:
            await _layer_session(pilot, app, 1, keys=["m"],
                                 expand=["data", "usr", "usr/lib", "usr/lib/app"],
                                 cursor="usr/lib/app/remove-me.py")
            sh.shot(app, "layer-merged")
    if want("layer-search"):
        # merged view: the globbed files, removed ones (whiteout, opaque dir) as "-"
        app = StargzApp(f"{LAYOUT}:mini-esgz")
        async with app.run_test(size=size) as pilot:
            layer = await _layer_session(pilot, app, 1, keys=["m"])
            await pilot.press("slash", *"*.txt")
            await wait_for(pilot, lambda: layer.allowed is not None, "the filter")
            await pilot.press("enter")
            await pilot.pause(0.3)
            sh.shot(app, "layer-search")
    if want("layer-plain"):
        app = StargzApp(f"{LAYOUT}:mini-gzip")
        async with app.run_test(size=size) as pilot:
            await open_image_screen(pilot, app)
            await pilot.press("enter")
            layer = await wait_for(pilot, lambda: screen_named(app, "LayerScreen"), "indexed")
            await wait_for(pilot, lambda: layer.browser is not None, "the tree")
            await pilot.pause(0.3)
            sh.shot(app, "layer-plain")
    if want("layer-light"):
        app = StargzApp(f"{LAYOUT}:special-zstdchunked", theme="textual-light")
        async with app.run_test(size=size) as pilot:
            await _layer_session(pilot, app, 0, cursor="dev")
            sh.shot(app, "layer-light")
    if want("viewer"):
        app = StargzApp(f"{LAYOUT}:mini-esgz")
        async with app.run_test(size=size) as pilot:
            await _layer_session(pilot, app, 0, expand=["usr", "usr/lib", "usr/lib/app"],
                                 cursor="usr/lib/app/mod_01.py")
            await pilot.press("o")
            v = await wait_for(pilot, lambda: screen_named(app, "FileViewer"), "viewer")
            await wait_for(pilot, lambda: v.query_one("#viewer-text").text, "text")
            sh.shot(app, "viewer")
    if want("verify-corrupted"):
        tmp = Path(tempfile.mkdtemp(prefix="sgz-shots-"))
        cwd = os.getcwd()
        try:
            await corrupt_layout(tmp / "corrupted", "mini-esgz-64k", "data/random.bin")
            os.chdir(tmp)
            app = StargzApp("oci:corrupted:mini-esgz-64k")
            async with app.run_test(size=size) as pilot:
                await _layer_session(pilot, app, 0, expand=["data"], cursor="data/random.bin")
                await pilot.press("v")
                s = await wait_for(pilot, lambda: screen_named(app, "VerifyScreen"), "verify")
                await wait_for(pilot, lambda: "fail" in str(s.query_one("#verify-result").render()),
                               "the result")
                app.clear_notifications()
                sh.shot(app, "verify-corrupted")
                await pilot.press("escape")
                await pilot.pause(0.3)
                sh.shot(app, "layer-corrupted")
        finally:
            os.chdir(cwd)
            shutil.rmtree(tmp, ignore_errors=True)
    if want("help"):
        app = StargzApp(f"{LAYOUT}:mini-esgz")
        async with app.run_test(size=size) as pilot:
            await _layer_session(pilot, app, 0)
            await pilot.press("question_mark")
            await wait_for(pilot, lambda: screen_named(app, "HelpScreen"), "help")
            sh.shot(app, "help")
    if want("mounts"):
        await shoot_mounts(sh)
    if want("layer-recorded"):
        await shoot_recorded(sh)


async def shoot_recorded(sh: Shooter) -> None:
    """The layer tree over a real recording mount of mini-esgz-prefetch:
    ▓ prefetch and ● recorded marks after a reader opened a few files."""
    from app_support import wait_for

    from core import mount as core_mount
    from stargz_tui.app import StargzApp

    mp = Path(tempfile.mkdtemp(prefix="sgz-mnt-"))
    rec = Path(tempfile.mkdtemp(prefix="sgz-rec-")) / "record.json"
    try:
        await core_mount.mount_image(f"{LAYOUT}:mini-esgz-prefetch", str(mp), record=str(rec))
        for p in ("usr/lib/app/mod_03.py", "etc/os-release", "data/random.bin"):
            (mp / p).read_bytes()
        app = StargzApp(f"{LAYOUT}:mini-esgz-prefetch")
        async with app.run_test(size=(110, 32)) as pilot:
            layer = await _layer_session(pilot, app, 0, expand=["etc", "data", "usr", "usr/lib",
                                                               "usr/lib/app"],
                                         cursor="usr/lib/app/mod_03.py")
            await wait_for(pilot, lambda: layer.recordings.get(0), "the record")
            await pilot.pause(0.3)
            sh.shot(app, "layer-recorded")
    finally:
        try:
            core_mount.unmount(str(mp), force=True)
        except Exception:  # noqa: BLE001
            pass
        shutil.rmtree(mp, ignore_errors=True)
        shutil.rmtree(rec.parent, ignore_errors=True)


async def shoot_mounts(sh: Shooter) -> None:
    """A real merged mount of mini-esgz-prefetch, listed with live stats."""
    from app_support import wait_for

    from core import mount as core_mount
    from stargz_tui.app import StargzApp

    mp = Path(tempfile.mkdtemp(prefix="sgz-mnt-"))
    try:
        try:
            await core_mount.mount_image(f"{LAYOUT}:mini-esgz-prefetch", str(mp))
        except Exception as e:  # noqa: BLE001 - no FUSE here: shoot the empty screen
            print(f"(mounts: no mount made: {e})")
        else:
            (mp / "etc" / "os-release").read_bytes()
        app = StargzApp()
        async with app.run_test(size=(110, 24)) as pilot:
            app.action_mounts()
            s = await wait_for(pilot, lambda: type(app.screen).__name__ == "MountsScreen"
                               and app.screen, "mounts")
            await wait_for(pilot, lambda: s.mounts or not core_mount.list_mounts(), "the list")
            await pilot.pause(1.2)
            sh.shot(app, "mounts")
    finally:
        try:
            core_mount.unmount(str(mp), force=True)
        except Exception:  # noqa: BLE001
            pass
        shutil.rmtree(mp, ignore_errors=True)


async def shoot_registry(sh: Shooter) -> None:
    from app_support import wait_for
    from registry_helpers import Registry, fixture_tags, push_fixtures

    from stargz_tui.app import StargzApp

    tmp = tempfile.mkdtemp(prefix="sgz-reg-")
    reg = Registry(tmp).start()
    try:
        await asyncio.to_thread(push_fixtures, reg.host, fixture_tags())
        app = StargzApp(reg.host)
        async with app.run_test(size=(110, 32)) as pilot:
            s = await wait_for(pilot, lambda: type(app.screen).__name__ == "ReposScreen"
                               and app.screen, "repos")
            await wait_for(pilot, lambda: s.query_one("#repos").option_count >= 2, "catalog")
            await wait_for(pilot, lambda: s.query_one("#tags").option_count >= 2, "tags")
            await pilot.pause(0.3)
            sh.shot(app, "repos-registry")
    finally:
        reg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", action="store_true", help="also shoot a real loopback registry")
    ap.add_argument("--text", action="store_true", help="print each screen as text too")
    ap.add_argument("--only", help="one screenshot name (e.g. layer, image, mounts)")
    args = ap.parse_args()
    os.chdir(ROOT)
    tmp = tempfile.mkdtemp(prefix="sgz-shots-env-")
    for name in ("CONFIG", "CACHE", "STATE", "RUNTIME"):
        d = os.path.join(tmp, name.lower())
        os.makedirs(d, mode=0o700)
        os.environ[f"STARGZ_TUI_{name}_DIR"] = d
    sh = Shooter(args.text)
    try:
        asyncio.run(shoot_layout(sh, args.only))
        if args.registry and (args.only in (None, "repos-registry")):
            asyncio.run(shoot_registry(sh))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(sh.written)} screenshots in {OUT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
