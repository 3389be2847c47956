"""What stops a plain user's mount is said in one line naming the fix
(issue 13). Each cause is real: /dev/fuse's mode, or a system file hidden
or replaced for one command in a private mount namespace (/dev without
fuse, fusermount3 gone or not setuid, an /etc/fuse.conf without
user_allow_other or with mount_max = 0), a root-owned mountpoint; a PATH
without fuse-overlayfs no longer stops a merged mount."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

import pytest

pytestmark = pytest.mark.fuse


def _one_line_error(r) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("stargz-tui: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr.strip()


@pytest.fixture
def scratch():
    """A root-owned directory plain users can read (for files bound over system ones)."""
    d = tempfile.mkdtemp(prefix="stargz-tui-errs-", dir="/var/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# One daemon started by core.starter with a DaemonConfig; exit 1 when it
# reports an error on its channel.
DAEMON_DIRECT = """
import sys, time
from core.options import DaemonConfig
from core.starter import SpawnStarter
image, mp, log, ctl = sys.argv[1:5]
proc = SpawnStarter().start(DaemonConfig(image=image, layer="0", mountpoint=mp, control=ctl,
                                         log=log))
line = proc.read_line(time.monotonic() + 60) or ""
print(line)
sys.exit(0 if line.startswith("ok") else 1)
"""


def _after(alice, mp: str) -> None:
    assert alice.mounts() == []
    with open("/proc/self/mountinfo") as f:
        assert f" {mp} " not in f.read()


def test_dev_fuse_not_accessible(alice):
    mp = alice.mkdir("mnt-err-dev")
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    os.chmod("/dev/fuse", 0o600)  # what this CI image ships
    try:
        r = alice.cli("mount", alice.image("mini-esgz"), mp, "--layer", "0")
        # the daemon itself, past the check, started as core.mount starts it (its
        # stderr is its log, its config comes over its channel): libfuse's
        # cause, not "fuse_session_mount failed"
        log = os.path.join(alice.home, "daemon.log")
        d = alice.run([alice.install.python, "-c", DAEMON_DIRECT, alice.image("mini-esgz"), mp,
                       log, os.path.join(alice.home, "ctl.sock")])
    finally:
        os.chmod("/dev/fuse", mode)
    msg = _one_line_error(r)
    assert "/dev/fuse is crw-------" in msg and "chmod 0666 /dev/fuse" in msg, msg
    assert d.returncode == 1
    with open(log) as f:
        text = f.read()
    assert f"cannot mount {mp}: fuse: failed to open /dev/fuse: Permission denied" in text, text
    _after(alice, mp)


def test_dev_fuse_missing(alice):
    mp = alice.mkdir("mnt-err-nodev")
    # a /dev holding only what the command needs, not fuse
    setup = ("d=$(mktemp -d)\nmount -t tmpfs tmpfs $d\n"
             "for n in null zero urandom random; do touch $d/$n; mount --bind /dev/$n $d/$n; "
             "done\nmount --rbind $d /dev")
    r = alice.cli("mount", alice.image("mini-esgz"), mp, "--layer", "0", root_setup=setup)
    msg = _one_line_error(r)
    assert "/dev/fuse does not exist" in msg and "modprobe fuse" in msg, msg
    _after(alice, mp)


def test_fusermount3_missing(alice):
    mp = alice.mkdir("mnt-err-fm")
    r = alice.cli("mount", alice.image("mini-esgz"), mp, "--layer", "0",
                  root_setup="mount --bind /dev/null /usr/bin/fusermount3")
    msg = _one_line_error(r)
    assert "fusermount3 is not installed" in msg and "apt install fuse3" in msg, msg
    _after(alice, mp)


def test_unmount_without_fusermount3(alice):
    mp = alice.mkdir("mnt-err-umount")
    alice.cli("mount", alice.image("mini-esgz"), mp, "--layer", "0", check=True)
    # in a mount namespace of its own (a copy of hers): her mount is there, fusermount3 not
    r = alice.cli("unmount", mp, root_setup="mount --bind /dev/null /usr/bin/fusermount3")
    msg = _one_line_error(r)
    assert f"cannot unmount {mp}: only root may" in msg and "apt install fuse3" in msg, msg
    r = alice.cli("unmount", mp, env={"PATH": os.path.dirname(alice.install.python)})
    assert r.returncode == 0, r.stderr  # fusermount3 found where libfuse looks, not in PATH
    _after(alice, mp)


def test_fusermount3_not_setuid(alice, scratch):
    mp = alice.mkdir("mnt-err-suid")
    copy = os.path.join(scratch, "fusermount3")
    shutil.copy(shutil.which("fusermount3", path="/usr/bin:/bin"), copy)  # copies drop setuid
    os.chmod(copy, 0o755)
    r = alice.cli("mount", alice.image("mini-esgz"), mp, "--layer", "0",
                  root_setup=f"mount --bind {copy} /usr/bin/fusermount3")
    msg = _one_line_error(r)
    assert "is not setuid root" in msg and "chmod u+s" in msg, msg
    _after(alice, mp)


def test_merged_mount_needs_no_fuse_overlayfs(alice):
    """Issue 17: one process serves the merged tree, so a PATH without
    fuse-overlayfs (which used to stop a plain user's merged mount) mounts."""
    mp = alice.mkdir("mnt-err-ovl")
    r = alice.cli("mount", alice.image("mini-esgz"), mp,
                  env={"PATH": os.path.dirname(alice.install.python)})
    assert r.returncode == 0, r.stderr
    (m,) = alice.mounts()
    assert m["state"] == "serving" and m["kind"] == "merged" and len(m["pids"]) == 1
    r = alice.cli("unmount", mp)
    assert r.returncode == 0, r.stderr
    _after(alice, mp)


def test_mountpoint_not_hers(alice, scratch):
    r = alice.cli("mount", alice.image("mini-esgz"), scratch, "--layer", "0")
    msg = _one_line_error(r)
    assert f"cannot mount on {scratch}: it belongs to root:root" in msg and "~/mnt" in msg, msg
    _after(alice, scratch)


def test_allow_other_without_user_allow_other(alice, scratch):
    mp = alice.mkdir("mnt-err-other")
    conf = os.path.join(scratch, "fuse.conf")
    with open(conf, "w") as f:
        f.write("# user_allow_other\nmount_max = 1000\n")
    r = alice.cli("mount", alice.image("mini-esgz"), mp, "--layer", "0", "--allow-other",
                  root_setup=f"mount --bind {conf} /etc/fuse.conf")
    msg = _one_line_error(r)
    assert "--allow-other needs `user_allow_other` in /etc/fuse.conf" in msg, msg
    _after(alice, mp)


def test_mount_max(alice, scratch):
    mp = alice.mkdir("mnt-err-max")
    conf = os.path.join(scratch, "fuse.conf")
    with open(conf, "w") as f:
        f.write("mount_max = 0\n")
    r = alice.cli("mount", alice.image("mini-esgz"), mp,
                  root_setup=f"mount --bind {conf} /etc/fuse.conf")
    msg = _one_line_error(r)
    # a merged mount of 2 layers is one FUSE mount (issue 17: it was 2 + fuse-overlayfs)
    assert "this mount needs 1 FUSE mount(s)" in msg and "mount_max = 0" in msg, msg
    _after(alice, mp)


def test_bad_id_map(alice):
    mp = alice.mkdir("mnt-err-map")
    for bad in ("0:1000", "a:b:c", "0:1000:0"):
        r = alice.cli("mount", alice.image("mini-esgz"), mp, "--layer", "0", "--uid-map", bad)
        msg = _one_line_error(r)
        assert f"bad id mapping '{bad}'" in msg, msg
    _after(alice, mp)
