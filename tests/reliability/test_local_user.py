"""A second, unprivileged local user against root's stargz-tui.

The attacker is a real plain user made with ``useradd`` for this module
(removed after); its steps run through ``setpriv`` with the system Python or
plain shell, never the project (which lives under root's 0700 home). Root's
side is the real CLI in subprocesses.

* The runtime dir's fallback ``$TMPDIR/stargz-tui-$UID`` is planted first (a
  symlink to a root-owned directory, or a directory of the attacker's): root's
  mount must neither chmod nor write anything through it, and must still
  work, from a private directory of its own.
* A socket in root's runtime dir is listened on by the attacker (root binds
  it, the attacker calls ``listen``/``connect`` on the passed descriptor, so
  ``SO_PEERCRED`` names the attacker): root's CLI, ``service status`` and
  the mount manager send it nothing and say so in one line; a daemon's control
  socket answers nothing to the attacker even with its permissions loosened.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest
from cli_helpers import stargz_cli

from core import mount as core_mount
from core.errors import MountError

pytestmark = [pytest.mark.reliability, pytest.mark.fuse]

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.abspath(os.path.join(HERE, "..", "fixtures", "estargz-oci"))
REF = f"oci:{FIXTURES}:mini-esgz"
SYSTEM_PYTHON = "/usr/bin/python3"


class Intruder:
    def __init__(self, name: str):
        pw = pwd.getpwnam(name)
        self.name, self.uid, self.gid = name, pw.pw_uid, pw.pw_gid

    def argv(self, *cmd: str) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                "--", *cmd]

    def sh(self, script: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv("/bin/sh", "-c", script, "sh", *args),
                              capture_output=True, text=True, timeout=30,
                              env={"PATH": "/usr/bin:/bin"}, cwd="/")

    def python(self, code: str, *args: str, pass_fds=()) -> subprocess.Popen:
        return subprocess.Popen(self.argv(SYSTEM_PYTHON, "-c", code, *args), pass_fds=pass_fds,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={"PATH": "/usr/bin:/bin"}, cwd="/")


def _retry(argv: list[str], ok=(0,)) -> int:
    """useradd/userdel fail while another process holds /etc/passwd's lock."""
    rc = -1
    for _ in range(40):
        rc = subprocess.run(argv, capture_output=True).returncode
        if rc in ok:
            return rc
        time.sleep(0.25)
    return rc


@pytest.fixture(scope="module")
def intruder():
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("setpriv"):
        pytest.fail("needs root, useradd and setpriv to make a second local user "
                    "(CI runs as root on Debian)")
    name = f"sgzfs{os.getpid() % 100000}"
    rc = _retry(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                 "--user-group", name], ok=(0, 9))
    assert rc in (0, 9), f"useradd {name} failed ({rc})"
    try:
        yield Intruder(name)
    finally:
        _retry(["userdel", name], ok=(0, 6))


@pytest.fixture
def shared_tmp():
    """A world-writable temp dir the intruder can reach (/tmp itself is left alone)."""
    d = tempfile.mkdtemp(prefix="sgzfs-shared-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _root_env(tmp_path, tmpdir: str) -> dict:
    env = dict(os.environ)
    for k in ("XDG_RUNTIME_DIR", "STARGZ_TUI_RUNTIME_DIR", "TEMP", "TMP"):
        env.pop(k, None)
    env.update({"TMPDIR": tmpdir, "STARGZ_TUI_SERVER": "off",
                "STARGZ_TUI_STATE_DIR": str(tmp_path / "state"),
                "STARGZ_TUI_CACHE_DIR": str(tmp_path / "cache")})
    return env


def _tree(d: str) -> dict:
    out = {}
    for root, dirs, files in os.walk(d):
        for n in [root, *[os.path.join(root, x) for x in dirs + files]]:
            st = os.lstat(n)
            out[os.path.relpath(n, d)] = (st.st_uid, stat.S_IMODE(st.st_mode))
    return out


def _records(env: dict) -> list[dict]:
    d = os.path.join(env["STARGZ_TUI_STATE_DIR"], "mounts")
    out = []
    for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
        if name.endswith(".json"):
            with open(os.path.join(d, name)) as f:
                out.append(json.load(f))
    return out


@pytest.mark.parametrize("plant", ["symlink", "own-dir"])
@pytest.mark.parametrize("sticky", [True, False], ids=["sticky-tmpdir", "plain-tmpdir"])
def test_planted_runtime_dir_fallback(intruder, shared_tmp, tmp_path, plant, sticky, rel):
    os.chmod(shared_tmp, 0o1777 if sticky else 0o777)
    victim = tempfile.mkdtemp(prefix="sgzfs-victim-", dir=shared_tmp)
    os.chmod(victim, 0o755)
    with open(os.path.join(victim, "keep"), "w") as f:
        f.write("root's\n")
    name = os.path.join(shared_tmp, f"stargz-tui-{os.getuid()}")
    r = intruder.sh('ln -s "$1" "$2"' if plant == "symlink" else 'mkdir -m 777 "$2"',
                    victim, name)
    assert r.returncode == 0, r.stderr
    victim_before = _tree(victim)
    planted_before = os.lstat(name)
    env = _root_env(tmp_path, shared_tmp)
    mp = tmp_path / "mnt"
    mp.mkdir()
    alternative = None
    try:
        r = stargz_cli("mount", REF, str(mp), "--layer", "0", env=env)
        assert r.returncode == 0, r.stderr
        assert (mp / "etc" / "os-release").is_file()
        control = _records(env)[0]["layers"][0]["control"]
        alternative = os.path.dirname(control)
        st = os.lstat(alternative)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
        assert os.path.realpath(alternative) == alternative
        assert not alternative.startswith((name, victim))
    finally:
        u = stargz_cli("unmount", "--force", str(mp), env=env)
        assert u.returncode == 0, u.stderr
        if alternative and alternative.startswith("/tmp/stargz-tui-"):
            shutil.rmtree(alternative, ignore_errors=True)
    assert _tree(victim) == victim_before
    after = os.lstat(name)
    assert (after.st_uid, after.st_mode) == (planted_before.st_uid, planted_before.st_mode)
    if plant == "own-dir":
        assert os.listdir(name) == []
    rel.row("security", f"runtime dir fallback `$TMPDIR/stargz-tui-0` planted by another user "
            f"({'a symlink to a root-owned dir' if plant == 'symlink' else 'a dir of theirs'}; "
            f"{'sticky' if sticky else 'non-sticky'} $TMPDIR), then root mounts",
            "nothing chmodded or written through it; root's mount works from a fresh private "
            "/tmp/stargz-tui-0-XXXX dir recorded in its state dir")


# -- sockets served by the other user ------------------------------------------------
LISTENER = r"""
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
s.listen(4)
s.settimeout(60)
print("listening", flush=True)
c, _ = s.accept()
c.settimeout(5)
got = b""
try:
    while True:
        piece = c.recv(65536)
        if not piece:
            break
        got += piece
        if got.endswith(b"\n"):
            c.sendall(b'{"pid": 1}\n{"ok": true, "pid": 1, "rc": 0}\n{"rc": 0}\n')
except OSError:
    pass
sys.stdout.write("received %d bytes\n" % len(got))
sys.stdout.write(got.decode("latin-1"))
"""


@contextlib.contextmanager
def _listened_by(intruder: Intruder, path: str):
    """A Unix socket bound at ``path`` by root and listened on by the intruder."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    proc = intruder.python(LISTENER, str(s.fileno()), pass_fds=(s.fileno(),))
    try:
        assert proc.stdout.readline().strip() == b"listening", proc.stderr.read()
        yield proc
    finally:
        s.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _received(proc: subprocess.Popen) -> bytes:
    out, _ = proc.communicate(timeout=30)
    return out


@pytest.mark.parametrize("command", [["mount", REF, "MP", "--layer", "0"], ["service", "status"]],
                         ids=["mount", "service-status"])
def test_service_socket_served_by_another_user(intruder, tmp_path, command, rel):
    run = tempfile.mkdtemp(prefix="sgzfs-run-")
    env = _root_env(tmp_path, "/tmp")
    env.update({"STARGZ_TUI_RUNTIME_DIR": run, "STARGZ_TUI_SERVER": "use",
                "STARGZ_TUI_TOKEN_CANARY": "s3cr3t-canary"})
    mp = tmp_path / "mnt"
    mp.mkdir()
    argv = [str(mp) if a == "MP" else a for a in command]
    try:
        with _listened_by(intruder, os.path.join(run, "service.sock")) as proc:
            r = stargz_cli(*argv, env=env, timeout=60)
        got = _received(proc)
    finally:
        shutil.rmtree(run, ignore_errors=True)
    assert b"canary" not in got and got.startswith(b"received 0 bytes"), got[:300]
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, (r.returncode, r.stdout, r.stderr)
    assert f"uid {intruder.uid}" in lines[0] and "refusing" in lines[0], lines
    assert not core_mount.is_mounted(str(mp))
    rel.row("security", f"`stargz-tui {' '.join(command[:2]).replace(REF, 'IMAGE')}` when "
            "service.sock in the runtime dir is listened on by another user",
            f"nothing sent (no environment, no fds); exit {r.returncode}, one line: "
            f"{lines[0][:100]}")


def test_daemon_socket_served_by_another_user(intruder, tmp_path, rel):
    run = tempfile.mkdtemp(prefix="sgzfs-run-")
    path = os.path.join(run, "fake-0.sock")
    try:
        with _listened_by(intruder, path) as proc:
            with pytest.raises(MountError) as ei:
                core_mount.daemon_request(path, "stats", token="s3cr3t-canary")
        got = _received(proc)
    finally:
        shutil.rmtree(run, ignore_errors=True)
    assert got.startswith(b"received 0 bytes"), got[:300]
    assert f"uid {intruder.uid}" in str(ei.value) and "\n" not in str(ei.value)
    rel.row("security", "a daemon control socket listened on by another user (core.mount "
            "daemon_request: `mounts`, `unmount`)",
            f"nothing sent; MountError: {str(ei.value)[:100]}")


CONNECTOR = r"""
import socket, sys
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.settimeout(10)
c.connect(sys.argv[1])
got = b""
try:
    c.sendall(b'{"op": "shutdown", "unmount": true}\n')  # EPIPE once it hung up on us
    while True:
        piece = c.recv(65536)
        if not piece:
            break
        got += piece
except OSError:
    pass
print(repr(got))
"""


def test_daemon_refuses_another_users_connection(intruder, tmp_path, monkeypatch, rel):
    sys.path.insert(0, os.path.dirname(HERE))
    from fuse_helpers import isolated_mount_env

    gen = isolated_mount_env(tmp_path, monkeypatch)
    env = next(gen)
    try:
        mp = env.mountpoint()
        env.mount(REF, mp, layer=0)
        control = core_mount._read_records()[0]["layers"][0]["control"]
        # loosen what normally keeps the intruder out, so the socket's own check is tested
        os.chmod(os.path.dirname(control), 0o711)
        os.chmod(control, 0o666)
        p = subprocess.run(intruder.argv(SYSTEM_PYTHON, "-c", CONNECTOR, control),
                           capture_output=True, text=True, timeout=30,
                           env={"PATH": "/usr/bin:/bin"}, cwd="/")
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == "b''", p.stdout
        time.sleep(0.3)
        assert core_mount.is_mounted(mp)
        st = core_mount.daemon_request(control, "stats")["stats"]
        assert st["pid"] == core_mount._read_records()[0]["layers"][0]["pid"]
        assert os.path.isfile(os.path.join(mp, "etc", "os-release"))
    finally:
        with contextlib.suppress(StopIteration):
            next(gen)
    rel.row("security", "another user connects to a daemon's control socket (its 0600 mode "
            "and 0700 dir loosened for the test) and asks it to shut down",
            "refused by SO_PEERCRED: no answer, the mount keeps serving")
