"""Every mount command as a plain user (issue 13): one-layer and merged
(one daemon per image) mounts of the fixture layout and of a registry image equal
the ground truth as she sees it; mounts, unmount, unmount --force, stale
cleanup after kill -9; cache, convert, verify; her dirs are hers, 0700."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time

import pytest
from fixture_truth import layer_digests

pytestmark = pytest.mark.fuse


def _mountinfo(path: str) -> tuple[str, str, str] | None:
    """(fstype, mount options, super options) of ``path`` in the mount table."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            if parts[4] == path:
                found = (right.split()[0], parts[5], right.split()[2])
    return found


def _check_mount_and_tree(alice, image: str, tag: str, layer: str) -> dict:
    mp = alice.mkdir(f"mnt-{tag}-{layer}")
    args = ["mount", image, mp] + ([] if layer == "merged" else ["--layer", layer])
    r = alice.cli(*args)
    assert r.returncode == 0, r.stderr
    info = _mountinfo(mp)
    assert info is not None, f"{mp} is not mounted"
    fstype, mopts, sopts = info
    assert fstype == "fuse.stargz"  # merged too: one process, no fuse-overlayfs (issue 17)
    assert {"ro", "nosuid", "nodev"} <= set(mopts.split(","))
    assert f"user_id={alice.uid}" in sopts.split(",")
    assert "allow_other" not in sopts
    res = alice.check_tree(mp, tag, layer)
    assert res["problems"] == [], "\n".join(res["problems"][:20])
    assert res["files"] > 0
    r = alice.cli("unmount", mp)
    assert r.returncode == 0, r.stderr
    assert _mountinfo(mp) is None
    return res


@pytest.mark.parametrize("tag", ["mini-esgz", "mini-zstdchunked", "special-esgz"])
def test_oci_layers_and_merged_equal_truth_as_plain_user(alice, tag):
    for i in range(len(layer_digests(tag))):
        res = _check_mount_and_tree(alice, alice.image(tag), tag, str(i))
    res = _check_mount_and_tree(alice, alice.image(tag), tag, "merged")
    if tag.startswith("special"):
        # without id mapping the image's ids are exact: uid 1000's 0700 home is not hers
        assert res["denied"] == ["home/user"]
    assert alice.mounts() == []


@pytest.mark.registry
def test_registry_image_mounts_equal_truth_as_plain_user(alice, registry):
    tag = "mini-esgz"
    _check_mount_and_tree(alice, registry.ref(tag), tag, "0")
    _check_mount_and_tree(alice, registry.ref(tag), tag, "merged")


def test_her_dirs_are_private(alice):
    mp = alice.mkdir("mnt-dirs")
    alice.cli("mount", alice.image("mini-esgz"), mp, "--layer", "0", check=True)
    alice.run(["cat", f"{mp}/etc/os-release"])
    cache = json.loads(alice.cli("cache", "--json", check=True).stdout)
    assert cache["dir"] == f"{alice.home}/.cache/stargz-tui"
    st = json.loads(alice.cli("mounts", "--json", check=True).stdout)[0]
    state = os.path.dirname(os.path.dirname(st["layers"][0]["log"]))
    assert state.startswith(alice.home + "/")
    sock_dir = f"{alice.run_dir}/stargz-tui"
    for d in (state, cache["dir"], sock_dir):
        s = os.stat(d)
        assert (s.st_uid, stat.S_IMODE(s.st_mode)) == (alice.uid, 0o700), d
    socks = [n for n in os.listdir(sock_dir) if n.endswith(".sock")]
    assert socks
    for n in socks:
        s = os.stat(os.path.join(sock_dir, n))
        assert (s.st_uid, stat.S_IMODE(s.st_mode)) == (alice.uid, 0o600)


def test_unmount_busy_then_force_as_plain_user(alice):
    mp = alice.mkdir("mnt-busy")
    alice.cli("mount", alice.image("mini-esgz"), mp, "--layer", "0", check=True)
    # setpriv execs in place: the holder's pid is the one the error must name
    holder = subprocess.Popen(["setpriv", f"--reuid={alice.uid}", f"--regid={alice.gid}",
                               "--init-groups", "sh", "-c", f"cd {mp}/etc && exec sleep 120"],
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{holder.pid}/cwd") != f"{mp}/etc" \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        r = alice.cli("unmount", mp)
        assert r.returncode == 1
        assert r.stderr.count("\n") == 1 and "busy" in r.stderr and str(holder.pid) in r.stderr
        assert _mountinfo(mp) is not None
        r = alice.cli("unmount", "--force", mp)  # fusermount3 -uz: she may not umount2
        assert r.returncode == 0, r.stderr
        assert _mountinfo(mp) is None
        assert alice.mounts() == []
    finally:
        holder.kill()
        holder.wait(10)


def test_stale_cleanup_after_kill_9_as_plain_user(alice):
    mp = alice.mkdir("mnt-stale")
    alice.cli("mount", alice.image("mini-esgz"), mp, check=True)
    (m,) = alice.mounts()
    # one daemon serves both layers (issue 17)
    assert m["state"] == "serving" and m["overlay"] is None and len(m["pids"]) == 1
    for pid in m["pids"]:
        os.kill(pid, signal.SIGKILL)  # her daemons, started by this test
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alice.mounts()[0]["state"] != "stale":
        time.sleep(0.1)
    (m,) = alice.mounts()
    assert m["state"] == "stale" and "daemon is not running" in m["reason"]
    r = alice.cli("mounts")
    assert "unmount --force" in r.stdout
    r = alice.cli("unmount", "--force", mp)
    assert r.returncode == 0, r.stderr
    assert alice.mounts() == []
    with open("/proc/self/mountinfo") as f:
        assert f" {alice.home}/" not in f.read()


def test_cache_convert_verify_as_plain_user(alice):
    out = alice.mkdir("converted")
    r = alice.cli("convert", "-q", alice.image("mini-gzip"), f"oci:{out}:conv")
    assert r.returncode == 0, r.stderr
    for d, _, names in os.walk(out):
        for n in names + [d]:
            assert os.lstat(os.path.join(d, n)).st_uid == alice.uid
    r = alice.cli("verify", f"oci:{out}:conv", "--full")
    assert r.returncode == 0, r.stdout + r.stderr
    r = alice.cli("verify", alice.image("mini-esgz"), "--full")
    assert r.returncode == 0, r.stdout + r.stderr
    mp = alice.mkdir("mnt-cache")
    alice.cli("mount", alice.image("mini-esgz"), mp, "--layer", "0", "--wait-prefetch",
              check=True)
    alice.run(["sh", "-c", f"cat $(find {mp} -type f) >/dev/null"])
    alice.cli("unmount", mp, check=True)
    usage = json.loads(alice.cli("cache", "--json", check=True).stdout)
    assert usage["dir"].startswith(alice.home + "/") and usage["chunks"] > 0
    r = alice.cli("cache", "prune", "--json", check=True)
    assert json.loads(r.stdout)["removedChunks"] == usage["chunks"]


def test_mount_service_mounts_as_plain_user(alice):
    """``mount`` through her mount service (the default mode): it runs as
    her, its socket dir is hers, and its mounts equal the ground truth."""
    env = {"STARGZ_TUI_SERVER": "auto"}
    try:
        r = alice.cli("service", "start", env=env)
        assert r.returncode == 0 and "mount service running" in r.stdout, r.stderr
        info = json.loads(alice.cli("service", "status", "--json", env=env, check=True).stdout)
        assert info["running"]
        with open(f"/proc/{info['pid']}/status") as f:
            uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {str(alice.uid)}
        sock_dir = f"{alice.run_dir}/stargz-tui"
        assert stat.S_IMODE(os.stat(sock_dir).st_mode) == 0o700
        for layer in ("0", "merged"):
            mp = alice.mkdir(f"mnt-resident-{layer}")
            extra = [] if layer == "merged" else ["--layer", layer]
            r = alice.cli("mount", alice.image("mini-esgz"), mp, *extra, env=env)
            assert r.returncode == 0, r.stderr
            (m,) = alice.mounts()
            assert m["state"] == "serving"
            res = alice.check_tree(mp, "mini-esgz", layer)
            assert res["problems"] == [], "\n".join(res["problems"][:20])
            r = alice.cli("unmount", mp, env=env)
            assert r.returncode == 0, r.stderr
    finally:
        alice.cli("service", "stop", env=env)
