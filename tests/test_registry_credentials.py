"""Credential lookup order (keyring, containers auth.json, docker config.json, helpers)
and the keyring through a real Secret Service (gnome-keyring on a private D-Bus)."""

from __future__ import annotations

import base64
import json
import os
import stat

import keyring
import pytest

from core.errors import CredentialStoreError
from core.registry import credentials
from core.registry.credentials import Credentials, lookup

pytestmark = pytest.mark.registry


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _write(path, doc) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f)


def test_docker_config_auths(isolated_env):
    cfg = os.path.join(isolated_env["DOCKER_CONFIG"], "config.json")
    _write(cfg, {"auths": {
        "https://index.docker.io/v1/": {"auth": _b64("hubuser:hubpass")},
        "registry.example.com:5000": {"username": "u2", "password": "p2"},
        "https://ghcr.io": {"auth": _b64("<token>:refresh-xyz")},
        "quay.io": {"identitytoken": "id-token-1"},
    }})
    c = lookup("docker.io", "library/ubuntu", use_keyring=False)
    assert (c.username, c.secret, c.source) == ("hubuser", "hubpass", cfg)
    assert lookup("registry.example.com:5000", use_keyring=False).secret == "p2"
    g = lookup("ghcr.io", use_keyring=False)
    assert g.is_identity_token and g.secret == "refresh-xyz"
    q = lookup("quay.io", use_keyring=False)
    assert q.is_identity_token and q.secret == "id-token-1"
    assert lookup("other.example.com", use_keyring=False) is None
    assert "hubpass" not in repr(c)


def test_containers_auth_json_order_and_namespaces(isolated_env, monkeypatch, tmp_path):
    runtime = os.path.join(isolated_env["XDG_RUNTIME_DIR"], "containers", "auth.json")
    config = os.path.join(isolated_env["XDG_CONFIG_HOME"], "containers", "auth.json")
    _write(config, {"auths": {"quay.io": {"auth": _b64("cfg:cfgpass")}}})
    _write(runtime, {"auths": {
        "quay.io/org/repo": {"auth": _b64("repo-robot:r1")},
        "quay.io/org": {"auth": _b64("org-robot:o1")},
    }})
    docker = os.path.join(isolated_env["DOCKER_CONFIG"], "config.json")
    _write(docker, {"auths": {"quay.io": {"auth": _b64("docker:d1")}}})
    assert lookup("quay.io", "org/repo", use_keyring=False).username == "repo-robot"
    assert lookup("quay.io", "org/other", use_keyring=False).username == "org-robot"
    # host-only key in the runtime file is absent: the config-home file answers
    assert lookup("quay.io", "elsewhere/x", use_keyring=False).username == "cfg"
    explicit = tmp_path / "explicit-auth.json"
    _write(str(explicit), {"auths": {"quay.io": {"auth": _b64("explicit:e1")}}})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(explicit))
    assert lookup("quay.io", "org/repo", use_keyring=False).username == "explicit"
    assert set(credentials.known_registries()) == {"quay.io"}


def test_docker_credential_helpers(isolated_env, monkeypatch, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "helper.log"
    for name, user in (("testhelper", "helper-user"), ("teststore", "store-user")):
        exe = bindir / f"docker-credential-{name}"
        exe.write_text(
            "#!/bin/sh\n"
            f'[ "$1" = get ] || exit 1\nread url\necho "{name} $url" >> {log}\n'
            'case "$url" in *unknown*) echo "credentials not found in native keychain"; exit 1;; esac\n'
            f'printf \'{{"ServerURL":"%s","Username":"{user}","Secret":"s-{name}"}}\' "$url"\n')
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    _write(os.path.join(isolated_env["DOCKER_CONFIG"], "config.json"), {
        "credHelpers": {"gcr.io": "testhelper"},
        "credsStore": "teststore",
        "auths": {"inline.example.com": {"auth": _b64("inline:i1")}},
    })
    c = lookup("gcr.io", use_keyring=False)
    assert (c.username, c.secret, c.source) == ("helper-user", "s-testhelper",
                                                "docker-credential-testhelper")
    assert lookup("inline.example.com", use_keyring=False).username == "inline"
    hub = lookup("docker.io", use_keyring=False)
    assert hub.username == "store-user"
    assert "teststore https://index.docker.io/v1/" in log.read_text()
    assert lookup("unknown.example.com", use_keyring=False) is None


def test_null_and_fail_backends_refused(isolated_env):
    import keyring.backends.fail
    import keyring.backends.null

    for backend in (keyring.backends.null.Keyring(), keyring.backends.fail.Keyring()):
        keyring.set_keyring(backend)
        with pytest.raises(CredentialStoreError) as e:
            credentials.store("r.example.com", Credentials("u", "topsecret"))
        assert "gnome-keyring" in str(e.value) and "topsecret" not in str(e.value)
        # reading still works (from files), silently skipping the keyring
        assert lookup("r.example.com") is None


def test_plaintext_backend_refused(isolated_env):
    from keyring.backend import KeyringBackend

    class PlaintextKeyring(KeyringBackend):
        priority = 1

        def get_password(self, service, username):
            return None

        def set_password(self, service, username, password):
            raise AssertionError("must not be called")

        def delete_password(self, service, username):
            raise AssertionError("must not be called")

    keyring.set_keyring(PlaintextKeyring())
    with pytest.raises(CredentialStoreError):
        credentials.store("r.example.com", Credentials("u", "p"))


def test_secret_service_store_lookup_delete(keyring_env):
    backend = credentials.secure_backend()
    assert "SecretService" in type(backend).__module__
    credentials.store("reg.example.com:5000", Credentials("kuser", "kpass"))
    c = lookup("reg.example.com:5000")
    assert (c.username, c.secret, c.source) == ("kuser", "kpass", "keyring")
    # keyring beats files
    _write(os.path.join(keyring_env["DOCKER_CONFIG"], "config.json"),
           {"auths": {"reg.example.com:5000": {"auth": _b64("file:f")}}})
    assert lookup("reg.example.com:5000").username == "kuser"
    assert lookup("reg.example.com:5000", use_keyring=False).username == "file"
    assert credentials.delete("reg.example.com:5000") is True
    assert credentials.delete("reg.example.com:5000") is False
    assert lookup("reg.example.com:5000").username == "file"
    # the stored secret is in the Secret Service, not in any file of ours
    for root, _, files in os.walk(keyring_env["HOME"]):
        for f in files:
            if f.endswith(".keyring"):
                continue
            with open(os.path.join(root, f), "rb") as fh:
                assert b"kpass" not in fh.read()
