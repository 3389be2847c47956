"""B8 probe: the app opens the layer screen of a big layer.

    python -m bench.appprobe IMAGE_REF

Runs :class:`stargz_tui.app.StargzApp` headless (Textual's ``run_test``) on
the image, waits until the image screen has the layer (its TOC loaded), then
opens layer 0 the way Enter does and waits until the layer screen's tree is
mounted, has its first level and the screen has refreshed. Prints one JSON
line: ``seconds`` (open -> tree painted, the figure),
``from_start_seconds`` (app start -> tree painted, TOC fetch included) and
``idle_seconds`` (open -> the process idle, or 1 s after the paint at most:
the layer-wide work the screen starts after painting, in threads).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

LIMIT = 600.0  # a 1M-entry layer (B10) on a loaded machine


async def _until(pilot, pred, what: str, limit: float = LIMIT):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        await pilot.pause(0.005)
    raise TimeoutError(f"timed out waiting for {what}")


def _tree(screen):
    from textual.widgets import Tree

    for w in screen.query(Tree):
        if w.is_mounted and w.root is not None and (w.root.children or w.root.is_expanded):
            return w
    return None


async def probe(ref: str) -> dict:
    from stargz_tui.app import StargzApp

    t_start = time.perf_counter()
    app = StargzApp(ref)
    async with app.run_test(size=(140, 45), headless=True) as pilot:
        def image_ready():
            s = app.screen
            if type(s).__name__ != "ImageScreen":
                return None
            session = getattr(s, "session", None)
            views = getattr(session, "views", None)
            if views and views[0] is not None and getattr(views[0], "index", None) is not None:
                return s
            return None

        screen = await _until(pilot, image_ready, "the image screen with layer 0 loaded")
        t_loaded = time.perf_counter()
        t0 = time.perf_counter()
        screen.action_open_layer()
        await _until(pilot, lambda: type(app.screen).__name__ == "LayerScreen", "the layer screen")
        tree = await _until(pilot, lambda: _tree(app.screen), "the layer screen's tree")
        # The first paint: the screen's next refresh after the tree has its
        # first level (Textual runs call_after_refresh callbacks once the
        # screen has refreshed). Not pilot.pause(), which waits until the
        # process's CPU time stops advancing (up to 1 s): it counted the
        # layer-wide work the screen starts in threads after painting.
        painted = asyncio.Event()
        app.screen.call_after_refresh(painted.set)
        await asyncio.wait_for(painted.wait(), LIMIT)
        t1 = time.perf_counter()
        nodes = len(tree.root.children)
        await pilot.pause()  # until the process idles (at most 1 s more): a note
        t_idle = time.perf_counter()
    return {"seconds": t1 - t0, "from_start_seconds": t1 - t_start,
            "image_loaded_seconds": t_loaded - t_start, "first_level_nodes": nodes,
            "idle_seconds": t_idle - t0}


def main(argv: list[str]) -> int:
    try:
        import stargz_tui.screens.layer  # noqa: F401
    except ImportError as e:
        print(f"the app's layer screen is not there yet ({e})", file=sys.stderr)
        return 1
    out = asyncio.run(probe(argv[0]))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
