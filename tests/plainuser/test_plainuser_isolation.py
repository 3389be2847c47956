"""Plain users stay apart (issue 13): a second user cannot reach the first
one's mounts (no allow_other), state, cache, control sockets or keyring;
`login`/`logout` work with her own Secret Service; root's mounts stay
nosuid,nodev and never allow_other unless asked."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import anyio
import pytest
from fuse_helpers import FIXTURES, isolated_mount_env
from plainuser_support import stop_all

from core import mount as core_mount

pytestmark = pytest.mark.fuse

CONNECT = ("import socket, sys; s = socket.socket(socket.AF_UNIX)\n"
           "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n"
           "    print(type(e).__name__); sys.exit(3)\nprint('connected')")


def _super_options(path: str) -> tuple[str, set[str], set[str]]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            if parts[4] == path:
                fstype, _, sopts = right.split()[:3]
                return fstype, set(parts[5].split(",")), set(sopts.split(","))
    raise AssertionError(f"{path} is not mounted")


def test_second_user_cannot_reach_her_mount_state_cache_or_sockets(alice, bob):
    mp = alice.mkdir("mnt-iso")
    assert os.stat(alice.home).st_mode & 0o005 == 0o005  # her home is world-searchable
    alice.cli("mount", alice.image("mini-esgz"), mp, "--layer", "0", check=True)
    assert alice.run(["cat", f"{mp}/etc/os-release"]).returncode == 0
    (m,) = alice.mounts()
    layer = m["layers"][0]
    state = os.path.dirname(os.path.dirname(layer["log"]))
    cache = json.loads(alice.cli("cache", "--json", check=True).stdout)["dir"]
    assert json.loads(alice.cli("cache", "--json", check=True).stdout)["chunks"] > 0
    sock_dir = f"{alice.run_dir}/stargz-tui"
    (control,) = [os.path.join(sock_dir, n) for n in os.listdir(sock_dir) if n.endswith(".sock")]
    # her mount: no allow_other, so FUSE answers no one else
    for cmd in (["ls", mp], ["stat", f"{mp}/etc"], ["cat", f"{mp}/etc/os-release"]):
        r = bob.run(cmd)
        assert r.returncode != 0 and "Permission denied" in r.stderr, (cmd, r)
    for d in (state, cache, os.path.dirname(control)):
        r = bob.run(["ls", d])
        assert r.returncode != 0 and "Permission denied" in r.stderr, (d, r)
    r = bob.python(CONNECT, control)
    assert (r.returncode, r.stdout.strip()) == (3, "PermissionError"), r
    assert alice.python(CONNECT, control).stdout.strip() == "connected"
    # his stargz-tui sees nothing of hers and cannot take her mount down
    assert bob.mounts() == []
    r = bob.cli("unmount", "--force", mp)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r
    assert json.loads(bob.cli("cache", "--json", check=True).stdout)["dir"].startswith(bob.home)
    (m,) = alice.mounts()
    assert m["state"] == "serving"
    alice.cli("unmount", mp, check=True)


@pytest.mark.registry
def test_login_logout_with_her_own_keyring(alice, bob, basic_registry):
    host = basic_registry.host
    env, procs = alice.start_secret_service()
    try:
        r = alice.cli("login", host, "-u", "alice", "--password-stdin", env=env,
                      input=basic_registry.users["alice"] + "\n")
        assert r.returncode == 0 and "Login Succeeded" in r.stdout, r.stderr
        r = alice.cli("tags", f"{host}/fixtures/mini", env=env)
        assert r.returncode == 0 and "mini-esgz" in r.stdout.split(), r.stderr
        # the daemons read her keyring too
        mp = alice.mkdir("mnt-auth")
        alice.cli("mount", basic_registry.ref("mini-esgz"), mp, env=env, check=True)
        res = alice.check_tree(mp, "mini-esgz", "merged")
        assert res["problems"] == [] and res["files"] > 0, res["problems"]
        alice.cli("unmount", mp, check=True)
        # bob has no credentials of his own, and her session bus refuses him
        r = bob.cli("tags", f"{host}/fixtures/mini")
        assert r.returncode == 1 and "requires authentication" in r.stderr, r
        r = bob.cli("tags", f"{host}/fixtures/mini", env=env)
        assert r.returncode == 1 and "mini-esgz" not in r.stdout, r
        r = alice.cli("logout", host, env=env)
        assert r.returncode == 0 and "Removed" in r.stdout, r.stderr
        r = alice.cli("tags", f"{host}/fixtures/mini", env=env)
        assert r.returncode == 1 and "requires authentication" in r.stderr, r
    finally:
        stop_all(procs)


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    yield from isolated_mount_env(tmp_path, monkeypatch)


@pytest.mark.parametrize("allow_other", [False, True])
def test_root_mounts_nosuid_nodev_allow_other_only_when_asked(mount_env, bob, allow_other):
    shared = tempfile.mkdtemp(prefix="stargz-tui-rootmnt-", dir="/var/tmp")
    os.chmod(shared, 0o755)
    layer_mp, merged_mp = os.path.join(shared, "layer"), os.path.join(shared, "merged")
    os.mkdir(layer_mp)
    os.mkdir(merged_mp)
    image = f"oci:{FIXTURES}:mini-esgz"
    try:
        for mp, layer in ((layer_mp, 0), (merged_mp, None)):
            anyio.run(lambda mp=mp, layer=layer: core_mount.mount_image(
                image, mp, layer=layer, allow_other=allow_other, silence=0.2))
        fstype, mopts, sopts = _super_options(layer_mp)
        assert fstype == "fuse.stargz" and {"ro", "nosuid", "nodev"} <= mopts
        assert ("allow_other" in sopts) == allow_other
        rec = next(s for s in core_mount.list_mounts() if s["mountpoint"] == merged_mp)
        fstype, mopts, sopts = _super_options(merged_mp)
        assert fstype == "fuse.stargz" and {"ro", "nosuid", "nodev"} <= mopts  # no overlay
        for lay in rec["layers"]:
            _, lopts, lsopts = _super_options(lay["mountpoint"])
            assert {"ro", "nosuid", "nodev"} <= lopts
            assert ("allow_other" in lsopts) == allow_other
        r = bob.run(["cat", f"{layer_mp}/etc/os-release"])
        assert (r.returncode == 0) == allow_other, r
    finally:
        for mp in (merged_mp, layer_mp):
            core_mount.unmount(mp, force=True)
        shutil.rmtree(shared, ignore_errors=True)
