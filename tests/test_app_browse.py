"""The Textual app driven with Pilot against the fixture OCI layout:
layout (as a registry) -> repository -> tag -> image -> layer -> file,
search and filters, merged view markers, verify, a corrupted chunk, extract,
and a 100k-entry layer opening fast."""

from __future__ import annotations

import pytest
from app_support import (
    LAYOUT_REF,
    app_env,  # noqa: F401 - fixture
    big_layout,
    corrupt_layout,
    find_node,
    ground_truth,
    open_image_screen,
    open_layer_screen,
    screen_named,
    screen_text,
    tree_labels,
    wait_for,
)
from textual.widgets import OptionList, TextArea, Tree

from core import browse
from stargz_tui.app import StargzApp
from stargz_tui.config import AppConfig

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"  # Textual runs on asyncio


async def test_navigate_layout_to_file(app_env):  # noqa: F811
    """Home -> registry (an OCI layout) -> repo -> tag -> image -> layer -> file view."""
    app = StargzApp()
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: screen_named(app, "HomeScreen"), "home")
        await pilot.press("slash", *LAYOUT_REF)  # (the list has the focus: / to type)
        await pilot.press("enter")
        repos = await wait_for(pilot, lambda: screen_named(app, "ReposScreen"), "repos")
        tags = repos.query_one("#tags", OptionList)
        await wait_for(pilot, lambda: tags.option_count > 0, "the tags")
        ids = [tags.get_option_at_index(i).id for i in range(tags.option_count)]
        assert "t:mini-esgz-64k" in ids and "t:special-zstdchunked" in ids
        tags.focus()
        tags.highlighted = ids.index("t:mini-esgz-64k")
        await pilot.press("enter")
        image = await open_image_screen(pilot, app)
        assert image.session.image.reference.tag == "mini-esgz-64k"
        assert [v.toc_state for v in image.session.views] == ["verified", "verified"]
        await pilot.press("enter")
        layer = await open_layer_screen(pilot, app)
        assert layer.n == 0
        tree = layer.query_one("#toc", Tree)
        data = find_node(tree, "data")
        data.expand()
        await wait_for(pilot, lambda: find_node(tree, "data/text.txt"), "data/ expanded")
        tree.move_cursor(find_node(tree, "data/text.txt"))
        await wait_for(pilot, lambda: layer.current and layer.current.path == "data/text.txt",
                       "the detail pane to follow the cursor")
        chunks = layer.query_one("#chunks")
        assert chunks.row_count == len(layer.index.chunks(layer.index.lookup("data/text.txt"))) > 1
        await pilot.press("o")
        viewer = await wait_for(pilot, lambda: screen_named(app, "FileViewer"), "the viewer")
        area = viewer.query_one(TextArea)
        want = ground_truth("mini-gzip", "data/text.txt").decode()
        await wait_for(pilot, lambda: area.text, "the file text")
        # 300 KiB of text: the viewer shows the first 256 KiB and says so
        assert len(want) > browse.TEXT_VIEW_LIMIT
        assert area.text == want[: browse.TEXT_VIEW_LIMIT]
        assert "first 256.0 KiB" in str(viewer.query_one("#viewer-title").render())
        await pilot.press("escape")
        await wait_for(pilot, lambda: screen_named(app, "LayerScreen"), "back on the layer")
    # the app remembered the image it opened
    cfg = AppConfig.load()
    assert cfg.recent_images[0] == f"{LAYOUT_REF}:mini-esgz-64k"


async def test_search_and_filters_keep_tree_navigable(app_env):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(100, 30)) as pilot:
        await open_image_screen(pilot, app)
        await pilot.press("enter")
        layer = await open_layer_screen(pilot, app)
        await pilot.press("slash", *"mod_0")
        await wait_for(pilot, lambda: len(layer.matches) == 10, "10 matches for mod_0")
        tree = layer.query_one("#toc", Tree)
        lines = [x.strip() for x in tree_labels(tree)]
        shown = [x for x in lines if "mod_" in x]
        assert len(shown) == 10 and all("mod_0" in x for x in shown)
        assert not any("os-release" in x for x in lines)
        # still movable: the cursor walks the filtered tree and the detail follows
        await pilot.press("enter")  # back to the tree
        for _ in range(6):
            await pilot.press("down")
        await wait_for(pilot, lambda: layer.current and layer.current.path.startswith(
            "usr/lib/app/mod_0"), "the cursor on a match")
        # type and size filter
        layer.query_one("#filter").value = "type:reg size>100K"
        await wait_for(pilot, lambda: layer.matches == {"data/random.bin", "data/text.txt"},
                       "two big regular files")
        await pilot.press("escape")
        await wait_for(pilot, lambda: layer.allowed is None, "the filter cleared")
        assert any("etc" in x for x in tree_labels(tree))


async def test_merged_view_markers_and_wasted(app_env):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(120, 36)) as pilot:
        image = await open_image_screen(pilot, app)
        # layer 0 wastes the files layer 1 removes or hides
        b0 = image.session.browser(0)
        total, items = b0.wasted()
        assert {p for p, _ in items} == {"usr/lib/app/remove-me.py", "data/old/a.txt",
                                         "data/old/b.txt"}
        assert total == sum(s for _, s in items) > 0
        await pilot.press("down", "enter")
        layer = await open_layer_screen(pilot, app)
        assert layer.n == 1
        tree = layer.query_one("#toc", Tree)
        app_dir = find_node(tree, "usr")
        app_dir.expand()
        await pilot.pause()
        find_node(tree, "usr/lib").expand()
        await pilot.pause()
        find_node(tree, "usr/lib/app").expand()
        wh = await wait_for(pilot, lambda: find_node(tree, "usr/lib/app/.wh.remove-me.py"),
                            "the whiteout in the raw view")
        assert wh.data.marker == browse.REMOVED
        assert "whiteout" in wh.label.plain
        await pilot.press("m")
        await wait_for(pilot, lambda: layer.merged and find_node(tree, "data"), "merged view")
        find_node(tree, "data").expand()
        new = await wait_for(pilot, lambda: find_node(tree, "data/new.txt"), "data/new.txt")
        assert new.data.marker == browse.ADDED
        old = find_node(tree, "data/random.bin")
        assert old.data.marker is None and old.data.layer_no == 0
        assert find_node(tree, "data/old").data.marker == browse.MODIFIED
        find_node(tree, "usr").expand()
        await pilot.pause()
        find_node(tree, "usr/lib").expand()
        await pilot.pause()
        find_node(tree, "usr/lib/app").expand()
        gone = await wait_for(pilot, lambda: find_node(tree, "usr/lib/app/remove-me.py"),
                              "the removed file in the merged view")
        assert gone.data.marker == browse.REMOVED and gone.data.layer_no == 0


async def test_verify_layer_clean(app_env):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:mini-zstdchunked")
    async with app.run_test(size=(100, 30)) as pilot:
        image = await open_image_screen(pilot, app)
        await pilot.press("v")
        verify = await wait_for(pilot, lambda: screen_named(app, "VerifyScreen"), "verify")
        await wait_for(pilot, lambda: image.session.views[0].verified == "full", "verification")
        n = image.session.views[0].index.num_chunks
        assert n > 1
        assert f"all {n} chunks, the blob digest and the diffID verified" in str(
            verify.query_one("#verify-result").render())
        await pilot.press("escape")
        await wait_for(pilot, lambda: screen_named(app, "ImageScreen"), "back on the image")


async def test_corrupted_chunk_is_reported(app_env, tmp_path):  # noqa: F811
    layout = await corrupt_layout(tmp_path / "bad", "mini-esgz-64k", "data/random.bin")
    app = StargzApp(f"oci:{layout}:mini-esgz-64k")
    async with app.run_test(size=(100, 30)) as pilot:
        image = await open_image_screen(pilot, app)
        # the TOC is intact: only verification of the data finds the damage
        assert image.session.views[0].toc_state == browse.TOC_VERIFIED
        await pilot.press("enter")
        layer = await open_layer_screen(pilot, app)
        await pilot.press("v")
        await wait_for(pilot, lambda: image.session.views[0].failed_chunks, "a failed chunk")
        view = image.session.views[0]
        bad = view.failed_chunks
        assert len(bad) == 1
        (ci,) = bad
        assert layer.index.path_of(layer.index.chunk(ci).entry_id) == "data/random.bin"
        await wait_for(pilot, lambda: any(
            "1 of 60 chunks fail verification" in n.message for n in app._notifications),
            "the error notification")
        await pilot.press("escape")
        # the layer-wide map and the file's chunk table show it
        await wait_for(pilot, lambda: browse.CHUNK_FAILED in layer.layer_states, "the map")
        tree = layer.query_one("#toc", Tree)
        find_node(tree, "data").expand()
        node = await wait_for(pilot, lambda: find_node(tree, "data/random.bin"), "random.bin")
        tree.move_cursor(node)
        await wait_for(pilot, lambda: layer.current and layer.current.path == "data/random.bin",
                       "the detail pane")
        states = layer.query_one("#entry-map").states
        # the chunks that verified are kept in the cache (v fills it), the bad one is not
        assert states[0] == browse.CHUNK_FAILED and set(states[1:]) == {browse.CHUNK_CACHED}


async def test_extract_directory(app_env, tmp_path):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz-64k")
    dest = tmp_path / "out"
    async with app.run_test(size=(100, 30)) as pilot:
        await open_image_screen(pilot, app)
        await pilot.press("enter")
        layer = await open_layer_screen(pilot, app)
        tree = layer.query_one("#toc", Tree)
        tree.move_cursor(find_node(tree, "data"))
        await wait_for(pilot, lambda: layer.current and layer.current.path == "data", "data")
        await pilot.press("x")
        dialog = await wait_for(pilot, lambda: screen_named(app, "ExtractScreen"), "extract")
        dialog.query_one("#extract-dest").value = str(dest)
        await pilot.click("#extract-go")
        await wait_for(pilot, lambda: screen_named(app, "LayerScreen"), "extract to finish")
    assert (dest / "data" / "random.bin").read_bytes() == ground_truth("mini-gzip",
                                                                       "data/random.bin")
    assert (dest / "data" / "text.txt").read_bytes() == ground_truth("mini-gzip", "data/text.txt")
    assert (dest / "data" / "link-to-os-release").is_symlink()


async def test_100k_entry_layer_opens_with_a_handful_of_nodes(app_env, tmp_path):  # noqa: F811
    """Opening a 100k-entry layer builds nothing for its 100k entries: the tree
    is filled per directory on expansion, in batches. (How fast it opens is
    benchmark B8's business, not a timed assertion here.)"""
    ref = big_layout(tmp_path / "big")
    app = StargzApp(ref)
    async with app.run_test(size=(120, 40)) as pilot:
        image = await open_image_screen(pilot, app)
        image.action_open_layer()
        await open_layer_screen(pilot, app)
        await pilot.pause()
        layer = app.screen
        assert layer.index is not None and len(layer.index) > 100_000
        tree = layer.query_one("#toc", Tree)
        assert len(tree._tree_nodes) < 10  # root and its two directories
        # a 20k-entry directory shows a first batch and a "more" node, not 20k nodes
        node = find_node(tree, "flat")
        node.expand()
        await pilot.pause()
        assert len(node.children) == 501
        assert len(tree._tree_nodes) < 520
        assert "19500 more" in node.children[-1].label.plain
        tree.select_node(node.children[-1])
        await wait_for(pilot, lambda: len(node.children) == 1001, "the next batch")


async def test_prefetch_files_are_marked_in_the_tree(app_env):  # noqa: F811
    """Files before the .prefetch.landmark (read from the blob as a plain tar,
    independently of the TOC) are marked; no other file is."""
    import tarfile

    from fixture_truth import blob_path, layer_digests

    with tarfile.open(blob_path(layer_digests("mini-esgz-prefetch")[0])) as tf:
        names = [m for m in tf.getmembers()]
    cut = [m.name for m in names].index(".prefetch.landmark")
    want = {m.name for m in names[:cut] if m.isfile() and m.size}
    assert want  # (the fixture prefetches some files)
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz-prefetch")
    async with app.run_test(size=(140, 36)) as pilot:
        await open_image_screen(pilot, app)
        await pilot.press("enter")
        layer = await open_layer_screen(pilot, app)
        tree = layer.query_one("#toc", Tree)
        for d in ("etc", "usr", "usr/lib", "usr/lib/app", "data"):
            (await wait_for(pilot, lambda d=d: find_node(tree, d), d)).expand()
            await pilot.pause()
        marked = {n.data.path for n in _all_nodes(tree) if "▓ prefetch" in n.label.plain}
        files = {n.data.path for n in _all_nodes(tree) if not n.data.is_dir}
        assert marked == want and len(files) > len(want)
        tree.move_cursor(find_node(tree, sorted(want)[0]))
        await wait_for(pilot, lambda: layer.current and layer.current.path == sorted(want)[0],
                       "the detail pane")
        await pilot.pause(0.2)
        assert "before the prefetch landmark" in screen_text(app)


def _all_nodes(tree):
    stack = list(tree.root.children)
    while stack:
        n = stack.pop()
        if isinstance(n.data, browse.Node):
            yield n
        stack.extend(n.children)


async def test_plain_gzip_layers_are_browsable(app_env):  # noqa: F811
    """A plain gzip layer (no TOC) is indexed by streaming its blob once, then
    browsed like the others: tree, merged view, file view; marked as not
    lazily mountable. Checked against the same blobs read with tarfile."""
    from fixture_truth import merge, truth_layers

    layers = truth_layers("mini-gzip")
    app = StargzApp(f"{LAYOUT_REF}:mini-gzip")
    async with app.run_test(size=(140, 36)) as pilot:
        image = await open_image_screen(pilot, app)
        assert [v.index for v in image.session.views] == [None, None]
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen_named(app, "LayerScreen"), "layer 0 indexed")
        layer = app.screen
        await wait_for(pilot, lambda: layer.browser is not None, "the tree")
        assert "not lazily mountable" in screen_text(app)
        tree = layer.query_one("#toc", Tree)
        assert {n.data.path for n in tree.root.children} == {
            p for p in layers[0] if "/" not in p}
        find_node(tree, "data").expand()
        node = await wait_for(pilot, lambda: find_node(tree, "data/text.txt"), "data/")
        tree.move_cursor(node)
        await wait_for(pilot, lambda: layer.current and layer.current.path == "data/text.txt",
                       "the cursor")
        await pilot.press("o")
        viewer = await wait_for(pilot, lambda: screen_named(app, "FileViewer"), "the viewer")
        area = viewer.query_one(TextArea)
        await wait_for(pilot, lambda: area.text, "the text")
        want = layers[0]["data/text.txt"]["data"].decode()
        assert area.text == want[: browse.TEXT_VIEW_LIMIT]
        await pilot.press("escape")
        await pilot.press("escape")
        await wait_for(pilot, lambda: screen_named(app, "ImageScreen"), "the image")
        # layer 1, merged over layer 0: what the merged image shows
        await pilot.press("down", "enter")
        layer = await wait_for(pilot, lambda: (s := screen_named(app, "LayerScreen"))
                               and s.n == 1 and s.browser is not None and s, "layer 1")
        await pilot.press("m")
        await wait_for(pilot, lambda: layer.merged, "the merged view")
        from stargz_tui import search

        got = set(search.find(layer.browser, search.parse_query("type:reg"), merged=True))
        merged = merge(layers)
        gone = {p for p in merge(layers[:1]) if p not in merged}
        assert got == {p for p, r in merged.items() if r["type"] == "reg"} | {
            p for p in gone if layers[0][p]["type"] == "reg"}


async def test_entry_counts_match_inspect(app_env):  # noqa: F811
    """The layers table counts entries as `stargz-tui inspect --json` does
    (issue 18 point 16), and says "1 layer", not "1 layers"."""
    import json

    from fixture_truth import cli

    info = json.loads(cli("inspect", f"{LAYOUT_REF}:special-esgz", "--json").stdout)
    app = StargzApp(f"{LAYOUT_REF}:special-esgz")
    async with app.run_test(size=(140, 36)) as pilot:
        image = await open_image_screen(pilot, app)
        table = image.query_one("#layers")
        got = [int(str(table.get_cell(str(n), "entries"))) for n in range(table.row_count)]
        assert got == [lay["entries"] for lay in info["layers"]]
        assert len(got) == 1 and "1 layer," in screen_text(app)


async def test_unreachable_registry_is_not_remembered(app_env):  # noqa: F811
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # a port nobody listens on
    port = s.getsockname()[1]
    s.close()
    app = StargzApp(f"127.0.0.1:{port}")
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: any(n.severity == "error" for n in app._notifications),
                       "the connection error")
    assert AppConfig.load().recent_registries == []
