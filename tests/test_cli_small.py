"""Small things a careful user notices (issue 18, point 16), CLI side:
plurals, and an unreachable registry not saved among the recent ones."""

from __future__ import annotations

import socket

import anyio
import pytest
from fixture_truth import cli, ref

from core.errors import CoreError
from stargz_tui.config import AppConfig
from stargz_tui.services import Services


def test_counts_are_said_with_the_right_plural():
    r = cli("ls", ref("special-esgz"), "--layer", "3", check=False)
    err = r.stderr.decode()
    assert r.returncode == 1 and "the image has 1 layer (0)" in err and "1 layers" not in err
    r = cli("ls", ref("mini-esgz"), "--layer", "7", check=False)
    assert "the image has 2 layers (0..1)" in r.stderr.decode()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


@pytest.mark.registry
def test_unreachable_registry_is_not_remembered(tmp_path, registry, isolated_env):
    path = str(tmp_path / "app.toml")
    services = Services(config=AppConfig.load(path))
    dead = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(CoreError):
        anyio.run(services.list_repositories, dead)
    assert dead not in AppConfig.load(path).recent_registries
    names, _more = anyio.run(services.list_repositories, registry.host)
    assert "fixtures/mini" in names
    assert AppConfig.load(path).recent_registries == [registry.host]


@pytest.mark.parametrize("tag", ["mini-esgz", "mini-zstdchunked", "special-esgz"])
def test_entry_counts_agree_between_inspect_and_the_app(tag):
    import json

    from core import browse
    from core.image import open_image

    data = json.loads(cli("inspect", ref(tag), "--json").stdout)

    async def app_counts():
        image = await open_image(ref(tag))
        try:
            return [(await browse.open_layer(image, d)).entries for d in image.layers]
        finally:
            await image.store.aclose()

    counts = anyio.run(app_counts)
    assert counts == [la["entries"] for la in data["layers"]] and all(counts)
