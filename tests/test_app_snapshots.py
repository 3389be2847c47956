"""Snapshot tests (pytest-textual-snapshot) of the main screens at 80x24,
100x30 and wide, dark and light. Deterministic: relative fixture paths, an
empty private cache/config/state, no clocks. Update with --snapshot-update."""

from __future__ import annotations

import shutil

import pytest
from app_support import (
    FIXTURES,
    LAYOUT_REF,
    app_env,  # noqa: F401 - fixture
    corrupt_layout,
    open_image_screen,
    open_layer_session,
    screen_named,
    wait_for,
)

from stargz_tui.app import StargzApp


def _layer(layer_no: int = 0, expand=(), cursor: str | None = None, keys=()):
    async def run_before(pilot):
        layer = await open_layer_session(pilot, pilot.app, layer_no, keys, expand, cursor)
        # (the wasted bytes, computed after the first frame, change the head)
        await wait_for(pilot, lambda: layer.wasted_bytes is not None, "wasted bytes")
        await pilot.pause(0.1)
    return run_before


async def _image(pilot):
    await open_image_screen(pilot, pilot.app)
    await pilot.pause(0.1)


def test_snapshot_home(app_env, snap_compare):  # noqa: F811
    async def ready(pilot):
        await wait_for(pilot, lambda: screen_named(pilot.app, "HomeScreen"), "home")
        pilot.app.screen.query_one("#recent").focus()
    assert snap_compare(StargzApp(), terminal_size=(80, 24), run_before=ready)


def test_snapshot_image(app_env, snap_compare):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz-prefetch")
    assert snap_compare(app, terminal_size=(100, 30), run_before=_image)


def test_snapshot_image_config_light(app_env, snap_compare):  # noqa: F811
    async def run_before(pilot):
        await _image(pilot)
        pilot.app.screen.query_one("#image-tabs").active = "tab-config"
        await pilot.pause(0.1)
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz", theme="textual-light")
    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)


def test_snapshot_layer_80x24(app_env, snap_compare):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz-64k")
    assert snap_compare(app, terminal_size=(80, 24),
                        run_before=_layer(0, expand=["data"], cursor="data/random.bin"))


def test_snapshot_layer_raw_whiteouts(app_env, snap_compare):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    assert snap_compare(app, terminal_size=(100, 30),
                        run_before=_layer(1, expand=["usr", "usr/lib", "usr/lib/app", "data",
                                                     "data/old"],
                                          cursor="usr/lib/app/.wh.remove-me.py"))


def test_snapshot_layer_merged_wide(app_env, snap_compare):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz-prefetch")
    assert snap_compare(app, terminal_size=(140, 36),
                        run_before=_layer(1, keys=["m"], expand=["data", "etc"],
                                          cursor="data/text.txt"))


def test_snapshot_layer_light(app_env, snap_compare):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:special-esgz-64k", theme="textual-light")
    assert snap_compare(app, terminal_size=(120, 32), run_before=_layer(0, cursor="dev"))


def test_snapshot_corrupted_chunk(app_env, tmp_path, monkeypatch, snap_compare):  # noqa: F811
    import anyio

    anyio.run(corrupt_layout, tmp_path / "bad", "mini-esgz-64k", "data/random.bin")
    monkeypatch.chdir(tmp_path)  # so the reference renders as a relative path

    async def run_before(pilot):
        await _layer(0, expand=["data"], cursor="data/random.bin")(pilot)
        await pilot.press("v")
        screen = await wait_for(pilot, lambda: screen_named(pilot.app, "VerifyScreen"), "verify")
        await wait_for(pilot, lambda: "fail" in str(screen.query_one("#verify-result").render()),
                       "the verification result")
        pilot.app.clear_notifications()
        await pilot.press("escape")
        await wait_for(pilot, lambda: screen_named(pilot.app, "LayerScreen"), "layer")
        await pilot.pause(0.3)
    app = StargzApp("oci:bad:mini-esgz-64k")
    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)
    assert FIXTURES.exists() and shutil  # the original layout is untouched (we wrote a copy)


def test_snapshot_help(app_env, snap_compare):  # noqa: F811
    async def run_before(pilot):
        await _layer(0)(pilot)
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: screen_named(pilot.app, "HelpScreen"), "help")
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    assert snap_compare(app, terminal_size=(100, 30), run_before=run_before)


@pytest.mark.fuse
def test_snapshot_mounts_empty(app_env, snap_compare):  # noqa: F811
    async def run_before(pilot):
        await wait_for(pilot, lambda: screen_named(pilot.app, "HomeScreen"), "home")
        pilot.app.action_mounts()
        await wait_for(pilot, lambda: screen_named(pilot.app, "MountsScreen"), "mounts")
        await pilot.pause(0.3)
    assert snap_compare(StargzApp(), terminal_size=(100, 24), run_before=run_before)


# -- 80x24 and 160x48 (issue 18 point 15: key columns and the footer fit) ----------
def test_snapshot_image_80x24(app_env, snap_compare):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz-prefetch")
    assert snap_compare(app, terminal_size=(80, 24), run_before=_image)


def test_snapshot_image_160x48(app_env, snap_compare):  # noqa: F811
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz-prefetch")
    assert snap_compare(app, terminal_size=(160, 48), run_before=_image)


def test_snapshot_layer_search_160x48(app_env, snap_compare):  # noqa: F811
    async def run_before(pilot):
        await _layer(1, keys=["m"])(pilot)
        await pilot.press("slash", *"*.txt")
        await wait_for(pilot, lambda: pilot.app.screen.matches, "the matches")
        await pilot.press("enter")
        await pilot.pause(0.3)
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    assert snap_compare(app, terminal_size=(160, 48), run_before=run_before)


def test_snapshot_layer_partial_search_80x24(app_env, snap_compare):  # noqa: F811
    async def run_before(pilot):
        await _layer(0)(pilot)
        # (a blinking cursor would be shot on or off by chance)
        pilot.app.screen.query_one("#filter").cursor_blink = False
        await pilot.press("slash", *"type:")
        await wait_for(pilot, lambda: pilot.app.screen.problems, "the partial term")
        await pilot.pause(0.3)
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


def test_snapshot_help_80x24(app_env, snap_compare):  # noqa: F811
    async def run_before(pilot):
        await _layer(0)(pilot)
        await pilot.press("question_mark")
        await wait_for(pilot, lambda: screen_named(pilot.app, "HelpScreen"), "help")
    app = StargzApp(f"{LAYOUT_REF}:mini-esgz")
    assert snap_compare(app, terminal_size=(80, 24), run_before=run_before)


@pytest.mark.fuse
def test_snapshot_mounts_empty_80x24(app_env, snap_compare):  # noqa: F811
    async def run_before(pilot):
        await wait_for(pilot, lambda: screen_named(pilot.app, "HomeScreen"), "home")
        pilot.app.action_mounts()
        await wait_for(pilot, lambda: screen_named(pilot.app, "MountsScreen"), "mounts")
        await pilot.pause(0.3)
    assert snap_compare(StargzApp(), terminal_size=(80, 24), run_before=run_before)
