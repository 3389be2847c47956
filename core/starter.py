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

from .errors import MountError
from .options import DaemonConfig, encode_config


class DaemonProcess:
    """A started daemon: its pid and the parent's end of its channel."""

    def __init__(self, pid: int, channel: socket.socket, popen: subprocess.Popen | None = None):
        self.pid = pid
        self.channel = channel
        self._popen = popen
        self.returncode: int | None = None
        self._buf = b""

    def poll(self) -> int | None:
        """The exit status once it ended (only for our own child)."""
        if self._popen is not None:
            self.returncode = self._popen.poll()
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
        rc = 1
        try:
            os.setsid()
            os.chdir("/")
            null = os.open(os.devnull, os.O_RDONLY)
            # nothing of the parent's (client sockets, its listener) stays open
            become_forked_child((null, logfd, logfd), keep=(theirs.fileno(),))
            if config.merged:
                from .mergeddaemon import run_channel
            else:
                from .daemon import run_channel
            rc = run_channel(theirs.fileno())
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


__all__ = ["DaemonProcess", "SpawnStarter", "ForkStarter", "become_forked_child"]
