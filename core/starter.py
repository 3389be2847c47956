"""How a daemon process is started: an object the mount is given.

Contract: a starter's ``start(config) -> DaemonProcess`` starts one
:mod:`core.daemon` serving ``config`` (:class:`core.options.DaemonConfig`),
or :mod:`core.mergeddaemon` when ``config.merged`` (the same contract),
in its own session, cwd ``/``, stdin ``/dev/null``, stdout and stderr
appended to ``config.log``. The daemon gets its config, and only that, over
one end of a Unix socket pair (msgspec JSON, then EOF) and answers on the
same socket with one line: ``ok {json}`` or ``error MESSAGE``.
:class:`DaemonProcess` holds the other end.

* :class:`SpawnStarter`: a fresh ``python -m core.daemon --channel-fd N --for
  WHAT`` (``core.mergeddaemon`` for a merged config)
  (what a CLI or app process that has not imported the daemon's modules
  uses).
* :class:`ForkStarter`: forks the calling process and runs the daemon in
  the child; for a process that has imported trio, httpx and pyfuse3
  already (the mount service and its workers), so a mount starts no
  interpreter. Forking a process with threads can deadlock the child, so it
  refuses (``MountError``) when other threads run.
* :class:`SpareStarter`: hands the config to the mount service's
  :class:`Spare`, a daemon it forked ahead of time and warmed up
  (:mod:`core.warmup`), when this process is the first to take it; else
  forks (:class:`ForkStarter`). The daemon is then not this process's
  child: :class:`DaemonProcess` watches it through a pidfd.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import NoReturn

from .errors import MountError
from .options import DaemonConfig, encode_config


class DaemonProcess:
    """A started daemon: its pid and the parent's end of its channel."""

    def __init__(self, pid: int, channel: socket.socket, popen: subprocess.Popen | None = None,
                 pidfd: int | None = None):
        self.pid = pid
        self.channel = channel
        self._popen = popen
        # a daemon that is not our child (a spare the mount service forked):
        # its pidfd turns readable when it ends; its status is the service's
        self._pidfd = pidfd
        self.returncode: int | None = None
        self._buf = b""

    def poll(self) -> int | None:
        """The exit status once it ended (-1 when it is not our child)."""
        if self._popen is not None:
            self.returncode = self._popen.poll()
        elif self._pidfd is not None:
            if self.returncode is None and select.select([self._pidfd], [], [], 0)[0]:
                self.returncode = -1
        elif self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def read_line(self, deadline: float, cancelled=None) -> str | None:
        """The daemon's next line on its channel; None when it closed it or
        the deadline passed (then see :meth:`poll`). ``cancelled()``, asked
        twice a second, raises to stop waiting (the mount's client left)."""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if cancelled is not None:
                cancelled()
            ready, _, _ = select.select([self.channel], [], [], min(0.5, left))
            if not ready:
                if self.poll() is not None:
                    return None
                continue
            try:
                piece = self.channel.recv(4096)
            except OSError:
                piece = b""
            if not piece:
                return None
            self._buf += piece
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace").strip()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.channel.close()
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None


def _channel(config: DaemonConfig) -> tuple[socket.socket, socket.socket]:
    """(ours, the daemon's): the config written into ours, our side shut for writing."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.sendall(encode_config(config))  # small: fits the socket buffer
    ours.shutdown(socket.SHUT_WR)
    return ours, theirs


def _open_log(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


def _what(config: DaemonConfig) -> tuple[str, str]:
    """(the daemon's module, what it serves as ps shows it)."""
    if config.merged:
        return "core.mergeddaemon", f"image {config.mountpoint}"
    return "core.daemon", f"layer {config.layer} {config.mountpoint}"


class SpawnStarter:
    """Start ``python -m core.daemon`` (or ``core.mergeddaemon``; a new interpreter)."""

    name = "spawn"

    def start(self, config: DaemonConfig) -> DaemonProcess:
        ours, theirs = _channel(config)
        logfd = _open_log(config.log)
        try:
            env = dict(os.environ)
            pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"]
                                              if env.get("PYTHONPATH") else "")
            module, what = _what(config)
            proc = subprocess.Popen(
                # --for: what it serves, in ps; also the room its title
                # (core.proctitle, written over argv) needs
                [sys.executable, "-m", module, "--channel-fd", str(theirs.fileno()),
                 "--for", what],
                stdin=subprocess.DEVNULL, stdout=logfd, stderr=logfd, pass_fds=(theirs.fileno(),),
                cwd="/", env=env, start_new_session=True)
        except OSError as e:
            ours.close()
            raise MountError(f"cannot start the mount daemon: {e.strerror or e}") from None
        finally:
            os.close(logfd)
            theirs.close()
        return DaemonProcess(proc.pid, ours, proc)


class ForkStarter:
    """Fork the (preloaded, single-threaded) calling process into the daemon."""

    name = "fork"

    def start(self, config: DaemonConfig) -> DaemonProcess:
        if threading.active_count() != 1:
            raise MountError("cannot fork a mount daemon from a process with threads")
        ours, theirs = _channel(config)
        logfd = _open_log(config.log)
        pid = os.fork()
        if pid:
            os.close(logfd)
            theirs.close()
            return DaemonProcess(pid, ours)

        def serve() -> int:
            if config.merged:
                from .mergeddaemon import run_channel
            else:
                from .daemon import run_channel
            return run_channel(theirs.fileno())

        _run_child(os.open(os.devnull, os.O_RDONLY), logfd, theirs.fileno(), serve)


class Spare:
    """A daemon forked ahead of its mount, waiting for a config (the mount
    service keeps one; :class:`SpareStarter` hands it a config).

    A mount through the service then neither forks nor pays, while the
    user waits, for the first run of the code every daemon runs (the
    pages a forked child writes are copied at its first write: a fresh
    daemon's first trio run, first TOC indexed, first FUSE session).

    Whoever holds the channel may offer the spare a config, but only one
    may: the first to take the *token* (one byte in a pipe, read without
    blocking by every would-be user; a pipe read is atomic) owns it. The
    spare ends quietly when every holder closed the channel without a
    config (the service stopped, or replaced it)."""

    def __init__(self, pid: int, channel: socket.socket, token: int):
        self.pid = pid
        self.channel = channel  # the parent's end
        self.token = token  # read end of the token pipe (non-blocking)

    @classmethod
    def fork(cls) -> Spare:
        """Fork a spare from this (preloaded, single-threaded) process."""
        if threading.active_count() != 1:
            raise MountError("cannot fork a spare daemon from a process with threads")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        token_r, token_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        os.write(token_w, b"t")
        os.close(token_w)
        pid = os.fork()
        if pid:
            theirs.close()
            return cls(pid, ours, token_r)
        # stdout and stderr go to the mount's log once a config names it
        null = os.open(os.devnull, os.O_RDWR)
        _run_child(null, null, theirs.fileno(), lambda: _serve_spare(theirs.fileno()))

    def fds(self) -> tuple[int, int]:
        """What a process that may use the spare keeps open."""
        return (self.channel.fileno(), self.token)

    def taken(self) -> bool:
        """Has someone taken the token (the spare is theirs now)?"""
        import fcntl
        import struct
        import termios

        try:
            buf = fcntl.ioctl(self.token, termios.FIONREAD, b"\0\0\0\0")
        except OSError:
            return True
        return struct.unpack("i", buf)[0] == 0

    def take(self) -> bool:
        try:
            return os.read(self.token, 1) == b"t"
        except (BlockingIOError, OSError):
            return False

    def close(self) -> None:
        """Let go of it (a spare nobody took then ends by itself)."""
        with contextlib.suppress(OSError):
            self.channel.close()
        with contextlib.suppress(OSError):
            os.close(self.token)


def _serve_spare(fd: int) -> int:
    """The spare's life: warm up, wait for a config, serve it as a daemon."""
    from .daemon import Daemon, read_channel, serve_config
    from .options import decode_config
    from .proctitle import set_title
    from .warmup import warm_up

    set_title("stargz-tui-spare")
    with contextlib.suppress(Exception):
        warm_up()  # only saves time: a spare that could not warm up still serves
    data = read_channel(fd)
    if not data:
        return 0  # nobody needed it: the service stopped or let it go
    config = decode_config(data)
    logfd = _open_log(config.log)
    os.dup2(logfd, 1)
    os.dup2(logfd, 2)
    os.close(logfd)
    if config.merged:
        from .mergeddaemon import MergedDaemon

        return serve_config(config, fd, MergedDaemon)
    return serve_config(config, fd, Daemon)


class SpareStarter:
    """Start the daemon in the mount service's spare when this process can
    take it, else fork one (:class:`ForkStarter`)."""

    name = "spare"

    def __init__(self, spare: Spare | None):
        self.spare = spare

    def start(self, config: DaemonConfig) -> DaemonProcess:
        spare = self.spare
        if spare is not None and spare.take():
            try:
                pidfd = os.pidfd_open(spare.pid)
            except OSError:
                pidfd = None
            if pidfd is not None:
                try:
                    spare.channel.sendall(encode_config(config))
                    spare.channel.shutdown(socket.SHUT_WR)
                except OSError:
                    os.close(pidfd)
                else:
                    return DaemonProcess(spare.pid, spare.channel, pidfd=pidfd)
        return ForkStarter().start(config)


def _run_child(stdin: int, output: int, channel: int, serve) -> NoReturn:
    """In a child just forked to be a daemon: its own session, cwd ``/``,
    ``stdin`` and ``output`` (stdout and stderr) as fds 0-2, nothing of the
    parent's open but ``channel`` (client sockets, the service's listener);
    exits with what ``serve()`` returns, never returning into the parent's
    code."""
    rc = 1
    try:
        os.setsid()
        os.chdir("/")
        become_forked_child((stdin, output, output), keep=(channel,))
        rc = serve()
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's code
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(rc or 0)


def become_forked_child(stdio: tuple[int, int, int], keep: tuple[int, ...] = ()) -> None:
    """In a child forked from a long-lived process: take ``stdio`` as fds
    0-2 and as ``sys.std*``, close every other fd but ``keep``, and reset
    what the parent changed (signal handlers, log handlers)."""
    for target, fd in enumerate(stdio):
        os.dup2(fd, target)
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - lives as long as the process
    sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1,  # noqa: SIM115
                      closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as at interpreter start
    logging.root.handlers.clear()  # the child configures its own log


__all__ = ["DaemonProcess", "SpawnStarter", "ForkStarter", "Spare", "SpareStarter",
           "become_forked_child"]
