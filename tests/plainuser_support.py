"""Plain (non-root) users for the rootless tests (issue 13).

The test suite runs as root; these helpers let it run stargz-tui as a fresh
unprivileged account, the way a person at a desk would:

* :func:`ensure_user` creates a plain user (``useradd -m``: a home under
  /home, subordinate uid/gid ranges in /etc/subuid, /etc/subgid) once per
  machine and gives it a private runtime dir (its ``XDG_RUNTIME_DIR``).
* :func:`fuse_device_for_users` gives ``/dev/fuse`` Debian's default mode
  0666 when it is stricter (CI images ship it 0600); nothing else about the
  machine is changed.
* :class:`Install` copies the project (working tree minus .venv, .git,
  caches) to a root-owned, world-readable directory and builds a virtualenv
  there on a Python interpreter that plain users can execute (the test
  interpreter may live under /root, which is 0700): the test venv's
  site-packages are copied in (same Python minor version, so the compiled
  wheels fit) and the copied tree is put on its path with a ``.pth`` file.
* :class:`PlainUser.run` runs a command as that user through
  ``runuser -u USER -- env -i ...``: a clean environment holding only HOME,
  XDG_RUNTIME_DIR, PATH, LANG (and what the test adds), so nothing of
  root's (state dirs, keyring, registries config) leaks in.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def fuse_device_for_users() -> None:
    """``/dev/fuse`` at Debian's default 0666 when it is stricter."""
    st = os.stat("/dev/fuse")
    if st.st_mode & 0o666 != 0o666:
        os.chmod("/dev/fuse", (st.st_mode & 0o7777) | 0o666)


def ensure_user(name: str) -> pwd.struct_passwd:
    """A plain user ``name`` with a home under /home and subordinate ids."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-d", f"/home/{name}", "-s", "/bin/sh", name],
                       check=True, capture_output=True, timeout=60)
        pw = pwd.getpwnam(name)
    if not subordinate_range("/etc/subuid", name):
        # useradd allocates ranges only where login.defs says so
        first = 200000 + (pw.pw_uid % 1000) * 65536
        subprocess.run(["usermod", "--add-subuids", f"{first}-{first + 65535}",
                        "--add-subgids", f"{first}-{first + 65535}", name],
                       check=True, capture_output=True, timeout=60)
    run_dir = f"/run/user/{pw.pw_uid}"
    if not os.path.isdir(run_dir):
        os.makedirs("/run/user", mode=0o755, exist_ok=True)
        os.mkdir(run_dir, 0o700)
    os.chown(run_dir, pw.pw_uid, pw.pw_gid)
    os.chmod(run_dir, 0o700)
    return pw


def subordinate_range(path: str, name: str) -> tuple[int, int] | None:
    """The first ``(start, count)`` range of ``name`` in /etc/subuid or /etc/subgid."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[0] == name:
                    return int(parts[1]), int(parts[2])
    except OSError:
        pass
    return None


def _usable_interpreter(probe_user: str) -> str:
    """A python of this minor version that ``probe_user`` can execute."""
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [os.path.realpath(sys.executable), os.path.join(sys.base_prefix, "bin",
                                                                  f"python{ver}"),
                  f"/usr/bin/python{ver}", f"/usr/local/bin/python{ver}"]
    for exe in candidates:
        if not os.path.exists(exe):
            continue
        r = subprocess.run(["runuser", "-u", probe_user, "--", exe, "-c",
                            "import sys; print(sys.version_info[:2])"],
                           capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return exe
    raise RuntimeError(f"no python{ver} that {probe_user} can run (tried {candidates}); "
                       f"install python{ver} (Debian: python3)")


class Install:
    """The project copied where plain users can read it, with a venv."""

    def __init__(self, probe_user: str):
        self.root = tempfile.mkdtemp(prefix="stargz-tui-plainuser-", dir="/var/tmp")
        os.chmod(self.root, 0o755)
        self.src = os.path.join(self.root, "src")
        self.venv = os.path.join(self.root, "venv")
        shutil.copytree(REPO, self.src, symlinks=True,
                        ignore=lambda d, names: [n for n in names if n in SKIP_DIRS])
        base = _usable_interpreter(probe_user)
        subprocess.run([base, "-m", "venv", "--without-pip", self.venv], check=True,
                       capture_output=True, timeout=120)
        site_from = sysconfig.get_path("purelib")
        r = subprocess.run([os.path.join(self.venv, "bin", "python"), "-c",
                            "import sysconfig; print(sysconfig.get_path('purelib'))"],
                           check=True, capture_output=True, text=True, timeout=60)
        site_to = r.stdout.strip()
        for name in os.listdir(site_from):
            if name.startswith("__editable__") or name.startswith("stargz_tui") \
                    or name in ("__pycache__",):
                continue  # the editable install points into the 0700 tree
            s, d = os.path.join(site_from, name), os.path.join(site_to, name)
            if os.path.isdir(s):
                shutil.copytree(s, d, symlinks=True, dirs_exist_ok=True)
            else:
                shutil.copy2(s, d)
        with open(os.path.join(site_to, "stargz_tui_src.pth"), "w") as f:
            f.write(self.src + "\n")
        subprocess.run(["chmod", "-R", "a+rX", self.root], check=True, timeout=120)
        self.python = os.path.join(self.venv, "bin", "python")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


class PlainUser:
    """Runs commands as one plain user with the :class:`Install`."""

    def __init__(self, name: str, install: Install):
        self.pw = ensure_user(name)
        self.name = name
        self.uid, self.gid = self.pw.pw_uid, self.pw.pw_gid
        self.home = self.pw.pw_dir
        self.install = install
        self.run_dir = f"/run/user/{self.uid}"

    @property
    def env(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name,
                "XDG_RUNTIME_DIR": self.run_dir, "LANG": "C.UTF-8",
                "PATH": os.path.dirname(self.install.python) + ":" + DEFAULT_PATH,
                "STARGZ_TUI_SERVER": "off"}

    def run(self, argv: list[str], *, env: dict | None = None, input: str | None = None,
            timeout: float = 180, cwd: str | None = None,
            root_setup: str | None = None) -> subprocess.CompletedProcess:
        """``argv`` as this user, in a clean environment (``env`` adds to it).
        ``root_setup``: shell commands run first as root in a private mount
        namespace that the command then runs in (to hide or replace a system
        file for this one command, e.g. ``mount --bind /dev/null /usr/bin/x``)."""
        full = dict(self.env, **(env or {}))
        cmd = ["runuser", "-u", self.name, "--", "env", "-i",
               *(f"{k}={v}" for k, v in full.items()), *argv]
        if root_setup:
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                   root_setup + '\nexec "$@"', "sh", *cmd]
        return subprocess.run(cmd, input=input, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd or self.home)

    def cli(self, *args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
        """``stargz-tui ARGS`` as this user."""
        r = self.run([self.install.python, "-m", "stargz_tui", *args], **kw)
        if check and r.returncode != 0:
            raise AssertionError(f"{self.name}: stargz-tui {' '.join(args)} exited "
                                 f"{r.returncode}: {r.stderr.strip()}")
        return r

    def python(self, code: str, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run([self.install.python, "-c", code, *args], **kw)

    def check_tree(self, mountpoint: str, tag: str, layer: str = "merged",
                   uid_map=(), gid_map=()) -> dict:
        """:func:`check_tree` run as her on ``mountpoint``."""
        script = os.path.join(self.install.src, "tests", "plainuser_support.py")
        r = self.run([self.install.python, script, mountpoint, tag, str(layer),
                      json.dumps({"uid": list(map(str, uid_map)),
                                  "gid": list(map(str, gid_map))})])
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout)

    def image(self, tag: str) -> str:
        """The fixture layout's ``tag`` as an ``oci:`` reference she can read."""
        return f"oci:{self.install.src}/tests/fixtures/estargz-oci:{tag}"

    def spawn(self, argv: list[str], *, env: dict | None = None,
              **kw) -> subprocess.Popen:
        """A long-running process of hers (``setpriv`` execs in place, so the
        Popen's pid is her process's, which the caller stops)."""
        full = dict(self.env, **(env or {}))
        return subprocess.Popen(["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}",
                                 "--init-groups", "env", "-i",
                                 *(f"{k}={v}" for k, v in full.items()), *argv],
                                cwd=self.home, start_new_session=True, **kw)

    def start_secret_service(self) -> tuple[dict, list[subprocess.Popen]]:
        """Her own D-Bus session with gnome-keyring's Secret Service, unlocked
        (as tests/registry_helpers.SecretServiceSession does for root): the
        env to use and the processes to stop."""
        procs = []
        bus = self.spawn(["dbus-daemon", "--session", "--nofork", "--nopidfile",
                          "--print-address=1"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        procs.append(bus)
        address = bus.stdout.readline().decode().strip()
        assert address, "dbus-daemon did not print its address"
        env = {"DBUS_SESSION_BUS_ADDRESS": address,
               "PYTHON_KEYRING_BACKEND": "keyring.backends.SecretService.Keyring"}
        gk = self.spawn(["gnome-keyring-daemon", "--foreground", "--unlock",
                         "--components=secrets"], env=env, stdin=subprocess.PIPE,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(gk)
        gk.stdin.write(b"her-own-keyring-password")
        gk.stdin.close()
        probe = ("import secretstorage; c = secretstorage.get_default_collection("
                 "secretstorage.dbus_init()); assert not c.is_locked()")
        for _ in range(100):  # bounded: ~20 s
            if self.python(probe, env=env, timeout=30).returncode == 0:
                return env, procs
            time.sleep(0.2)
        stop_all(procs)
        raise AssertionError(f"{self.name}'s Secret Service did not come up")

    def mkdir(self, rel: str) -> str:
        """A directory of hers under her home (an empty mountpoint)."""
        path = os.path.join(self.home, rel)
        r = self.run(["mkdir", "-p", path])
        assert r.returncode == 0, r.stderr
        return path

    def mounts(self) -> list[dict]:
        r = self.cli("mounts", "--json", check=True)
        return json.loads(r.stdout)

    def cleanup(self) -> None:
        """Unmount (forced) every mount she has; detach what is left in her home."""
        try:
            mounts = self.mounts()
        except (AssertionError, ValueError, subprocess.TimeoutExpired):
            mounts = []
        for m in mounts:
            self.cli("unmount", "--force", m["mountpoint"])
        table = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 4 and parts[4].startswith(self.home + "/"):
                    table.append(parts[4])
        for mp in sorted(table, key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True, timeout=30)


# -- ground truth as she sees it (runs as the plain user: ``python -m`` below) --------
def map_id(ranges, i: int) -> int:
    """``C:H:N`` ranges applied to one id (first match; unchanged if none),
    written here independently of core.idmap."""
    for r in ranges:
        c, h, n = (int(x) for x in str(r).split(":"))
        if c <= i < c + n:
            return h + i - c
    return i


def _may(node, uid: int, gids: set[int], bits: int) -> bool:
    """Unix permission check of ``bits`` (4 r, 2 w, 1 x) on an expected node."""
    if node.mode is None:
        return True  # a directory the tar leaves implicit: 0755
    if uid == node.uid:
        have = node.mode >> 6
    elif node.gid in gids:
        have = node.mode >> 3
    else:
        have = node.mode
    return have & bits == bits


def check_tree(root: str, tag: str, layer: str, uid_map=(), gid_map=()) -> dict:
    """Walk ``root`` as the calling user and compare every path, type, mode,
    owner (through the maps), size, byte, link, device and xattr with the
    -gzip ground truth of fixture ``tag`` (or the tars ``/a.tar,/b.tar``); paths the expected modes deny her must
    answer EACCES. Returns ``{"problems", "denied", "files", "bytes"}``."""
    import hashlib
    import stat as st_
    from pathlib import Path

    from fuse_helpers import layer_blobs, merged_expected, raw_expected

    if tag.startswith("/"):  # the source tars themselves, bottom layer first
        truth = [Path(p) for p in tag.split(",")]
    else:
        truth = layer_blobs(tag.split("-", 1)[0] + "-gzip")
    expected = merged_expected(truth) if layer == "merged" else raw_expected(truth[int(layer)])
    for n in expected.values():
        if n.uid is not None:
            n.uid, n.gid = map_id(uid_map, n.uid), map_id(gid_map, n.gid)
    uid, gids = os.getuid(), set(os.getgroups()) | {os.getgid()}
    types = ((st_.S_ISDIR, "dir"), (st_.S_ISREG, "reg"), (st_.S_ISLNK, "symlink"),
             (st_.S_ISCHR, "char"), (st_.S_ISBLK, "block"), (st_.S_ISFIFO, "fifo"))
    problems, denied, files, nbytes = [], [], 0, 0
    seen: dict[str, os.stat_result] = {}
    todo = [""]
    for _ in range(100000):
        if not todo:
            break
        rel = todo.pop()
        try:
            with os.scandir(os.path.join(root, rel)) as it:
                names = [de.name for de in it]
        except PermissionError:
            denied.append(rel)
            continue
        for name in names:
            p = f"{rel}/{name}" if rel else name
            seen[p] = s = os.lstat(os.path.join(root, p))
            if st_.S_ISDIR(s.st_mode):
                todo.append(p)
    want_denied = []
    for p, n in sorted(expected.items()):
        parent = p.rsplit("/", 1)[0] if "/" in p else ""
        if any(p.startswith(d + "/") for d in want_denied):
            continue  # under a directory she may not list
        if n.type == "dir" and not (_may(n, uid, gids, 4) and _may(n, uid, gids, 1)):
            want_denied.append(p)
        elif n.type == "reg" and not _may(n, uid, gids, 4):
            want_denied.append(p)
        s = seen.get(p)
        if s is None:
            problems.append(f"{p}: missing (parent {parent or '/'})")
            continue
        full = os.path.join(root, p)
        t = next((name for test, name in types if test(s.st_mode)), "?")
        if t != n.type:
            problems.append(f"{p}: type {t} != {n.type}")
            continue
        if n.mode is not None and n.type != "symlink" and st_.S_IMODE(s.st_mode) != n.mode:
            problems.append(f"{p}: mode {oct(st_.S_IMODE(s.st_mode))} != {oct(n.mode)}")
        if n.uid is not None and (s.st_uid, s.st_gid) != (n.uid, n.gid):
            problems.append(f"{p}: owner {s.st_uid}:{s.st_gid} != {n.uid}:{n.gid}")
        if n.mtime is not None and int(s.st_mtime) != n.mtime:
            problems.append(f"{p}: mtime {int(s.st_mtime)} != {n.mtime}")
        if n.type == "reg":
            if s.st_size != n.size:
                problems.append(f"{p}: size {s.st_size} != {n.size}")
            try:
                with open(full, "rb") as f:
                    data = f.read()
            except PermissionError:
                if p not in want_denied:
                    problems.append(f"{p}: EACCES, but mode {oct(n.mode)} "
                                    f"{n.uid}:{n.gid} lets uid {uid} read it")
                denied.append(p)
            else:
                if p in want_denied:
                    problems.append(f"{p}: readable, but its mode should deny uid {uid}")
                files += 1
                nbytes += len(data)
                if hashlib.sha256(data).hexdigest() != n.sha256:
                    problems.append(f"{p}: content differs")
        if n.type == "symlink" and os.readlink(full) != n.link:
            problems.append(f"{p}: link {os.readlink(full)!r} != {n.link!r}")
        if n.rdev is not None and (os.major(s.st_rdev), os.minor(s.st_rdev)) != n.rdev:
            problems.append(f"{p}: rdev differs")
        if n.type != "symlink" and n.mode is not None:
            have = {}
            for k in os.listxattr(full, follow_symlinks=False):
                have[k] = os.getxattr(full, k, follow_symlinks=False)
            # the kernel keeps trusted.* from plain users; overlays keep theirs
            want = {k.decode("utf-8", "surrogateescape"): v for k, v in (n.xattrs or {}).items()
                    if not k.startswith(b"trusted.")}
            have = {k: v for k, v in have.items() if not k.startswith("trusted.")}
            if have != want:
                problems.append(f"{p}: xattrs {have} != {want}")
        if n.hardlink_to is not None and n.hardlink_to in seen \
                and seen[n.hardlink_to].st_ino != s.st_ino:
            problems.append(f"{p}: not the same inode as {n.hardlink_to}")
    extra = sorted(set(seen) - set(expected))
    if extra:
        problems.append(f"not in the ground truth: {extra[:10]}")
    if sorted(denied) != sorted(want_denied):
        problems.append(f"EACCES on {sorted(denied)}, expected on {sorted(want_denied)}")
    return {"problems": problems, "denied": sorted(denied), "files": files, "bytes": nbytes}


if __name__ == "__main__":  # as the plain user: python plainuser_support.py ROOT TAG LAYER MAPS
    _maps = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    print(json.dumps(check_tree(sys.argv[1], sys.argv[2], sys.argv[3],
                                _maps.get("uid", ()), _maps.get("gid", ()))))
