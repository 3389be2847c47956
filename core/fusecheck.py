"""Can this user mount here? Checks made before any daemon starts.

Without them a plain user's failed mount says only "fuse_session_mount
failed" (libfuse prints the cause on the daemon's stderr, i.e. in its log).
:func:`check_mount` raises :class:`MountError` with one line naming the
cause and the fix for what can be seen beforehand:

* ``/dev/fuse`` missing, or not readable and writable by us (mode, group);
* for a plain user: ``fusermount3`` (which libfuse runs to mount) missing or
  not setuid root; a mountpoint we neither own nor may write (fusermount3
  refuses it); ``allow_other`` without ``user_allow_other`` in
  /etc/fuse.conf; the FUSE mount the mount would add passing ``mount_max``
  (a merged mount is one FUSE mount too: no overlay, no fuse-overlayfs).

Root needs neither fusermount3 nor fuse.conf's limits.
:func:`fuse_failure_cause` picks libfuse's own message out of a daemon log
for the failures no check foresees.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat

from .errors import MountError

FUSE_DEVICE = "/dev/fuse"
FUSE_CONF = "/etc/fuse.conf"
# libfuse runs fusermount3 from its build-time directory first, then from PATH
FUSERMOUNT_DIRS = ("/usr/bin", "/bin", "/usr/local/bin")
DEFAULT_MOUNT_MAX = 1000


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


def check_device(path: str = FUSE_DEVICE) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(f"{path} does not exist: load the fuse module (`modprobe fuse`, as "
                         f"root) or, in a container, pass the device in "
                         f"(`--device {path}`)") from None
    except OSError as e:
        raise MountError(f"cannot use {path}: {e.strerror}") from None
    if not stat.S_ISCHR(st.st_mode):
        raise MountError(f"{path} is not a character device; recreate it "
                         f"(as root: `rm {path}; mknod -m 0666 {path} c 10 229`)")
    if not os.access(path, os.R_OK | os.W_OK):
        mode = stat.filemode(st.st_mode)
        raise MountError(f"{path} is {mode} {_owner(st)}: uid {os.getuid()} may not open it; "
                         f"give it Debian's default mode (as root: `chmod 0666 {path}`) "
                         f"or add yourself to its group")


def find_fusermount() -> str | None:
    for d in FUSERMOUNT_DIRS:
        p = os.path.join(d, "fusermount3")
        if os.path.isfile(p):
            return p
    return shutil.which("fusermount3")


def check_fusermount() -> None:
    exe = find_fusermount()
    if exe is None:
        raise MountError("fusermount3 is not installed, and a plain user cannot mount FUSE "
                         "without it: install fuse3 (Debian: `apt install fuse3`)")
    st = os.stat(exe)
    if st.st_uid != 0 or not st.st_mode & stat.S_ISUID:
        raise MountError(f"{exe} is not setuid root ({stat.filemode(st.st_mode)} "
                         f"{_owner(st)}), so a plain user cannot mount FUSE; as root: "
                         f"`chown root {exe} && chmod u+s {exe}`")


def fuse_conf(path: str = FUSE_CONF) -> dict:
    """``user_allow_other`` (bool) and ``mount_max`` (int) as fusermount3 reads them."""
    out = {"user_allow_other": False, "mount_max": DEFAULT_MOUNT_MAX}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line == "user_allow_other":
            out["user_allow_other"] = True
        elif line.startswith("mount_max"):
            key, _, value = line.partition("=")
            if key.strip() == "mount_max" and value.strip().lstrip("-").isdigit():
                out["mount_max"] = int(value.strip())
    return out


def fuse_mount_count(mountinfo: str = "/proc/self/mountinfo") -> int:
    n = 0
    try:
        with open(mountinfo) as f:
            for line in f:
                _, _, right = line.partition(" - ")
                fstype = right.split(" ", 1)[0]
                if fstype == "fuse" or fstype.startswith(("fuse.", "fuseblk")):
                    n += 1
    except OSError:
        pass
    return n


def check_mountpoint(path: str) -> None:
    st = os.stat(path)
    if st.st_uid != os.getuid() and not os.access(path, os.W_OK):
        raise MountError(f"cannot mount on {path}: it belongs to {_owner(st)} and you "
                         f"(uid {os.getuid()}) may not write to it; mount on a directory "
                         "of your own, e.g. `mkdir ~/mnt`")


def check_mount(mountpoint: str, *, fuse_mounts: int, allow_other: bool = False) -> None:
    """Everything above for a mount adding ``fuse_mounts`` FUSE filesystems."""
    check_device()
    if os.geteuid() == 0:
        return
    check_fusermount()
    check_mountpoint(mountpoint)
    conf = fuse_conf()
    if allow_other and not conf["user_allow_other"]:
        raise MountError(f"--allow-other needs `user_allow_other` in {FUSE_CONF} for a plain "
                         f"user; as root: `echo user_allow_other >> {FUSE_CONF}`")
    have = fuse_mount_count()
    # (-1: no limit; fuse_mounts 0: none added, or not known yet)
    if fuse_mounts and conf["mount_max"] >= 0 and have + fuse_mounts > conf["mount_max"]:
        raise MountError(f"this mount needs {fuse_mounts} FUSE mount(s) and {have} are mounted: "
                         f"more than mount_max = {conf['mount_max']} in {FUSE_CONF} allows; "
                         f"unmount some or raise mount_max there (as root)")


def log_tail(path: str | None, limit: int = 8192) -> list[str]:
    """The lines of the last ``limit`` bytes of a daemon log ([] when unreadable)."""
    if not path:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace").splitlines()
    except OSError:
        return []


def fuse_failure_cause(logfile: str | None) -> str | None:
    """libfuse's or fusermount3's last message in a daemon log, e.g.
    ``fuse: failed to open /dev/fuse: Permission denied``."""
    for line in reversed(log_tail(logfile)):
        line = line.strip()
        if line.startswith(("fuse:", "fusermount3:", "fusermount:")):
            return line
    return None
