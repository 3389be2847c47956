"""Basic and Bearer (token) auth against real docker-registry instances."""

from __future__ import annotations

import time

import anyio
import pytest

from core.errors import AuthError
from core.image import open_image
from core.reference import parse_reference
from core.registry import RegistryClient, RegistryStore
from core.registry.config import RegistryConfig
from core.registry.credentials import Credentials

pytestmark = pytest.mark.registry


def _store(reg, tag="mini-esgz", creds=None, **kw):
    return RegistryStore(parse_reference(reg.ref(tag)), config=RegistryConfig(),
                         credentials=creds, use_keyring=False, **kw)


def _alice(reg):
    return Credentials("alice", reg.users["alice"], "test")


async def _open(store, tag="mini-esgz"):
    try:
        img = await open_image(store.ref, store=store)
        layer = img.layers[0]
        src = store.blob_source(layer.digest, layer.size)
        tail = await src.read_range(layer.size - 51, 51)
        return img, tail
    finally:
        await store.aclose()


def test_basic_auth_reads_image(basic_registry, registry, isolated_env):
    img, tail = anyio.run(_open, _store(basic_registry, creds=_alice(basic_registry)))
    assert img.manifest_digest == registry.digests["mini-esgz"]
    assert len(tail) == 51


def test_basic_auth_without_credentials_is_one_clear_error(basic_registry, isolated_env):
    with pytest.raises(AuthError) as e:
        anyio.run(_open, _store(basic_registry))
    msg = str(e.value)
    assert basic_registry.host in msg and "login" in msg and "\n" not in msg


def test_basic_auth_wrong_password(basic_registry, isolated_env):
    with pytest.raises(AuthError) as e:
        anyio.run(_open, _store(basic_registry, creds=Credentials("alice", "wrong", "test")))
    assert "rejected the credentials" in str(e.value)
    assert "wrong" not in str(e.value)


def test_token_auth_reads_image_and_caches_token(token_registry, registry, isolated_env):
    issuer = token_registry.issuer
    before = issuer.issued
    img, tail = anyio.run(_open, _store(token_registry, creds=_alice(token_registry)))
    assert img.manifest_digest == registry.digests["mini-esgz"]
    # manifest + config + range read share one cached token for the pull scope
    assert issuer.issued - before == 1
    scopes = [s for _, p, _ in issuer.requests[-1:] for s in p["scope"]]
    assert scopes == ["repository:fixtures/mini:pull"]


def test_token_auth_anonymous_refused_without_anonymous_pull(token_registry, isolated_env):
    with pytest.raises(AuthError) as e:
        anyio.run(_open, _store(token_registry))
    assert "requires authentication" in str(e.value)


def test_token_auth_wrong_password(token_registry, isolated_env):
    with pytest.raises(AuthError) as e:
        anyio.run(_open, _store(token_registry, creds=Credentials("alice", "nope", "test")))
    assert "rejected the credentials" in str(e.value) and "nope" not in str(e.value)


def test_anonymous_token(make_token_registry, isolated_env):
    reg = make_token_registry(anonymous_pull=True)
    img, _ = anyio.run(_open, _store(reg))
    assert img.layers
    method, params, had_auth = reg.issuer.requests[-1]
    assert method == "GET" and not had_auth
    assert params["service"] == "stargz-tui-test-registry"


def test_token_renewed_on_401_mid_session(make_token_registry, isolated_env):
    reg = make_token_registry()

    async def run():
        store = _store(reg, creds=_alice(reg))
        try:
            img = await open_image(store.ref, store=store)
            layer = img.layers[0]
            src = store.blob_source(layer.digest, layer.size)
            n = reg.issuer.issued
            # The next token is issued already expired: the registry answers 401 and the
            # client must fetch a fresh one by itself.
            store.client.invalidate_tokens()
            reg.issuer.expired_tokens = 1
            data = await src.read_range(0, 100)
            return data, reg.issuer.issued - n
        finally:
            await store.aclose()

    data, fetched = anyio.run(run)
    assert len(data) == 100
    assert fetched == 2  # the expired one, then its replacement


def test_token_renewed_after_expiry(make_token_registry, isolated_env):
    reg = make_token_registry(expires_in=1)

    async def run():
        store = _store(reg, creds=_alice(reg))
        try:
            img = await open_image(store.ref, store=store)
            layer = img.layers[0]
            src = store.blob_source(layer.digest, layer.size)
            n = reg.issuer.issued
            await src.read_range(0, 10)
            assert reg.issuer.issued == n  # still valid: cached
            await anyio.sleep(1.2)
            await src.read_range(10, 10)
            return reg.issuer.issued - n
        finally:
            await store.aclose()

    t = time.monotonic()
    assert anyio.run(run) == 1
    assert time.monotonic() - t < 30


def test_identity_token_refresh_flow(make_token_registry, isolated_env):
    reg = make_token_registry()
    creds = Credentials("<token>", "refresh-alice", "test")
    img, _ = anyio.run(_open, _store(reg, creds=creds))
    assert img.layers
    assert reg.issuer.requests[-1][0] == "POST"


def test_push_needs_push_scope(make_token_registry, isolated_env):
    reg = make_token_registry(load=["mini-gzip"])
    scopes = {s for _, p, _ in reg.issuer.requests for s in p["scope"]}
    assert "repository:fixtures/mini:pull,push" in scopes


def test_check_login_basic_and_token(basic_registry, token_registry, isolated_env):
    async def run():
        out = []
        for reg in (basic_registry, token_registry):
            c = RegistryClient(reg.host, config=RegistryConfig(), credentials=_alice(reg),
                               use_keyring=False)
            try:
                out.append(await c.check_login())
            finally:
                await c.aclose()
            bad = RegistryClient(reg.host, config=RegistryConfig(),
                                 credentials=Credentials("alice", "bad", "t"), use_keyring=False)
            try:
                with pytest.raises(AuthError):
                    await bad.check_login()
            finally:
                await bad.aclose()
        return out

    assert anyio.run(run) == ["basic", "bearer"]
