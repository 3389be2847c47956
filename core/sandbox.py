"""Run one command chrooted in a mounted image: ``python -m core.sandbox``.

    python -m core.sandbox --root DIR [--cwd DIR] [--env K=V]... [--status-fd N] -- ARGV...

The command's environment is exactly the ``--env`` pairs (the caller passes
the image's ``Env``), never this process's own. Steps, in this process (single-threaded, so ``unshare``
and ``fork`` are safe):

1. a new mount namespace (as a plain user, first a user namespace mapping
   the user to root in it: what ``unshare --map-root-user`` does);
2. a new PID namespace: the command runs as its PID 1, so killing it (or
   this process's group) ends everything it started;
3. inside the root, best effort where the image has the directory: ``/proc``
   (a new procfs), ``/dev`` (bound from the host), ``/tmp`` and ``/run``
   (tmpfs: the image is read-only);
4. ``chroot`` to the root, ``chdir`` to ``--cwd``, find ``ARGV[0]`` on the
   image's ``PATH``, ``execve``.

What goes wrong before the ``execve`` is one line on ``--status-fd``
(close-on-exec: an empty read means the command started), with exit
status 127:

    error userns <reason>      user namespaces are not available
    error notfound <argv0>     the command is not in the image
    error cwd <dir>            the working directory is not in the image
    error exec <argv0>: <why>  the kernel refused to run it

This process exits with the command's status (128 + N when a signal N ended
it). The mounts in the new namespace go away with it.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NOT_STARTED = 127

_libc = ctypes.CDLL(None, use_errno=True)


class _Failed(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind} {detail}")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def _mount(src: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    def b(s):
        return None if s is None else os.fsencode(s)

    _check(_libc.mount(b(src), b(target), b(fstype), ctypes.c_ulong(flags), b(data)),
           f"mount {target}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces() -> None:
    """Steps 1 and 2 up to the fork (see the module doc)."""
    if os.geteuid() != 0:
        uid, gid = os.getuid(), os.getgid()
        try:
            _unshare(CLONE_NEWUSER | CLONE_NEWNS)
            try:
                _write("/proc/self/setgroups", "deny")
            except FileNotFoundError:
                pass
            _write("/proc/self/uid_map", f"0 {uid} 1")
            _write("/proc/self/gid_map", f"0 {gid} 1")
        except OSError as e:
            raise _Failed("userns", e.strerror or str(e)) from None
    else:
        _unshare(CLONE_NEWNS)
    # nothing mounted here propagates back to the host
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _unshare(CLONE_NEWPID)


def _is_dir(path: str) -> bool:
    try:
        return os.path.isdir(path) and not os.path.islink(path)
    except OSError:
        return False


def prepare_root(root: str) -> None:
    """Step 3: best effort (a mount that fails leaves the image's directory)."""
    for sub, how in (("proc", "proc"), ("dev", "bind"), ("tmp", "tmpfs"), ("run", "tmpfs")):
        target = os.path.join(root, sub)
        if not _is_dir(target):
            continue
        try:
            if how == "proc":
                _mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            elif how == "bind":
                _mount("/dev", target, None, MS_BIND | MS_REC)
            else:
                _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        except OSError:
            pass


def find_command(argv0: str, env: dict) -> str | None:
    """``argv0`` as ``execvp`` would find it, inside the (chrooted) root."""
    def runnable(p: str) -> bool:
        return os.path.isfile(p) and os.access(p, os.X_OK)

    if "/" in argv0:
        return argv0 if runnable(argv0) else None
    for d in (env.get("PATH") or DEFAULT_PATH).split(":"):
        p = os.path.join(d or ".", argv0)
        if runnable(p):
            return p
    return None


def _report(fd: int | None, line: str) -> None:
    if fd is not None:
        try:
            os.write(fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            pass


def _run_child(args, status_fd: int | None) -> int:
    """PID 1 of the new namespace: prepare, chroot, exec."""
    env = dict(kv.partition("=")[::2] for kv in args.env)
    try:
        prepare_root(args.root)
        os.chroot(args.root)
        try:
            os.chdir(args.cwd or "/")
        except OSError:
            raise _Failed("cwd", args.cwd) from None
        path = find_command(args.argv[0], env)
        if path is None:
            raise _Failed("notfound", args.argv[0])
        try:
            os.execve(path, args.argv, env)
        except OSError as e:
            raise _Failed("exec", f"{args.argv[0]}: {e.strerror}") from None
    except _Failed as e:
        _report(status_fd, f"error {e}")
    except OSError as e:
        _report(status_fd, f"error setup {e.strerror or e}")
    return NOT_STARTED


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m core.sandbox")
    p.add_argument("--root", required=True)
    p.add_argument("--cwd", default="/")
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--status-fd", type=int)
    p.add_argument("argv", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.argv[:1] == ["--"]:
        args.argv = args.argv[1:]
    if not args.argv:
        p.error("no command given")
    fd = args.status_fd
    if fd is not None:
        os.set_inheritable(fd, False)  # closed by a successful execve
    try:
        enter_namespaces()
    except _Failed as e:
        _report(fd, f"error {e}")
        return NOT_STARTED
    except OSError as e:
        _report(fd, f"error setup {e.strerror or e}")
        return NOT_STARTED
    pid = os.fork()
    if pid == 0:
        rc = NOT_STARTED
        try:
            rc = _run_child(args, fd)
        finally:
            os._exit(rc)
    if fd is not None:
        os.close(fd)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
        except ChildProcessError:
            return NOT_STARTED
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except OSError as e:
        if e.errno == errno.EPIPE:
            sys.exit(1)
        raise
