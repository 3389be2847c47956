"""Registry fixtures shared by every test suite (imported by tests/conftest.py).

Fixture API (all on 127.0.0.1, real ``docker-registry`` processes):

``registry`` (session)
    A :class:`registry_helpers.Registry` loaded with every fixture tag through
    our own push code: ``registry.ref("mini-esgz")`` ->
    ``"127.0.0.1:PORT/fixtures/mini:mini-esgz"`` (``fixtures/special`` for the
    ``special-*`` tags); ``registry.digests[tag]`` is each manifest digest;
    ``registry.host``, ``registry.url``, ``registry.root`` (storage dir).
    Read-only for tests: push into your own repository names if you must write.

``make_registry`` (function)
    Factory ``make_registry(auth=None, load=False|True|[tags], port=None)`` ->
    a started private :class:`Registry` (stopped at the end of the test).
    ``reg.stop()`` / ``reg.start()`` / ``reg.restart()`` keep port and storage.
    ``auth=("htpasswd", path)`` or ``("token", issuer)``.

``basic_registry`` (session)
    htpasswd (bcrypt) registry; ``basic_registry.users == {"alice": ...}``;
    ``mini-esgz`` and ``mini-gzip`` are loaded.

``token_registry`` (session)
    ``auth: token`` registry backed by ``token_registry.issuer`` (a
    :class:`TokenIssuer`, RS256 JWTs, users ``{"alice": ...}``, no anonymous
    pull); ``mini-esgz`` and ``mini-gzip`` loaded. Tests that change the
    issuer's knobs should use ``make_token_registry`` instead.

``make_token_registry`` (function)
    Factory ``make_token_registry(anonymous_pull=False, expires_in=300, load=True)``
    -> a private token-auth Registry with ``.issuer``.

``redirecting_front`` (function)
    Factory ``redirecting_front(upstream_registry, ttl=300)`` -> ``(front, cdn)``:
    a :class:`FrontProxy` before ``upstream_registry`` whose blob GETs answer
    307 to ``cdn`` (:class:`CdnServer` on 127.0.0.2, signed URLs valid ``ttl``
    seconds). Use ``front.host`` in references; ``cdn.requests`` records headers.

``front_proxy`` (function)
    Factory ``front_proxy(upstream_registry)`` -> a started :class:`FrontProxy`
    (fault injection: ``fail_next``, ``drop_next``, ``alter_manifest``, ...).

``secret_service`` (session)
    A private dbus + gnome-keyring Secret Service (:class:`SecretServiceSession`);
    ``.env`` are the variables pointing at it.

``keyring_env`` (function)
    Points this process (``keyring.set_keyring``) and its subprocesses (returned
    env dict) at the private Secret Service; isolated HOME/XDG/DOCKER_CONFIG.

``isolated_env`` (function)
    Env dict (also applied to this process) with no keyring
    (``PYTHON_KEYRING_BACKEND=keyring.backends.null.Keyring``), empty temp
    DOCKER_CONFIG / XDG dirs / registries config: no developer file or
    keyring is read.  ``run_cli(args, env, input=None, timeout=60)`` runs
    ``python -m stargz_tui`` with it.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from cli_helpers import stargz_cli
from registry_helpers import (
    CdnServer,
    FrontProxy,
    Registry,
    SecretServiceSession,
    TokenIssuer,
    fixture_tags,
    push_fixtures,
    write_htpasswd,
)

TEST_USERS = {"alice": "wonderland-secret-42"}
AUTH_TAGS = ["mini-esgz", "mini-gzip"]


def _load(reg: Registry, load, credentials=None) -> None:
    if not load:
        reg.digests = {}
        return
    tags = fixture_tags() if load is True else list(load)
    reg.digests = push_fixtures(reg.host, tags, credentials=credentials)


def _alice():
    from core.registry.credentials import Credentials

    return Credentials("alice", TEST_USERS["alice"], "test")


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    reg = Registry(str(tmp_path_factory.mktemp("registry"))).start()
    try:
        _load(reg, True)
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def make_registry(tmp_path):
    made: list[Registry] = []

    def make(auth=None, load=False, port=None, credentials=None) -> Registry:
        reg = Registry(str(tmp_path / f"registry-{len(made)}"), port=port, auth=auth)
        made.append(reg)
        reg.start()
        _load(reg, load, credentials)
        return reg

    yield make
    for reg in made:
        reg.stop()


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory):
    d = tmp_path_factory.mktemp("basic-registry")
    htpasswd = write_htpasswd(str(d / "htpasswd"), TEST_USERS)
    reg = Registry(str(d), auth=("htpasswd", htpasswd)).start()
    reg.users = dict(TEST_USERS)
    try:
        _load(reg, AUTH_TAGS, _alice())
        yield reg
    finally:
        reg.stop()


def _token_registry(d: str, anonymous_pull=False, expires_in=300, load=AUTH_TAGS):
    issuer = TokenIssuer(d, TEST_USERS, anonymous_pull=anonymous_pull,
                         expires_in=expires_in).start()
    reg = Registry(d, auth=("token", issuer))
    reg.issuer = issuer
    reg.users = dict(TEST_USERS)
    try:
        reg.start()
        _load(reg, load, _alice())
    except BaseException:
        reg.stop()
        issuer.stop()
        raise
    return reg


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory):
    reg = _token_registry(str(tmp_path_factory.mktemp("token-registry")))
    try:
        yield reg
    finally:
        reg.stop()
        reg.issuer.stop()


@pytest.fixture
def make_token_registry(tmp_path):
    made: list[Registry] = []

    def make(anonymous_pull=False, expires_in=300, load=AUTH_TAGS) -> Registry:
        d = tmp_path / f"token-registry-{len(made)}"
        d.mkdir()
        reg = _token_registry(str(d), anonymous_pull, expires_in, load)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg.stop()
        reg.issuer.stop()


@pytest.fixture
def front_proxy():
    made: list[FrontProxy] = []

    def make(upstream: Registry) -> FrontProxy:
        p = FrontProxy(upstream.url).start()
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


@pytest.fixture
def redirecting_front(front_proxy):
    made: list[CdnServer] = []

    def make(upstream: Registry, ttl: float = 300.0) -> tuple[FrontProxy, CdnServer]:
        cdn = CdnServer(upstream.root, ttl=ttl).start()
        made.append(cdn)
        front = front_proxy(upstream)
        front.redirect_blobs_to = cdn
        return front, cdn

    yield make
    for cdn in made:
        cdn.stop()


@pytest.fixture(scope="session")
def secret_service(tmp_path_factory):
    s = SecretServiceSession(str(tmp_path_factory.mktemp("secret-service"))).start()
    try:
        yield s
    finally:
        s.stop()


def _isolate(monkeypatch, tmp_path, extra: dict) -> dict:
    home = tmp_path / "home"
    for sub in (".docker", ".config", ".local/share", ".cache", "run"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    env = {
        "HOME": str(home), "DOCKER_CONFIG": str(home / ".docker"),
        "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local/share"),
        "XDG_CACHE_HOME": str(home / ".cache"), "XDG_RUNTIME_DIR": str(home / "run"),
        "STARGZ_TUI_REGISTRIES_CONFIG": str(home / ".config" / "stargz-tui-registries.toml"),
        "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring",
    }
    env.update(extra)
    monkeypatch.delenv("REGISTRY_AUTH_FILE", raising=False)
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    full = dict(os.environ)
    return full


@pytest.fixture
def isolated_env(monkeypatch, tmp_path):
    import keyring
    import keyring.backends.null

    old = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.null.Keyring())
    try:
        yield _isolate(monkeypatch, tmp_path, {})
    finally:
        keyring.set_keyring(old)


@pytest.fixture
def keyring_env(monkeypatch, tmp_path, secret_service):
    import keyring
    import keyring.backends.SecretService

    env = _isolate(monkeypatch, tmp_path, secret_service.env)
    old = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.SecretService.Keyring())
    try:
        yield env
    finally:
        keyring.set_keyring(old)


def run_cli(args: list[str], env: dict, *, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m stargz_tui ARGS`` as a subprocess (text mode, bounded)."""
    return stargz_cli(*args, env=env, input=input, timeout=timeout)
