"""The app against a real docker-registry on loopback: registry -> repository
-> tag -> image -> layer -> file, and login errors shown in place."""

from __future__ import annotations

import pytest
from app_support import (
    app_env,  # noqa: F401 - fixture
    find_node,
    ground_truth,
    open_image_screen,
    open_layer_screen,
    screen_named,
    wait_for,
)
from textual.widgets import OptionList, TextArea, Tree

from stargz_tui.app import StargzApp

pytestmark = [pytest.mark.anyio, pytest.mark.registry]


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def test_registry_to_file(app_env, isolated_env, registry):  # noqa: F811
    app = StargzApp(registry.host)
    async with app.run_test(size=(100, 30)) as pilot:
        repos_screen = await wait_for(pilot, lambda: screen_named(app, "ReposScreen"), "repos")
        repos = repos_screen.query_one("#repos", OptionList)
        await wait_for(pilot, lambda: repos.option_count >= 2, "the catalog")
        ids = [repos.get_option_at_index(i).id for i in range(repos.option_count)]
        assert "r:fixtures/mini" in ids and "r:fixtures/special" in ids
        # the filter box narrows the list
        await pilot.press("slash", *"spec")
        await wait_for(pilot, lambda: repos.option_count == 1, "the filtered catalog")
        await pilot.press("ctrl+a", "ctrl+k")  # clear the filter
        await wait_for(pilot, lambda: repos.option_count >= 2, "the full catalog")
        repos.focus()
        repos.highlighted = [repos.get_option_at_index(i).id
                             for i in range(repos.option_count)].index("r:fixtures/mini")
        await pilot.press("enter")
        tags = repos_screen.query_one("#tags", OptionList)
        await wait_for(pilot, lambda: tags.option_count >= 5, "the tags of fixtures/mini")
        tag_ids = [tags.get_option_at_index(i).id for i in range(tags.option_count)]
        tags.highlighted = tag_ids.index("t:mini-esgz")
        await pilot.press("enter")
        image = await open_image_screen(pilot, app)
        assert str(image.session.image.reference).endswith("fixtures/mini:mini-esgz")
        assert [v.toc_state for v in image.session.views] == ["verified", "verified"]
        await pilot.press("enter")
        layer = await open_layer_screen(pilot, app)
        tree = layer.query_one("#toc", Tree)
        find_node(tree, "etc").expand()
        node = await wait_for(pilot, lambda: find_node(tree, "etc/os-release"), "etc/os-release")
        tree.move_cursor(node)
        await wait_for(pilot, lambda: layer.current and layer.current.path == "etc/os-release",
                       "the cursor")
        await pilot.press("o")
        viewer = await wait_for(pilot, lambda: screen_named(app, "FileViewer"), "the viewer")
        area = viewer.query_one(TextArea)
        await wait_for(pilot, lambda: area.text, "the text")
        assert area.text == ground_truth("mini-gzip", "etc/os-release").decode()
    assert registry.host in app.config.recent_registries


async def test_login_error_shown_in_place(app_env, isolated_env, basic_registry):  # noqa: F811
    app = StargzApp()
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: screen_named(app, "HomeScreen"), "home")
        await pilot.press("escape")  # leave the input so L reaches the screen
        app.screen.query_one("#recent").focus()
        await pilot.press("L")
        login = await wait_for(pilot, lambda: screen_named(app, "LoginScreen"), "login")
        login.query_one("#login-registry").value = basic_registry.host
        login.query_one("#login-user").value = "alice"
        login.query_one("#login-password").value = "wrong-password"
        await pilot.click("#login-go")
        err = login.query_one("#login-error")
        await wait_for(pilot, lambda: "Checking" not in str(err.render()) and str(err.render()),
                       "the login answer")
        text = str(err.render())
        assert "\n" not in text.strip() and "Traceback" not in text
        assert screen_named(app, "LoginScreen") is login  # still open, error in place
