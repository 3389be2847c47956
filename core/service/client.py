"""A client of the mount service (the CLI and the app use it).

Contract: :func:`connect` returns a :class:`ServiceClient` when a service
of our own uid answers on ``runtime_dir()/service.sock``, None when none
runs there; a socket served by another uid raises ``MountError`` before
anything is sent. :meth:`ServiceClient.call` sends one request and returns
the reply's ``data``, raising the :mod:`core.errors` class the service named
(one line) when it refused or failed. :func:`ensure` starts a service (a
detached ``python -m core.service run``, logging to the state dir) when
none runs and waits until it answers; None when it cannot be started, and
then the caller does the same work in-process through :mod:`core.mount`.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import time

from .. import errors
from ..errors import MountError
from ..paths import private_dir, runtime_socket, state_dir
from ..peer import require_own_peer
from . import protocol as p

START_TIMEOUT = 30.0


def socket_path() -> str:
    return runtime_socket(p.SOCKET_NAME)


def log_path() -> str:
    return os.path.join(private_dir(os.path.join(state_dir(), "logs")), "service.log")


class ServiceClient:
    def __init__(self, path: str, connected: socket.socket | None = None):
        self.path = path
        # the connection that found the service: the first request uses it
        # (each connection costs the service a forked worker)
        self._first = connected

    def _open(self, timeout: float) -> socket.socket:
        first, self._first = self._first, None
        if first is not None:
            first.settimeout(timeout)
            return first
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            s.connect(self.path)
            require_own_peer(s, f"the mount service socket {self.path}")
        except BaseException:
            s.close()
            raise
        return s

    @staticmethod
    def _result(reply: p.Reply):
        if reply.ok:
            return reply.data
        cls = getattr(errors, reply.kind or "", None)
        if not (isinstance(cls, type) and issubclass(cls, errors.CoreError)):
            cls = MountError
        raise cls(reply.error or "the mount service failed")

    def call(self, request, timeout: float = 300.0):
        """Send ``request``; its reply's data (or the error it names, raised)."""
        try:
            with self._open(timeout) as s:
                s.sendall(p.frame(request))
                reply = p.decode_reply(p.read_frame(s))
        except (OSError, EOFError) as e:
            raise MountError(f"the mount service at {self.path} did not answer: "
                             f"{getattr(e, 'strerror', None) or e}") from None
        return self._result(reply)

    def watch(self, interval: float = 1.0, count: int = 0):
        """Yield the mount list every ``interval`` seconds (``count`` times; 0: until closed)."""
        try:
            with self._open(max(10.0, interval * 4)) as s:
                s.sendall(p.frame(p.Watch(interval=interval, count=count)))
                while True:
                    try:
                        body = p.read_frame(s)
                    except EOFError:
                        return
                    yield self._result(p.decode_reply(body))
        except OSError as e:
            raise MountError(f"the mount service stopped answering: {e.strerror or e}") from None


def connect() -> ServiceClient | None:
    """A client of the running service, or None when none answers."""
    path = socket_path()
    if not os.path.exists(path):
        return None
    client = ServiceClient(path)
    try:
        return ServiceClient(path, client._open(5.0))
    except OSError:
        return None


def spawn(ready_fd: int | None = None):
    """Start ``python -m core.service run`` detached (own session, cwd /),
    logging to :func:`log_path`; it writes ``ok`` on ``ready_fd`` once it
    serves. Returns the ``subprocess.Popen``."""
    import subprocess  # (not on a mount's path through a running service)

    cmd = [sys.executable, "-m", "core.service", "run"]
    if ready_fd is not None:
        cmd += ["--ready-fd", str(ready_fd)]
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                      else "")
    logfd = os.open(log_path(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(cmd, pass_fds=() if ready_fd is None else (ready_fd,),
                                stdin=subprocess.DEVNULL, stdout=logfd, stderr=logfd, cwd="/",
                                env=env, start_new_session=True)
    finally:
        os.close(logfd)


def start(timeout: float = START_TIMEOUT) -> ServiceClient | None:
    """Start a service and wait until it answers (or another one does)."""
    r, w = os.pipe()
    try:
        proc = spawn(ready_fd=w)
    except OSError:
        os.close(r)
        return None
    finally:
        with contextlib.suppress(OSError):
            os.close(w)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], 0.5)
            if ready:
                os.read(r, 64)  # "ok", "busy" (another one serves) or EOF (it failed)
                break
            if proc.poll() is not None:
                break
    finally:
        os.close(r)
    return connect()


def ensure(start_it: bool = True) -> ServiceClient | None:
    """The running service; else (``start_it``) a new one; else None."""
    client = connect()
    if client is None and start_it:
        client = start()
    return client


def for_mode(mode: str | None, start_it: bool) -> ServiceClient | None:
    """What ``STARGZ_TUI_SERVER`` (read by the caller, at the edge) asks for:
    ``auto`` (default): the running service, else a new one when
    ``start_it``; ``use``: a running one only; ``off``: None (work in-process)."""
    mode = (mode or "auto").strip().lower()
    if mode == "off":
        return None
    return ensure(start_it=start_it and mode != "use")


__all__ = ["ServiceClient", "connect", "ensure", "for_mode", "start", "spawn", "socket_path", "log_path"]
