"""The layer screen's search (issue 18 points 1, 2 and 9), driven with Pilot:
partial and unknown terms are shown, never raised; the `t` type cycle works
under every hash seed; globs, path terms, several words ANDed, type: and
size terms; the merged view finds (and marks) removed files, including those
an opaque directory hides. Expected sets come from the fixture's ground truth
(the plain gzip image read with tarfile, tests/fixture_truth.py)."""

from __future__ import annotations

import fnmatch
import os
import posixpath
import subprocess
import sys

import pytest
from app_support import (
    LAYOUT_REF,
    ROOT,
    app_env,  # noqa: F401 - fixture
    find_node,
    open_image_screen,
    open_layer_screen,
    screen_text,
    wait_for,
)
from fixture_truth import merge, truth_layers
from textual.widgets import Tree

from core import browse
from stargz_tui.app import StargzApp

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def _layer(pilot, app, n: int = 0):
    await open_image_screen(pilot, app)
    for _ in range(n):
        await pilot.press("down")
    await pilot.press("enter")
    return await open_layer_screen(pilot, app)


async def _search(pilot, layer, text: str) -> set[str]:
    """Type ``text`` into a fresh search; the matches once it settled."""
    f = layer.query_one("#filter")
    if not f.display:
        await pilot.press("slash")
    f.value = ""
    await pilot.press(*text)
    await pilot.pause(0.3)
    await wait_for(pilot, lambda: not any(w.is_running for w in layer.workers
                                          if w.group == "search"), "the search")
    return set(layer.matches)


async def test_partial_and_unknown_terms_are_shown_not_raised(app_env):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(120, 30)) as pilot:
        layer = await _layer(pilot, app)
        # typed one key at a time: "t", "ty", ... "type:" (each a search)
        await pilot.press("slash", *"type:")
        await wait_for(pilot, lambda: layer.problems, "the partial term reported")
        await pilot.pause(0.3)
        assert "type: needs a type" in screen_text(app)
        assert layer.allowed is None  # nothing filtered on a partial term
        await pilot.press(*"bogus")
        await wait_for(pilot, lambda: any("unknown type 'bogus'" in p for p in layer.problems),
                       "the unknown type reported")
        for key in ("backspace",) * 5:
            await pilot.press(key)
        await pilot.press(*"reg size>")
        await wait_for(pilot, lambda: any("size> needs a size" in p for p in layer.problems),
                       "the partial size reported")
        await pilot.press(*"100K")
        truth = truth_layers("mini-esgz")[0]
        want = {p for p, r in truth.items() if r["type"] == "reg" and r["size"] > 100 << 10}
        await wait_for(pilot, lambda: layer.matches == want and not layer.problems,
                       "type:reg size>100K")
        assert "2 matches" in screen_text(app)


CYCLE = [None, {"reg"}, {"dir"}, {"symlink"}, {"hardlink"}, {"char", "block", "fifo"}, None]


async def _cycle_types(tag: str) -> list[set[str]]:
    """Press `t` through the whole cycle; the matches after each press."""
    app = StargzApp(f"{LAYOUT_REF}:{tag}")
    seen = []
    async with app.run_test(size=(120, 30)) as pilot:
        layer = await _layer(pilot, app)
        for _ in range(len(CYCLE) - 1):
            await pilot.press("t")
            await pilot.pause(0.2)
            await wait_for(pilot, lambda: not any(
                w.is_running for w in layer.workers if w.group == "search"), "the filter")
            seen.append(set(layer.matches))
    return seen


def _cycle_main() -> None:  # run by the test below in a fresh interpreter per seed
    import asyncio
    import json

    print(json.dumps([sorted(s) for s in asyncio.run(_cycle_types(sys.argv[2]))]))


def test_type_cycle_under_every_hash_seed(app_env):  # noqa: F811
    """`t` five times used to raise KeyError('fifo') for most hash seeds: run
    the real app in fresh interpreters under eight seeds."""
    import json

    truth = truth_layers("special-esgz")[0]
    want = [sorted(p for p, r in truth.items() if r["type"] in kinds) if kinds else []
            for kinds in CYCLE[1:]]
    procs = []
    for seed in range(8):
        env = {**os.environ, "PYTHONHASHSEED": str(seed),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "cycle", "special-esgz"], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for seed, p in enumerate(procs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, f"PYTHONHASHSEED={seed}: {err[-2000:]}"
        assert json.loads(out.strip().splitlines()[-1]) == want, seed


async def test_globs_paths_and_words(app_env):  # noqa: F811
    truth = truth_layers("mini-esgz")[0]

    def names(pattern):
        return {p for p in truth if fnmatch.fnmatchcase(posixpath.basename(p), pattern)}

    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(120, 30)) as pilot:
        layer = await _layer(pilot, app)
        assert await _search(pilot, layer, "*.txt") == names("*.txt") != set()
        assert await _search(pilot, layer, "mod_0[0-3]*") == names("mod_0[0-3]*")
        assert len(layer.matches) == 4
        # a path: the directory and everything under it
        assert await _search(pilot, layer, "lib/app") == {
            p for p in truth if ("/" + p + "/").find("/usr/lib/app/") == 0}
        # a glob with '/': matched against the path's last components
        assert await _search(pilot, layer, "app/mod_1*") == names("mod_1*")
        # several words: all must match
        assert await _search(pilot, layer, "mod 3 .py") == {
            p for p in truth if "mod" in p and "3" in p and ".py" in p}
        assert await _search(pilot, layer, "data type:symlink") == {"data/link-to-os-release"}
        assert await _search(pilot, layer, "size<10 type:f") == {
            p for p, r in truth.items() if r["type"] == "reg" and r["size"] < 10}
        # the tree shows the matches (and the way to them), nothing else
        tree = layer.query_one("#toc", Tree)
        await _search(pilot, layer, "*.txt")
        assert find_node(tree, "data/text.txt") and not find_node(tree, "etc/os-release")


async def test_merged_search_shows_removed_and_opaque_hidden_files(app_env):  # noqa: F811
    lower, upper = truth_layers("mini-esgz")
    merged = merge([lower, upper])
    gone = {p for p in merge([lower]) if p not in merged}
    assert {"data/old/a.txt", "usr/lib/app/remove-me.py"} <= gone  # (the fixture's story)
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(140, 36)) as pilot:
        layer = await _layer(pilot, app, 1)
        await pilot.press("m")
        await wait_for(pilot, lambda: layer.merged, "the merged view")
        got = await _search(pilot, layer, "*.txt")
        want = {p for p in merged if p.endswith(".txt")} | {p for p in gone if p.endswith(".txt")}
        assert got == want
        await pilot.press("enter")
        tree = layer.query_one("#toc", Tree)
        for p in sorted(gone & want):
            node = await wait_for(pilot, lambda p=p: find_node(tree, p), p)
            assert node.data.marker == browse.REMOVED, p
            assert node.label.plain.startswith("- "), node.label.plain
        # and without a search: the opaque directory's hidden files are listed as removed
        await pilot.press("escape")
        await wait_for(pilot, lambda: layer.allowed is None, "the filter cleared")
        find_node(tree, "data").expand()
        old = await wait_for(pilot, lambda: find_node(tree, "data/old"), "data/old")
        old.expand()
        await wait_for(pilot, lambda: find_node(tree, "data/old/b.txt"), "data/old's files")
        kids = {c.data.name: c.data.marker for c in old.children}
        assert kids == {"a.txt": browse.REMOVED, "b.txt": browse.REMOVED,
                        "c.txt": browse.ADDED}


if __name__ == "__main__" and sys.argv[1:2] == ["cycle"]:
    _cycle_main()
