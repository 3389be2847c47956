"""Run as the plain user by test_plainuser_app.py: the app mounts the
fixture image from its Mounts screen at ``argv[1]``, then unmounts it; prints
what it saw as one JSON object. Uses the user's own (default) dirs."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import anyio  # noqa: E402
from app_support import LAYOUT_REF, open_image_screen, screen_named, wait_for  # noqa: E402
from textual.widgets import DataTable  # noqa: E402

from core import mount as core_mount  # noqa: E402
from stargz_tui.app import StargzApp  # noqa: E402


async def main(mp: str) -> dict:
    out: dict = {}
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(120, 30)) as pilot:
        await open_image_screen(pilot, app)
        await pilot.press("M")
        mounts = await wait_for(pilot, lambda: screen_named(app, "MountsScreen"), "mounts")
        table = mounts.query_one("#mounts", DataTable)
        await pilot.press("n")
        dialog = await wait_for(pilot, lambda: screen_named(app, "MountDialog"), "the dialog")
        dialog.query_one("#mount-point").value = mp
        await pilot.click("#mount-go")
        await wait_for(pilot, lambda: screen_named(app, "MountsScreen"), "the mount", 90)
        await wait_for(pilot, lambda: mounts.mounts and mounts.mounts[0]["state"] == "serving",
                       "a serving mount", 90)
        out["overlay"] = mounts.mounts[0]["overlay"]
        out["rows"] = table.row_count
        out["data"] = sorted(os.listdir(os.path.join(mp, "data")))
        with open(os.path.join(mp, "etc", "os-release"), "rb") as f:
            out["os_release"] = len(f.read())
        await pilot.press("u")
        await wait_for(pilot, lambda: table.row_count == 0, "the mount gone", 60)
        out["mounted_after"] = core_mount.is_mounted(mp)
        out["records_after"] = core_mount.list_mounts()
    return out


if __name__ == "__main__":
    print(json.dumps(anyio.run(main, sys.argv[1])))
