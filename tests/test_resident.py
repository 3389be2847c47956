"""The resident server (stargz_tui.resident) and the launcher that hands
``mount``/``unmount`` to it: real server process, real FUSE mounts from the
real registry, the client's environment, cwd and streams honoured, daemons
forked from the server, errors as one line, stale code and other users
refused, idle exit and auto-start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from fuse_helpers import (
    compare_tree,
    family,
    isolated_mount_env,
    layer_blobs,
    merged_expected,
    raw_expected,
)

from core import mount as core_mount

pytestmark = [pytest.mark.fuse, pytest.mark.registry]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def mount_env(tmp_path, monkeypatch, isolated_env):
    monkeypatch.setenv("STARGZ_TUI_SERVER", "use")
    env = isolated_mount_env(tmp_path, monkeypatch)
    value = next(env)
    try:
        yield value
    finally:
        _cli(["server", "stop"])
        for _ in range(100):
            if not _cli(["server", "status", "--json"]).stdout.count('"running": true'):
                break
            time.sleep(0.05)
        next(env, None)


def _cli(args, *, env=None, cwd=REPO_ROOT, timeout=120):
    """``stargz-tui ARGS`` through the launcher, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "stargz_tui", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env or dict(os.environ))


def _start_server():
    r = _cli(["server", "start"])
    assert r.returncode == 0, r.stderr
    info = json.loads(_cli(["server", "status", "--json"]).stdout)
    assert info["running"] and info["current"]
    return info


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def _arg_env_area(pid: int) -> list[str]:
    """arg_start, arg_end, env_start, env_end (/proc/PID/stat fields 48-51):
    the same only in processes of one exec (a fork), random per exec (ASLR)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        rest = f.read().rsplit(b")", 1)[1].split()
    return [v.decode() for v in rest[48 - 3: 52 - 3]]


def _forked_from_server(pid: int) -> bool:
    """The daemon is a fork of the running resident server, not a new
    interpreter (its command line names it as a layer daemon, issue 18)."""
    info = json.loads(_cli(["server", "status", "--json"]).stdout)
    return bool(info["running"]) and _arg_env_area(pid) == _arg_env_area(info["pid"]) and \
        _cmdline(pid).startswith("stargz-tui-daemon layer")


def test_mount_through_server_forks_daemon_and_serves_the_layer(mount_env, registry, tmp_path):
    info = _start_server()
    tag = "mini-esgz"
    # a relative mountpoint: the worker must use the client's cwd
    (tmp_path / "rel").mkdir()
    r = _cli(["mount", registry.ref(tag), "rel", "--layer", "0"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    mp = str(tmp_path / "rel")
    assert os.path.ismount(mp)
    rec = core_mount._find_record(os.path.realpath(mp))
    pid = rec["layers"][0]["pid"]
    # the daemon was forked from the server (no new interpreter for core.daemon)
    assert _forked_from_server(pid) and "core.daemon" not in _cmdline(pid)
    assert os.getsid(pid) == pid  # its own session: it outlives the server
    compare_tree(mp, raw_expected(layer_blobs(f"{family(tag)}-gzip")[0]))
    # the cache dir came from the client's environment
    st = mount_env.wait_for(mp, lambda s: s["backgroundFetchDone"], timeout=120)
    assert st["chunksCached"] == st["chunksTotal"]
    from core.cache import ChunkCache

    assert not ChunkCache(str(mount_env.cache)).is_empty()
    # stopping the server leaves the mount alone
    _cli(["server", "stop"])
    for _ in range(100):
        if not os.path.exists(f"/proc/{info['pid']}"):
            break
        time.sleep(0.05)
    assert os.path.ismount(mp)
    r = _cli(["unmount", mp])
    assert r.returncode == 0, r.stderr
    assert not os.path.ismount(mp)


def test_merged_mount_through_server_forks_every_daemon(mount_env, registry):
    _start_server()
    tag = "mini-esgz"
    mp = mount_env.mountpoint("merged")
    r = _cli(["mount", registry.ref(tag), mp])
    assert r.returncode == 0, r.stderr
    rec = core_mount._find_record(os.path.realpath(mp))
    truth = layer_blobs(f"{family(tag)}-gzip")
    assert rec["kind"] == "merged" and len(rec["layers"]) == len(truth) > 1
    for e in rec["layers"]:  # the image was resolved once, no daemon is a new interpreter
        assert _forked_from_server(e["pid"]), e
    compare_tree(mp, merged_expected(truth), drop_xattr_prefixes=("trusted.overlay.",))
    r = _cli(["unmount", mp])
    assert r.returncode == 0, r.stderr
    assert core_mount.list_mounts() == []
    # an image that cannot be resolved: one line, nothing left behind
    r = _cli(["mount", registry.ref("no-such-tag"), mp])
    assert r.returncode == 1 and r.stderr.startswith("stargz-tui: ")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert core_mount.list_mounts() == [] and not os.path.ismount(mp)


def test_errors_through_server_are_one_line(mount_env, registry, tmp_path):
    _start_server()
    mp = mount_env.mountpoint()
    r = _cli(["mount", registry.ref("no-such-tag"), mp, "--layer", "0"])
    assert r.returncode == 1
    assert r.stderr.startswith("stargz-tui: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    r = _cli(["mount"])  # a usage error comes back with argparse's status
    assert r.returncode == 2 and "required" in r.stderr
    # the same answer as without the server
    args = ["unmount", str(tmp_path / "nothing-here")]
    via, direct = _cli(args), _cli(args, env=dict(os.environ, STARGZ_TUI_SERVER="off"))
    assert (via.returncode, via.stdout, via.stderr) == \
        (direct.returncode, direct.stdout, direct.stderr)
    assert via.returncode == 1 and "not mounted" in via.stderr
    assert not os.path.ismount(mp)


def _ask(path: str, payload: dict) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    s.sendall(json.dumps(payload).encode() + b"\n")
    line = s.makefile("rb").readline()
    s.close()
    return json.loads(line)


def test_stale_code_and_other_users_are_refused(mount_env):
    info = _start_server()
    from stargz_tui.launcher import socket_path

    path = socket_path()
    # another user cannot even connect (0600 socket in a 0700 dir)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
            except PermissionError:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "another uid could connect"
    # a client running other code: the server runs nothing and exits
    resp = _ask(path, {"argv": ["mount", "x", "y"], "env": {}, "cwd": "/", "stamp": "old"})
    assert resp == {"stale": True}
    for _ in range(200):
        if not os.path.exists(f"/proc/{info['pid']}") or \
                open(f"/proc/{info['pid']}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail("a stale server kept running")
    assert json.loads(_cli(["server", "status", "--json"]).stdout)["running"] is False


def test_idle_server_exits_and_mount_starts_one(mount_env, registry, monkeypatch):
    monkeypatch.setenv("STARGZ_TUI_SERVER_IDLE", "1")
    info = _start_server()
    for _ in range(200):  # exits after 1 idle second (checked every 2 s)
        if json.loads(_cli(["server", "status", "--json"]).stdout)["running"] is False:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"idle server {info['pid']} did not exit")
    # "off": no server is used or started
    env = dict(os.environ, STARGZ_TUI_SERVER="off")
    mp = mount_env.mountpoint("a")
    assert _cli(["mount", registry.ref("mini-esgz"), mp, "--layer", "0"], env=env).returncode == 0
    assert json.loads(_cli(["server", "status", "--json"]).stdout)["running"] is False
    # "auto": a mount without a server starts one for the next time
    env = dict(os.environ, STARGZ_TUI_SERVER="auto", STARGZ_TUI_SERVER_IDLE="60")
    mp2 = mount_env.mountpoint("b")
    assert _cli(["mount", registry.ref("mini-esgz"), mp2, "--layer", "0"], env=env).returncode == 0
    for _ in range(300):
        st = json.loads(_cli(["server", "status", "--json"]).stdout)
        if st["running"]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("mount did not start a server")
    # and the next mount goes through it
    mp3 = mount_env.mountpoint("c")
    assert _cli(["mount", registry.ref("mini-esgz"), mp3, "--layer", "0"], env=env).returncode == 0
    pid = core_mount._find_record(os.path.realpath(mp3))["layers"][0]["pid"]
    assert _forked_from_server(pid)
    for m in (mp, mp2, mp3):
        assert _cli(["unmount", m]).returncode == 0


def test_ctrl_c_reaches_the_worker_and_cleans_up(mount_env):
    """SIGINT to the client (what Ctrl-C sends) is passed to the worker: the
    half-done mount is torn down, its daemon stopped, the exit status 130."""
    _start_server()
    hang = socket.socket()  # a "registry" that accepts and never answers
    hang.bind(("127.0.0.1", 0))
    hang.listen(8)
    hang.settimeout(60)
    mp = mount_env.mountpoint()
    ref = f"127.0.0.1:{hang.getsockname()[1]}/slow/app:v1"
    p = subprocess.Popen([sys.executable, "-m", "stargz_tui", "mount", ref, mp, "--layer", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=REPO_ROOT)
    conns = []
    try:
        conns.append(hang.accept()[0])  # the forked daemon is resolving the image
        for _ in range(200):  # the worker records the daemon right after forking it
            rec = core_mount._find_record(os.path.realpath(mp))
            if rec and rec["layers"] and rec["layers"][0]["pid"]:
                break
            time.sleep(0.02)
        daemon = rec["layers"][0]["pid"]
        assert _forked_from_server(daemon)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
        for c in conns:
            c.close()
        hang.close()
    assert p.returncode == 130, (out, err)
    assert err.strip() == "stargz-tui: interrupted"
    assert core_mount._find_record(os.path.realpath(mp)) is None
    assert not os.path.ismount(mp)
    for _ in range(200):
        if not os.path.exists(f"/proc/{daemon}"):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"daemon {daemon} outlived the interrupted mount")


def test_launcher_wire_format_is_the_json_the_server_reads_and_writes():
    """The launcher encodes its request and reads the server's answers
    without the json module (startup cost): what it writes must be what
    json.loads reads back, for any string a command line, environment or
    path can hold, and it must take the server's json.dumps lines and no
    others."""
    from stargz_tui.launcher import _int_field, _json_request

    odd = ["plain", "", "quote\" back\\slash", "tab\tnewline\ncr\r", "\x00\x1f\x7f",
           "ünïcødé ✓ 🐳", os.fsdecode(b"\xff\xfe surrogate-escaped"), "</script>", "a=b=c"]
    req = {"argv": ["mount", *odd], "env": dict(zip(odd, reversed(odd), strict=True)),
           "cwd": odd[5], "stamp": "py:/x:3:42"}
    line = _json_request(req)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == req
    for key, n in (("pid", 4242), ("rc", 0), ("rc", 130), ("rc", -1)):
        assert _int_field(json.dumps({key: n}).encode() + b"\n", key) == n
    for bad in (b'{"stale": true}\n', b'{"refused": "bad request"}\n', b"", b'{"pid": x}\n',
                b'{"rc": 1}\n'):
        assert _int_field(bad, "pid") is None


def test_busy_unmount_through_server_does_not_name_the_client(mount_env, tmp_path):
    """The worker runs in the client's cwd with its stdio: a mount kept busy
    by them is said so, the client (our own process) is never named."""
    _start_server()
    mp = mount_env.mountpoint()
    image = f"oci:{os.path.join(REPO_ROOT, 'tests', 'fixtures', 'estargz-oci')}:mini-esgz"
    assert _cli(["mount", image, mp, "--layer", "0"]).returncode == 0
    r = _cli(["unmount", mp], cwd=os.path.join(mp, "data"))
    assert r.returncode == 1 and "working directory of this command" in r.stderr, r.stderr
    assert "pid " not in r.stderr and r.stderr.count("\n") == 1
    with open(os.path.join(mp, "etc/os-release"), "rb") as stdin:
        r = subprocess.run([sys.executable, "-m", "stargz_tui", "unmount", mp], stdin=stdin,
                           capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert r.returncode == 1 and "standard input of this command" in r.stderr, r.stderr
    assert "pid " not in r.stderr
    assert os.path.ismount(mp)
    assert _cli(["unmount", mp]).returncode == 0
