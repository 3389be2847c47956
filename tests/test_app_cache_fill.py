"""`o`, `x` and `v` keep the verified chunks they fetch in the chunk cache,
so the layer's chunk map shows what they fetched (issue 18 point 14)."""

from __future__ import annotations

import pytest
from app_support import (
    LAYOUT_REF,
    app_env,  # noqa: F401 - fixture
    find_node,
    open_image_screen,
    open_layer_screen,
    screen_named,
    wait_for,
)
from textual.widgets import Input, TextArea, Tree

from core import browse
from stargz_tui.app import StargzApp


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _states(app, layer, path: str) -> list[str]:
    entry = layer.index.lookup(path)
    return app.services.chunk_states(layer.session, layer.n, layer.index.chunks(entry))


async def _select(pilot, layer, path: str) -> None:
    tree = layer.query_one("#toc", Tree)
    parent = path.rsplit("/", 1)[0]
    find_node(tree, parent).expand()
    await wait_for(pilot, lambda: find_node(tree, path), f"{parent}/ expanded")
    tree.move_cursor(find_node(tree, path))
    await wait_for(pilot, lambda: layer.current and layer.current.path == path, "the cursor")


@pytest.mark.anyio
async def test_view_extract_verify_fill_the_chunk_cache(app_env, tmp_path):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz-64k")
    async with app.run_test(size=(140, 40)) as pilot:
        await open_image_screen(pilot, app)
        await pilot.press("enter")
        layer = await open_layer_screen(pilot, app)
        # o: the viewer's first 256 KiB of data/text.txt (64 KiB chunks)
        await _select(pilot, layer, "data/text.txt")
        before = _states(app, layer, "data/text.txt")
        assert browse.CHUNK_CACHED not in before
        await pilot.press("o")
        viewer = await wait_for(pilot, lambda: screen_named(app, "FileViewer"), "the viewer")
        await wait_for(pilot, lambda: viewer.query_one(TextArea).text, "the text")
        after = _states(app, layer, "data/text.txt")
        # the chunks the viewer read whole are cached; the tail it never read is not
        assert after[:4] == [browse.CHUNK_CACHED] * 4 and browse.CHUNK_CACHED not in after[5:]
        await pilot.press("escape")
        # x: a whole other file lands in the cache too
        other = next(p for p in ("data/random.bin", "etc/os-release")
                     if layer.index.lookup(p) is not None)
        await _select(pilot, layer, other)
        await pilot.press("x")
        box = await wait_for(pilot, lambda: screen_named(app, "ExtractScreen"), "extract")
        box.query_one(Input).value = str(tmp_path / "out")
        await pilot.press("enter")
        await wait_for(pilot, lambda: (tmp_path / "out" / other.rsplit("/", 1)[1]).exists(),
                       "the extracted file")
        await wait_for(pilot, lambda: set(_states(app, layer, other)) == {browse.CHUNK_CACHED},
                       "the extracted file's chunks in the cache")
        await pilot.press("escape")
        # v: every chunk of the layer verified is cached
        await pilot.press("v")
        await wait_for(pilot, lambda: screen_named(app, "VerifyScreen"), "verify")
        states = await wait_for(
            pilot, lambda: (s := app.services.chunk_states(layer.session, layer.n))
            and set(s) == {browse.CHUNK_CACHED} and s, "every chunk cached")
        assert len(states) == layer.index.num_chunks
