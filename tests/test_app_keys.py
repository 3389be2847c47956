"""Keys and layout (issue 18 point 15), driven with Pilot: the home screen's
keys act, Tab moves a visible focus, the tags list has a cursor, the command
palette and `?` list each command once (remapped keys included), the footer
fits at 80 columns, and narrow tables keep their key columns."""

from __future__ import annotations

import pytest
from app_support import (
    LAYOUT_REF,
    app_env,  # noqa: F401 - fixture
    open_image_screen,
    open_layer_session,
    screen_named,
    screen_text,
    wait_for,
)
from textual.widgets import DataTable, Input, OptionList, Tree

from stargz_tui.app import StargzApp
from stargz_tui.config import AppConfig
from stargz_tui.screens.help import help_rows
from stargz_tui.widgets import KeyBar

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_home_keys_act_and_slash_types(app_env):  # noqa: F811
    app = StargzApp()
    async with app.run_test(size=(100, 30)) as pilot:
        home = await wait_for(pilot, lambda: screen_named(app, "HomeScreen"), "home")
        target = home.query_one("#target", Input)
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: screen_named(app, "HelpScreen"), "help on ?")
        await pilot.press("escape")
        await wait_for(pilot, lambda: screen_named(app, "HomeScreen"), "home again")
        await pilot.press("M")
        await wait_for(pilot, lambda: screen_named(app, "MountsScreen"), "mounts on M")
        await pilot.press("escape")
        await wait_for(pilot, lambda: screen_named(app, "HomeScreen"), "home again")
        assert target.value == ""  # none of those keys was typed
        # "/" types into the input: there q is a letter
        await pilot.press("slash", "q", "M")
        assert target.has_focus and target.value == "qM"
        assert screen_named(app, "HomeScreen")
        # Escape leaves the input; q quits
        await pilot.press("escape")
        assert home.query_one("#recent", OptionList).has_focus
        await pilot.press("q")
        await wait_for(pilot, lambda: not app.is_running, "the app to quit on q")


async def test_tab_moves_a_visible_focus(app_env):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(120, 36)) as pilot:
        layer = await open_layer_session(pilot, app, 0, expand=["data"], cursor="data/text.txt")
        panes = [layer.query_one("#toc"), layer.query_one("#entry-scroll"),
                 layer.query_one("#chunks")]
        blurred = {w.id: w.styles.background_tint for w in panes[1:]}
        seen = []
        for _ in range(len(panes)):
            w = app.focused
            seen.append(w.id)
            assert w.display and w.region.area > 0, w  # never a hidden widget
            assert w.styles.background_tint.a > 0, w  # tinted while focused
            await pilot.press("tab")
        assert seen == ["toc", "entry-scroll", "chunks"]
        assert app.focused.id == "toc"  # and round again
        for w in panes[1:]:
            assert w.styles.background_tint != panes[0].styles.background_tint
            assert w.styles.background_tint == blurred[w.id]


async def test_tags_list_shows_a_cursor(app_env):  # noqa: F811
    app = StargzApp("oci:tests/fixtures/estargz-oci")
    async with app.run_test(size=(100, 30)) as pilot:
        repos = await wait_for(pilot, lambda: screen_named(app, "ReposScreen"), "repos")
        tags = repos.query_one("#tags", OptionList)
        await wait_for(pilot, lambda: tags.option_count > 0, "the tags")
        assert tags.highlighted == 0
        await pilot.press("tab")  # from the repositories to the tags
        assert tags.has_focus
        await pilot.press("down", "enter")
        image = await open_image_screen(pilot, app)
        assert image.ref_text.endswith(":" + tags.get_option_at_index(1).id[2:])


WIDGET_INTERNALS = {b.description for cls in (Tree, DataTable, Input, OptionList)
                    for b in cls.BINDINGS if getattr(b, "description", "")}


async def test_command_palette_lists_each_command_once(app_env):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(120, 36)) as pilot:
        await open_layer_session(pilot, app, 0)
        for screen_name in ("LayerScreen", "ImageScreen"):
            titles = [c.title for c in app.get_system_commands(app.screen)]
            assert len(titles) == len({t.lower() for t in titles}), titles
            assert not set(titles) & WIDGET_INTERNALS, set(titles) & WIDGET_INTERNALS
            for want in ("Open image or registry", "Mount", "Unmount", "Mounts", "Keys"):
                assert want in titles, (screen_name, want)
            if screen_name == "LayerScreen":
                assert {"Search", "Verify", "Extract", "Merged"} <= set(titles)
                await pilot.press("escape")
                await wait_for(pilot, lambda: screen_named(app, "ImageScreen"), "image")
        # the palette runs them: Unmount leads to the mounts
        await pilot.press("ctrl+p")
        await pilot.pause(0.3)
        await pilot.press(*"Unmount")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen_named(app, "MountsScreen"), "the mounts screen")


async def test_help_lists_each_binding_once_with_remapped_keys(app_env):  # noqa: F811
    cfg = AppConfig.load()
    cfg.keys = {"verify_layer": "V", "search": "slash,ctrl+f"}
    cfg.save()
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(120, 36)) as pilot:
        layer = await open_layer_session(pilot, app, 0)
        rows = help_rows(app, layer)
        descs = [d for _k, d, _i in rows]
        assert len(descs) == len(set(descs)), descs
        keys = {d: k for k, d, _i in rows}
        assert keys["Verify"] == "V"
        assert keys["Search"] == "/, ^f"
        assert {"Theme", "Help", "Mounts", "Quit", "Command palette"} <= set(descs)
        await pilot.press("V")  # the remapped key works
        await wait_for(pilot, lambda: screen_named(app, "VerifyScreen"), "verify on V")
        await pilot.press("escape")
        await wait_for(pilot, lambda: screen_named(app, "LayerScreen"), "the layer")
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: screen_named(app, "HelpScreen"), "help")
        await pilot.pause(0.2)
        text = "\n".join(screen_text(app).splitlines()[1:-1])  # (not the footer behind)
        assert text.count(" Verify ") == 1 and text.count(" Theme ") == 1


async def test_80x24_footer_fits_and_tables_keep_key_columns(app_env):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    async with app.run_test(size=(80, 24)) as pilot:
        image = await open_image_screen(pilot, app)
        await pilot.pause(0.2)
        table = image.query_one("#layers", DataTable)
        labels = [str(c.label) for c in table.columns.values()]
        assert labels == ["#", "digest", "size", "format", "TOC", "chunks", "cached", "mounted"]
        assert table.virtual_size.width <= table.region.width  # nothing scrolled off
        bar = image.query_one(KeyBar)
        assert len(bar.render().plain) <= 80 and "? Help" in screen_text(app).splitlines()[-1]
        await pilot.press("enter")
        layer = await wait_for(pilot, lambda: screen_named(app, "LayerScreen"), "the layer")
        await pilot.pause(0.3)
        footer = screen_text(app).splitlines()[-1]
        assert "/ Search" in footer and footer.rstrip().endswith("? Help")
        assert len(layer.query_one(KeyBar).render().plain) <= 80
        # wide: every column, every key
        await pilot.resize_terminal(160, 48)
        await pilot.press("escape")
        await pilot.pause(0.3)
        assert len(table.columns) == 10


def test_readme_key_list_matches_the_app():
    """Every key a screen binds (with a description) is in the README's key
    table row for that screen, and the table names no key the app lacks."""
    import re

    from app_support import ROOT

    from stargz_tui.app import StargzApp as App
    from stargz_tui.screens.home import HomeScreen
    from stargz_tui.screens.image import ImageScreen
    from stargz_tui.screens.layer import LayerScreen
    from stargz_tui.screens.mounts import MountsScreen
    from stargz_tui.screens.repos import ReposScreen

    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| (everywhere|home|repositories and tags|image|layer|mounts) "
                           r"\| (.*) \|$", readme, re.M))
    display = {"question_mark": "?", "slash": "/", "escape": "Esc", "enter": "Enter",
               "delete": "Delete", "right_square_bracket": "]", "left_square_bracket": "[",
               "ctrl+t": "Ctrl+T"}
    for row, cls in (("everywhere", App), ("home", HomeScreen), ("repositories and tags",
                     ReposScreen), ("image", ImageScreen), ("layer", LayerScreen),
                     ("mounts", MountsScreen)):
        documented = set(re.findall(r"`([^`]+)`", rows[row]))
        bound = {display.get(k, k) for b in cls.BINDINGS for k in b.key.split(",")
                 if b.description}
        missing = bound - documented - {"Esc"} - ({"Enter"} if row == "image" else set())
        assert not missing, (row, missing)
        keys = {k for k in documented if len(k) == 1 or k in display.values()}
        extra = keys - bound - {"?", "M", "q", "Esc", "Ctrl+T", "Enter", "/"}
        assert not extra, (row, extra)
