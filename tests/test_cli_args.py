"""The CLI's argument handling and refusals (issue 18, points 3-7): options and
positionals in any order, --platform checked against a single-platform image,
a missing repository named as such, `unmount` of a path that is none of our
mounts, `cache prune` under a live mount. Everything runs the real CLI."""

from __future__ import annotations

import json
import os

import pytest
from fixture_truth import cli, ref
from fuse_helpers import isolated_mount_env
from registry_fixtures import run_cli


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    yield from isolated_mount_env(tmp_path, monkeypatch)


def _err(p) -> str:
    err = p.stderr.decode() if isinstance(p.stderr, bytes) else p.stderr
    assert p.returncode != 0, p
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("intermixed, plain", [
    (["ls", ref("mini-esgz"), "-lR", "data"], ["ls", "-lR", ref("mini-esgz"), "data"]),
    (["ls", ref("mini-esgz"), "--layer", "0", "data/old"],
     ["ls", "--layer", "0", ref("mini-esgz"), "data/old"]),
    (["ls", ref("mini-esgz"), "data", "--json", "-R"],
     ["ls", "--json", "-R", ref("mini-esgz"), "data"]),
    (["cat", ref("mini-esgz"), "--layer", "0", "etc/os-release"],
     ["cat", "--layer", "0", ref("mini-esgz"), "etc/os-release"]),
    (["verify", ref("mini-esgz"), "--layer", "1", "--json"],
     ["verify", "--json", "--layer", "1", ref("mini-esgz")]),
])
def test_options_and_positionals_in_any_order(intermixed, plain):
    a, b = cli(*intermixed), cli(*plain)
    assert a.stdout == b.stdout and a.stdout.strip()


def test_intermixed_listing_names_the_path_asked_for():
    out = cli("ls", ref("mini-esgz"), "-lR", "data").stdout.decode().splitlines()
    assert out and all(" data/" in line for line in out), out
    raw = cli("ls", ref("mini-esgz"), "--layer", "0", "data/old").stdout.decode().split()
    merged = cli("ls", ref("mini-esgz"), "data/old").stdout.decode().split()
    assert raw and raw != cli("ls", ref("mini-esgz"), "--layer", "0").stdout.decode().split()
    assert merged  # the merged view of the same directory lists too


def test_platform_of_a_single_platform_image_is_checked():
    assert cli("inspect", ref("mini-esgz"), "--platform", "linux/amd64").returncode == 0
    line = _err(cli("inspect", ref("mini-esgz"), "--platform", "linux/arm64", check=False))
    assert "has only linux/amd64" in line and "linux/arm64" in line
    for cmd in (["ls"], ["cat"], ["verify"]):
        args = cmd + [ref("mini-esgz"), "--platform", "linux/arm64"]
        if cmd == ["cat"]:
            args.append("etc/os-release")
        assert "has only linux/amd64" in _err(cli(*args, check=False))
    for bad in ("bogus", "linux/", "/amd64", "linux/amd64/v8/x", "linux amd64"):
        line = _err(cli("inspect", ref("mini-esgz"), "--platform", bad, check=False))
        assert "invalid platform" in line, (bad, line)


@pytest.mark.registry
def test_missing_repository_is_not_reported_as_missing_tag(registry, isolated_env):
    p = run_cli(["inspect", f"{registry.host}/no/such-repo:latest"], isolated_env)
    line = _err(p)
    assert "repository" in line and "no/such-repo" in line and "tag" not in line, line
    p = run_cli(["inspect", f"{registry.host}/fixtures/mini:no-such-tag"], isolated_env)
    assert "tag 'no-such-tag' not found" in _err(p)


def test_unmount_of_a_path_that_is_not_our_mount_fails(mount_env, tmp_path):
    for path in ("/tmp", str(tmp_path / "never-mounted")):
        r = mount_env.cli("unmount", path)
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "not mounted" in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert r.stdout == ""


@pytest.mark.fuse
def test_cache_prune_refuses_under_a_live_mount(mount_env):
    mp = mount_env.mountpoint()
    image = ref("mini-esgz-64k")
    mount_env.cli("mount", image, mp, "--layer", "0", check=True)
    with open(os.path.join(mp, "data/random.bin"), "rb") as f:
        assert len(f.read()) == 716803
    mount_env.wait_for(mp, lambda st: st["chunksCached"] > 0)
    before = json.loads(mount_env.cli("cache", "--json", check=True).stdout)
    assert before["chunks"] > 0
    r = mount_env.cli("cache", "prune")
    assert r.returncode == 1 and mp in r.stderr and "--force" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    after = json.loads(mount_env.cli("cache", "--json", check=True).stdout)
    assert after["chunks"] == before["chunks"] and after["bytes"] == before["bytes"]
    # another cache dir is not used by that mount: pruned without asking
    other = mount_env.tmp / "other-cache"
    assert mount_env.cli("cache", "prune", "--cache-dir", str(other)).returncode == 0
    r = mount_env.cli("cache", "prune", "--force", check=True)
    assert "removed" in r.stdout
    assert json.loads(mount_env.cli("cache", "--json", check=True).stdout)["chunks"] == 0
    mount_env.cli("unmount", mp, check=True)
    r = mount_env.cli("cache", "prune", check=True)  # no live mount: no question asked
    assert "removed 0 chunks" in r.stdout


@pytest.mark.fuse
def test_mount_checks_the_platform_of_a_single_platform_image(mount_env):
    mp = mount_env.mountpoint()
    for extra in (["--layer", "0"], []):
        r = mount_env.cli("mount", ref("mini-esgz"), mp, *extra, "--platform", "linux/arm64")
        assert r.returncode == 1 and "has only linux/amd64" in r.stderr, (extra, r.stderr)
        assert r.stderr.count("\n") == 1 and not os.path.ismount(mp)
        r = mount_env.cli("mount", ref("mini-esgz"), mp, *extra, "--platform", "bogus")
        assert r.returncode == 1 and "invalid platform" in r.stderr, (extra, r.stderr)
    mount_env.cli("mount", ref("mini-esgz"), mp, "--layer", "0", "--platform", "linux/amd64",
                  check=True)
    mount_env.cli("unmount", mp, check=True)


def test_command_owners_name_the_module_registering_each_command():
    """A command line imports only the module of its command (start-up cost,
    issue 14 B1): cli.COMMAND_OWNERS must name, for every command the full
    parser has, the module that registers it, and that module alone must
    parse the command as the full parser does."""
    import argparse
    import importlib

    from stargz_tui import cli

    full = cli.build_parser()
    owners = {}
    for name in cli.COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(name).register(sub)
        for command in sub.choices:
            owners[command] = name
    assert set(full.commands) == set(owners) == set(cli.COMMAND_OWNERS) | {"completion"}
    for command, module in cli.COMMAND_OWNERS.items():
        assert owners[command] == module, command
    argv = ["mount", "oci:x:y", "/tmp", "--layer", "0", "--insecure-registry", "h:1"]
    assert vars(cli.build_parser("mount").parse_args(argv)) == vars(full.parse_args(argv))
