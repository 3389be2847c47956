"""The registry commands as a user runs them: ``python -m stargz_tui`` subprocesses against
real registries; errors are one line on stderr with a non-zero exit status."""

from __future__ import annotations

import json

import pytest
from registry_fixtures import run_cli

from core.registry.credentials import lookup

pytestmark = pytest.mark.registry


def _one_line_error(p) -> str:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("stargz-tui: ") and "Traceback" not in p.stderr
    return lines[0]


def test_repos_and_tags(registry, isolated_env):
    p = run_cli(["repos", registry.host], isolated_env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["fixtures/mini", "fixtures/special"]
    p = run_cli(["repos", registry.host, "--json", "--page-size", "1"], isolated_env)
    doc = json.loads(p.stdout)
    assert doc == {"registry": registry.host, "repositories": ["fixtures/mini", "fixtures/special"],
                   "truncated": False}
    p = run_cli(["repos", registry.host, "--limit", "1"], isolated_env)
    assert p.stdout.split() == ["fixtures/mini"] and "stopped after 1" in p.stderr
    p = run_cli(["tags", registry.host + "/fixtures/special", "--json"], isolated_env)
    assert p.returncode == 0, p.stderr
    assert sorted(json.loads(p.stdout)["tags"]) == sorted(
        t for t in registry.digests if t.startswith("special-"))
    p = run_cli(["tags", "oci:tests/fixtures/estargz-oci"], isolated_env)
    assert p.returncode == 0 and "mini-esgz" in p.stdout.split()


def test_help_has_examples(isolated_env):
    for cmd in ("repos", "tags", "login", "logout"):
        p = run_cli([cmd, "--help"], isolated_env)
        assert p.returncode == 0 and "examples:" in p.stdout


def test_unknown_host_error(isolated_env):
    p = run_cli(["tags", "nosuch-registry.invalid/some/repo"], isolated_env)
    line = _one_line_error(p)
    assert "nosuch-registry.invalid" in line and "unknown host" in line


def test_unauthenticated_and_wrong_credentials_errors(basic_registry, isolated_env, tmp_path):
    p = run_cli(["tags", basic_registry.host + "/fixtures/mini"], isolated_env)
    line = _one_line_error(p)
    assert basic_registry.host in line and "login" in line
    # wrong credentials from docker's config.json
    import base64
    import os

    cfg = os.path.join(isolated_env["DOCKER_CONFIG"], "config.json")
    with open(cfg, "w") as f:
        json.dump({"auths": {basic_registry.host: {
            "auth": base64.b64encode(b"alice:not-the-password").decode()}}}, f)
    p = run_cli(["tags", basic_registry.host + "/fixtures/mini"], isolated_env)
    line = _one_line_error(p)
    assert "rejected the credentials" in line and "401" in line
    assert "not-the-password" not in p.stderr + p.stdout
    # right credentials from the same file work
    with open(cfg, "w") as f:
        json.dump({"auths": {basic_registry.host: {
            "username": "alice", "password": basic_registry.users["alice"]}}}, f)
    p = run_cli(["tags", basic_registry.host + "/fixtures/mini"], isolated_env)
    assert p.returncode == 0 and "mini-esgz" in p.stdout.split()


def test_not_found_repository_error(registry, isolated_env):
    p = run_cli(["tags", registry.host + "/no/such-repo"], isolated_env)
    line = _one_line_error(p)
    assert "not found" in line and registry.host in line


@pytest.mark.parametrize("kind", ["basic", "token"])
def test_login_logout_with_secret_service(kind, basic_registry, token_registry, keyring_env):
    reg = basic_registry if kind == "basic" else token_registry
    password = reg.users["alice"]
    # wrong password: refused, nothing stored
    p = run_cli(["login", reg.host, "-u", "alice", "--password-stdin"], keyring_env,
                input="wrong-password\n")
    line = _one_line_error(p)
    assert "login to" in line and "wrong-password" not in p.stderr
    assert lookup(reg.host) is None
    p = run_cli(["login", reg.host, "-u", "alice", "--password-stdin"], keyring_env,
                input=password + "\n")
    assert p.returncode == 0, p.stderr
    assert "Login Succeeded" in p.stdout and password not in p.stdout + p.stderr
    c = lookup(reg.host)
    assert (c.username, c.secret, c.source) == ("alice", password, "keyring")
    # the stored credentials are used by the next command
    p = run_cli(["tags", reg.host + "/fixtures/mini"], keyring_env)
    assert p.returncode == 0, p.stderr
    assert "mini-esgz" in p.stdout.split()
    p = run_cli(["logout", reg.host], keyring_env)
    assert p.returncode == 0 and "Removed" in p.stdout
    assert lookup(reg.host) is None
    p = run_cli(["logout", reg.host], keyring_env)
    assert p.returncode == 0 and "Not logged in" in p.stdout
    p = run_cli(["tags", reg.host + "/fixtures/mini"], keyring_env)
    assert "requires authentication" in _one_line_error(p)


def test_login_without_usable_keyring_says_what_to_install(basic_registry, isolated_env):
    p = run_cli(["login", basic_registry.host, "-u", "alice", "--password-stdin"], isolated_env,
                input=basic_registry.users["alice"])
    line = _one_line_error(p)
    assert "keyring" in line and "gnome-keyring" in line


def test_login_needs_username_without_terminal(basic_registry, keyring_env):
    p = run_cli(["login", basic_registry.host, "--password-stdin"], keyring_env, input="x")
    assert "-u USER" in _one_line_error(p)
