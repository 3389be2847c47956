"""inspect / ls / cat / verify / convert on ``host:port/repo:tag`` give the same results as
on ``oci:``, with and without auth; registry errors are one clear line."""

from __future__ import annotations

import base64
import json
import os

import pytest
from registry_fixtures import run_cli

pytestmark = pytest.mark.registry

LAYOUT = "oci:tests/fixtures/estargz-oci"


def _ok(p):
    assert p.returncode == 0, (p.returncode, p.stderr)
    return p.stdout


def _json(p) -> dict:
    doc = json.loads(_ok(p))
    if isinstance(doc, dict):
        doc.pop("reference", None)
        doc.pop("image", None)
    return doc


def _error(p) -> str:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stargz-tui: "), p.stderr
    return lines[0]


@pytest.mark.parametrize("tag", ["mini-esgz", "special-zstdchunked"])
def test_same_results_as_oci_layout(registry, tag, isolated_env):
    reg_ref, oci_ref = registry.ref(tag), f"{LAYOUT}:{tag}"
    assert _json(run_cli(["inspect", reg_ref, "--json"], isolated_env)) == \
        _json(run_cli(["inspect", oci_ref, "--json"], isolated_env))
    assert _ok(run_cli(["ls", "-R", reg_ref], isolated_env)) == \
        _ok(run_cli(["ls", "-R", oci_ref], isolated_env))
    path = "data/text.txt" if tag.startswith("mini") else "sparse-ish.bin"
    a = run_cli(["cat", reg_ref, path], isolated_env)
    b = run_cli(["cat", oci_ref, path], isolated_env)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and len(a.stdout) > 1000
    va = run_cli(["verify", reg_ref, "--json"], isolated_env)
    vb = run_cli(["verify", oci_ref, "--json"], isolated_env)
    assert va.returncode == vb.returncode == 0, va.stderr
    assert _json(va) == _json(vb)


def test_inspect_and_cat_with_basic_auth_from_docker_config(basic_registry, isolated_env):
    cfg = os.path.join(isolated_env["DOCKER_CONFIG"], "config.json")
    auth = base64.b64encode(f"alice:{basic_registry.users['alice']}".encode()).decode()
    with open(cfg, "w") as f:
        json.dump({"auths": {basic_registry.host: {"auth": auth}}}, f)
    ref = basic_registry.ref("mini-esgz")
    assert _json(run_cli(["inspect", ref, "--json"], isolated_env)) == \
        _json(run_cli(["inspect", f"{LAYOUT}:mini-esgz", "--json"], isolated_env))
    assert _ok(run_cli(["cat", ref, "data/text.txt"], isolated_env)) == \
        _ok(run_cli(["cat", f"{LAYOUT}:mini-esgz", "data/text.txt"], isolated_env))


def test_convert_from_registry(registry, isolated_env, tmp_path):
    out = tmp_path / "converted"
    p = run_cli(["convert", registry.ref("mini-gzip"), f"oci:{out}:conv", "-q"], isolated_env,
                timeout=120)
    _ok(p)
    v = run_cli(["verify", f"oci:{out}:conv", "-q"], isolated_env)
    assert v.returncode == 0, v.stderr
    assert _ok(run_cli(["cat", f"oci:{out}:conv", "etc/os-release"], isolated_env)) == \
        _ok(run_cli(["cat", f"{LAYOUT}:mini-gzip", "etc/os-release"], isolated_env))


def test_convert_into_registry_then_read_and_verify(make_registry, isolated_env):
    """``convert oci:... HOST/REPO:TAG`` pushes an eStargz image that reads back
    identical to the plain original and passes ``verify --full``."""
    reg = make_registry(load=False)
    dst = f"{reg.host}/converted/mini:esgz"
    _ok(run_cli(["convert", f"{LAYOUT}:mini-gzip", dst, "--chunk-size", "65536", "-q"],
                isolated_env, timeout=120))
    info = _json(run_cli(["inspect", dst, "--json"], isolated_env))
    assert [layer["format"] for layer in info["layers"]] == ["estargz", "estargz"]
    assert all(layer["tocDigestVerified"] is True for layer in info["layers"])
    v = run_cli(["verify", dst, "--full"], isolated_env, timeout=120)
    assert v.returncode == 0, v.stderr + v.stdout
    assert _ok(run_cli(["ls", "-R", "-l", dst], isolated_env)) == \
        _ok(run_cli(["ls", "-R", "-l", f"{LAYOUT}:mini-gzip"], isolated_env))
    assert _ok(run_cli(["cat", dst, "data/text.txt"], isolated_env)) == \
        _ok(run_cli(["cat", f"{LAYOUT}:mini-gzip", "data/text.txt"], isolated_env))


def test_tag_not_found(registry, isolated_env):
    line = _error(run_cli(["inspect", registry.host + "/fixtures/mini:no-such-tag"],
                          isolated_env))
    assert "no-such-tag" in line and "not found" in line


def test_unknown_host(isolated_env):
    line = _error(run_cli(["inspect", "nosuch-registry.invalid/a/b:c"], isolated_env))
    assert "nosuch-registry.invalid" in line


def test_wrong_credentials(token_registry, isolated_env):
    cfg = os.path.join(isolated_env["DOCKER_CONFIG"], "config.json")
    with open(cfg, "w") as f:
        json.dump({"auths": {token_registry.host: {"username": "alice",
                                                   "password": "wrong"}}}, f)
    line = _error(run_cli(["inspect", token_registry.ref("mini-esgz")], isolated_env))
    assert "rejected the credentials" in line and "401" in line and token_registry.host in line


def test_manifest_digest_mismatch(registry, front_proxy, isolated_env):
    front = front_proxy(registry)
    front.alter_manifest = lambda body: body + b"\n"
    line = _error(run_cli(["inspect", f"{front.host}/fixtures/mini:mini-esgz"], isolated_env))
    assert "does not match" in line
    digest = registry.digests["mini-esgz"]
    line = _error(run_cli(["inspect", f"{front.host}/fixtures/mini@{digest}"], isolated_env))
    assert "does not match" in line and digest in line


def test_unsupported_media_type(registry, front_proxy, isolated_env):
    front = front_proxy(registry)
    front.manifest_content_type = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    line = _error(run_cli(["inspect", f"{front.host}/fixtures/mini:mini-esgz"], isolated_env))
    assert "schema 1" in line and "not supported" in line
