"""Mount manager life cycle through the real CLI: busy/force unmount, killed
daemons (stale records), idempotence, refusals, `mounts --json`, the cache,
EIO for a corrupted chunk, a chunk cache shared by two mounts."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import time

import anyio
import pytest
from fuse_helpers import FIXTURES, isolated_mount_env, walk

from core import mount as core_mount
from core.estargz import load_layer_index
from core.image import open_image

pytestmark = pytest.mark.fuse
IMAGE = f"oci:{FIXTURES}:mini-esgz-64k"


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    yield from isolated_mount_env(tmp_path, monkeypatch)


def _pids(rec_or_status) -> list[int]:
    return [e["pid"] for e in rec_or_status["layers"]]


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


def test_busy_unmount_fails_cleanly_then_force_succeeds(mount_env):
    mp = mount_env.mountpoint()
    r = mount_env.cli("mount", IMAGE, mp, check=True)
    assert "mounted" in r.stdout
    st = mount_env.status(mp)
    assert st["state"] == "serving" and st["kind"] == "merged"
    f = open(os.path.join(mp, "data/text.txt"), "rb")  # noqa: SIM115 - held open on purpose
    try:
        assert f.read(5)
        r = mount_env.cli("unmount", mp)
        assert r.returncode == 1
        assert "busy" in r.stderr and f"pid {os.getpid()}" in r.stderr
        assert "Traceback" not in r.stderr
        assert core_mount.is_mounted(mp)
        assert mount_env.status(mp)["state"] == "serving"  # nothing was torn down
        r = mount_env.cli("unmount", "--force", mp)
        assert r.returncode == 0, r.stderr
    finally:
        with contextlib.suppress(OSError):  # its mount was force-detached under it
            f.close()
    assert not core_mount.is_mounted(mp)
    assert all(_gone(p) for p in _pids(st))
    assert core_mount.list_mounts() == []
    # no private layer mounts left behind
    assert not [m for m in core_mount.mount_table() if m.startswith(str(mount_env.state))]


def test_merged_mount_is_one_daemon_and_one_fuse_mount(mount_env):
    """Issue 17 (B11/B12): every layer of a merged image is served by one
    process at the mountpoint itself: one pid, one FUSE mount, no overlay and
    no private layer mounts; `mounts` still lists each layer with its stats."""
    mp = mount_env.mountpoint()
    mount_env.cli("mount", IMAGE, mp, "--no-background-fetch", check=True)
    with open(os.path.join(mp, "data/text.txt"), "rb") as f:
        assert f.read(5)
    st = mount_env.status(mp)
    assert st["state"] == "serving" and st["kind"] == "merged" and st["overlay"] is None
    assert len(st["layers"]) == 2 and len(set(_pids(st))) == 1 and st["pids"] == [st["pid"]]
    assert [lay["index"] for lay in st["layers"]] == [0, 1]
    # each layer's own stats from the one daemon; the mount's are their sums
    assert all(lay["stats"]["chunksTotal"] > 0 for lay in st["layers"])
    assert st["chunksTotal"] == sum(lay["stats"]["chunksTotal"] for lay in st["layers"])
    ours = [m for m in core_mount.mount_table() if m == os.path.realpath(mp)
            or m.startswith(str(mount_env.state))]
    assert ours == [os.path.realpath(mp)]
    assert core_mount.mount_table()[os.path.realpath(mp)] == "fuse.stargz"
    r = mount_env.cli("mount", IMAGE, mount_env.mountpoint("second"), check=True)
    assert "2 layers merged" in r.stdout and re.search(r"\[daemon pid \d+\]$", r.stdout.strip())


def test_busy_raw_layer_cwd_is_reported(mount_env):
    mp = mount_env.mountpoint()
    mount_env.cli("mount", IMAGE, mp, "--layer", "0", check=True)
    holder = subprocess.Popen(["sleep", "60"], cwd=os.path.join(mp, "data"))
    try:
        r = mount_env.cli("unmount", mp)
        assert r.returncode == 1
        assert f"pid {holder.pid} (sleep: cwd)" in r.stderr
    finally:
        holder.kill()
        holder.wait(timeout=10)
    r = mount_env.cli("unmount", mp)
    assert r.returncode == 0, r.stderr
    assert not core_mount.is_mounted(mp)


def test_killed_daemon_is_stale_and_force_cleans(mount_env):
    mp = mount_env.mountpoint()
    mount_env.cli("mount", IMAGE, mp, "--layer", "1", check=True)
    st = mount_env.status(mp)
    pid = st["pid"]
    os.kill(pid, signal.SIGKILL)
    assert _gone(pid)
    with pytest.raises(OSError) as ei:
        os.listdir(mp)
    assert ei.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    r = mount_env.cli("mounts", "--json", check=True)
    listed = json.loads(r.stdout)
    assert [m["state"] for m in listed] == ["stale"]
    assert listed[0]["mountpoint"] == os.path.realpath(mp) and listed[0]["pid"] == pid
    r = mount_env.cli("mounts", check=True)
    assert "stale" in r.stdout
    r = mount_env.cli("unmount", "--force", mp)
    assert r.returncode == 0, r.stderr
    assert not core_mount.is_mounted(mp)
    assert os.listdir(mp) == []
    assert json.loads(mount_env.cli("mounts", "--json", check=True).stdout) == []


def test_killed_merged_daemon_force_cleans_everything(mount_env):
    mp = mount_env.mountpoint()
    mount_env.cli("mount", IMAGE, mp, check=True)
    st = mount_env.status(mp)
    os.kill(st["pids"][0], signal.SIGKILL)
    assert _gone(st["pids"][0])
    assert mount_env.status(mp)["state"] == "stale"
    r = mount_env.cli("unmount", "--force", mp)
    assert r.returncode == 0, r.stderr
    assert not core_mount.is_mounted(mp)
    assert all(_gone(p) for p in st["pids"])
    assert not [m for m in core_mount.mount_table() if m.startswith(str(mount_env.state))]


def test_unmount_is_idempotent_and_refuses_foreign_mounts(mount_env):
    mp = mount_env.mountpoint()
    mount_env.cli("mount", IMAGE, mp, "--layer", "0", check=True)
    assert mount_env.cli("unmount", mp).returncode == 0
    r = mount_env.cli("unmount", mp)  # issue 18: a path that is none of our mounts fails
    assert r.returncode == 1 and "not mounted" in r.stderr
    other = mount_env.mountpoint("tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", other], check=True, timeout=30)
    try:
        r = mount_env.cli("unmount", other)
        assert r.returncode == 1 and "not made by stargz-tui" in r.stderr
        assert core_mount.is_mounted(other)
    finally:
        subprocess.run(["umount", other], timeout=30)


def test_mount_refusals_are_one_line_errors(mount_env):
    mp = mount_env.mountpoint()
    r = mount_env.cli("mount", f"oci:{FIXTURES}:mini-gzip", mp, "--layer", "0")
    assert r.returncode == 1
    assert "cannot be read lazily" in r.stderr and "Traceback" not in r.stderr
    r = mount_env.cli("mount", f"oci:{FIXTURES}:mini-gzip", mp, "--layer", "0",
                      "--allow-unverified")
    assert r.returncode == 1 and "cannot be read lazily" in r.stderr
    assert not core_mount.is_mounted(mp) and core_mount.list_mounts() == []
    r = mount_env.cli("mount", IMAGE, str(mount_env.tmp / "nope"))
    assert r.returncode == 1 and "not a directory" in r.stderr
    r = mount_env.cli("mount", IMAGE, mp, "--layer", "7")
    assert r.returncode == 1 and "out of range" in r.stderr
    mount_env.cli("mount", IMAGE, mp, "--layer", "0", check=True)
    r = mount_env.cli("mount", IMAGE, mp, "--layer", "1")
    assert r.returncode == 1 and "already" in r.stderr
    assert len(core_mount.list_mounts()) == 1


def test_read_only_everywhere(mount_env):
    mp = mount_env.mountpoint()
    mount_env.mount(IMAGE, mp, layer=0)
    for op in (lambda: open(os.path.join(mp, "etc/os-release"), "r+b"),
               lambda: os.mkdir(os.path.join(mp, "newdir")),
               lambda: open(os.path.join(mp, "new-file"), "wb"),
               lambda: os.unlink(os.path.join(mp, "data/empty")),
               lambda: os.setxattr(os.path.join(mp, "data"), "user.x", b"1")):
        with pytest.raises(OSError) as ei:
            op()
        assert ei.value.errno == errno.EROFS
    st = os.stat(os.path.join(mp, "data/random.bin"))
    assert st.st_blksize >= 1 << 16


def test_mounts_json_reports_live_stats_and_cache_cli(mount_env):
    mp = mount_env.mountpoint()
    mount_env.mount(IMAGE, mp, layer=0, background_fetch=True, silence=0.1)
    st = mount_env.wait_for(mp, lambda s: s["backgroundFetchDone"])
    listed = json.loads(mount_env.cli("mounts", "--json", check=True).stdout)
    assert len(listed) == 1
    m = listed[0]
    for key in ("mountpoint", "image", "layers", "pid", "state", "bytesFetched", "chunksCached",
                "chunksTotal", "prefetchDone", "backgroundFetchDone"):
        assert key in m
    assert m["state"] == "serving" and m["prefetchDone"] and m["backgroundFetchDone"]
    assert m["chunksCached"] == m["chunksTotal"] > 0
    assert m["bytesFetched"] > 0 and st["pid"] == m["pid"]
    usage = json.loads(mount_env.cli("cache", "--json", check=True).stdout)
    assert usage["dir"] == str(mount_env.cache) and usage["chunks"] > 0
    assert mount_env.cli("cache", "prune").returncode == 1  # issue 18: live mount uses it
    r = mount_env.cli("cache", "prune", "--force", check=True)
    assert "removed" in r.stdout
    assert json.loads(mount_env.cli("cache", "--json", check=True).stdout)["chunks"] == 0
    # the mount keeps working (memory and network) after the prune
    with open(os.path.join(mp, "data/random.bin"), "rb") as f:
        assert len(f.read()) == 716803


def test_debug_traces_fuse_requests_in_the_daemon_log(mount_env):
    mp = mount_env.mountpoint()
    rec = mount_env.mount(IMAGE, mp, layer=0, debug=True)
    os.listdir(os.path.join(mp, "data"))
    log = rec["layers"][0]["log"]
    assert os.path.dirname(log).startswith(str(mount_env.state))
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline and "readdir" not in text:
        with open(log) as f:
            text = f.read()
        time.sleep(0.05)
    assert "serving" in text and "lookup" in text and "readdir" in text


def _corrupt_layout(dst) -> tuple[str, str]:
    """Copy the fixture layout; flip a byte inside one chunk of data/text.txt."""
    shutil.copytree(FIXTURES, dst)
    ref = f"oci:{dst}:mini-esgz-64k"

    async def find():
        img = await open_image(ref)
        d = img.layers[0]
        ix = await load_layer_index(img.store.blob_source(d.digest, d.size))
        e = ix.lookup("data/text.txt")
        chunks = ix.chunks(e)
        assert len(chunks) > 2
        c = chunks[2]
        return os.path.join(dst, "blobs", "sha256", d.digest[7:]), c

    path, c = anyio.run(find)
    with open(path, "r+b") as f:
        pos = (c.offset + c.end) // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))
    return ref, path


def test_corrupted_chunk_gives_eio_for_that_file_only(mount_env):
    ref, _ = _corrupt_layout(mount_env.tmp / "layout")
    mp = mount_env.mountpoint()
    mount_env.mount(ref, mp, layer=0, prefetch=False, background_fetch=False)
    for _ in range(2):  # a bad chunk is never cached: the second read fails too
        with open(os.path.join(mp, "data/text.txt"), "rb") as f:
            head = f.read(4096)  # the first chunk is fine
            assert len(head) == 4096
            with pytest.raises(OSError) as ei:
                f.seek(0)
                f.read()
            assert ei.value.errno == errno.EIO
    for name in ("etc/os-release", "data/random.bin", "usr/lib/app/mod_05.py"):
        with open(os.path.join(mp, name), "rb") as f:
            assert f.read()
    assert len(walk(mp)) > 40
    st = mount_env.status(mp)
    assert st["state"] == "serving"
    assert st["digestErrors"] >= 2


def test_two_mounts_of_one_image_share_the_chunk_cache(mount_env):
    a, b = mount_env.mountpoint("a"), mount_env.mountpoint("b")
    opts = dict(layer=0, prefetch=False, background_fetch=False)
    mount_env.mount(IMAGE, a, **opts)
    mount_env.mount(IMAGE, b, **opts)  # both mounted at once
    names = ["data/random.bin", "data/text.txt", "etc/os-release"]
    for n in names:
        with open(os.path.join(a, n), "rb") as f:
            data_a = f.read()
        assert data_a
    sa = mount_env.status(a)
    assert sa["bytesFetched"] > 0
    for n in names:
        with open(os.path.join(b, n), "rb") as f1, open(os.path.join(a, n), "rb") as f2:
            assert f1.read() == f2.read()
    sb = mount_env.status(b)
    assert sb["bytesFetched"] == 0 and sb["requests"] == 0
    assert sb["layers"][0]["stats"]["cache"]["hits"] > 0
