"""The ``stargz-tui`` entry point: a thin client of the resident server.

A mount is on the critical path of starting a container, and most of a cold
``stargz-tui mount`` used to be Python starting twice (the command, then the
daemon) and importing trio, httpx and pyfuse3 each time. When the resident
server (:mod:`stargz_tui.resident`) runs, ``mount`` and ``unmount`` are handed
to it: it has those modules imported already and forks a worker that runs
the command with this process's arguments, environment, working directory
and standard streams (passed over its socket), and forks the mount daemon in
turn. This module therefore imports almost nothing before it knows whether
the server is there; everything else goes through :func:`stargz_tui.cli.main`
as before.

The server's socket must be served by our own uid (``SO_PEERCRED``): one
served by anyone else gets nothing (our environment holds tokens, our fds are
the terminal), and the command fails with one line instead of running.

``STARGZ_TUI_SERVER``: ``auto`` (default: use the server when it runs; a
successful ``mount`` starts one in the background for the next time),
``use`` (use it when it runs, never start one), ``off`` (never use it).
"""

from __future__ import annotations

import os
import sys

HANDED_TO_SERVER = ("mount", "unmount", "umount")
SOCKET_NAME = "server.sock"
# The packages whose source decides whether a running server is current.
_CODE_DIRS = ("core", "core/estargz", "core/registry", "stargz_tui", "stargz_tui/commands")


def server_mode() -> str:
    mode = os.environ.get("STARGZ_TUI_SERVER", "auto").strip().lower()
    return mode if mode in ("auto", "use", "off") else "auto"


def socket_path() -> str:
    from core.paths import runtime_socket

    return runtime_socket(SOCKET_NAME)


def code_stamp() -> str:
    """Which code a process runs: the interpreter, and the newest source file
    of the packages. A server started before an upgrade (or an edit of an
    editable install) has another stamp and is not used."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    newest, count = 0, 0
    for d in _CODE_DIRS:
        try:
            with os.scandir(os.path.join(root, d)) as it:
                for e in it:
                    if e.name.endswith(".py"):
                        count += 1
                        newest = max(newest, e.stat().st_mtime_ns)
        except OSError:
            continue
    return f"{sys.executable}:{root}:{count}:{newest}"


def _json_request(req: dict) -> bytes:
    """``req`` (str values, lists of str, dicts of str) as one JSON line,
    with the C string encoder the ``json`` module uses: importing ``json``
    (and ``re`` with it) would cost more than the rest of this process."""
    from _json import encode_basestring_ascii as enc

    def value(v) -> str:
        if isinstance(v, str):
            return enc(v)
        if isinstance(v, list):
            return "[" + ",".join(map(value, v)) + "]"
        return "{" + ",".join(f"{enc(k)}:{value(x)}" for k, x in v.items()) + "}"

    return (value(req) + "\n").encode("ascii")


def _int_field(line: bytes, key: str) -> int | None:
    """N from the server's line ``{"key": N}``; None for any other line."""
    head = b'{"' + key.encode() + b'": '
    body = line.strip()
    if not (body.startswith(head) and body.endswith(b"}")):
        return None
    try:
        return int(body[len(head):-1])
    except ValueError:
        return None


class _Lines:
    """Lines from a connected socket."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def readline(self) -> bytes:
        while b"\n" not in self.buf:
            piece = self.sock.recv(4096)
            if not piece:
                line, self.buf = self.buf, b""
                return line
            self.buf += piece
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"


def _via_server(argv: list[str]) -> int | None:
    """Run ``argv`` in the resident server; None when it is not there (or is
    stale), so the caller runs the command itself. Nothing has run then.

    Only C modules on this path (``_socket``, ``_json``): ``socket`` and
    ``json`` import ``enum``, ``selectors`` and ``re``, ~10 ms of a start
    that is itself ~10 ms warm (and far more with a cold page cache)."""
    import _socket

    try:
        path = socket_path()
        for fd in (0, 1, 2):
            os.fstat(fd)
        cwd = os.getcwd()
    except Exception:  # noqa: BLE001 - any doubt: run the command here
        return None
    if not os.path.exists(path):
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    refused = _refuse_foreign_server(sock, path)
    if refused is not None:
        return refused
    try:
        req = {"argv": argv, "env": dict(os.environ), "cwd": cwd, "stamp": code_stamp()}
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))  # an int[3]
        sock.sendmsg([_json_request(req)], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        lines = _Lines(sock)
        pid = _int_field(lines.readline(), "pid")
    except (OSError, UnicodeError):
        sock.close()
        return None
    if pid is None:
        sock.close()
        return None  # stale or refused: the server ran nothing
    return _wait_worker(sock, lines, pid)


def _refuse_foreign_server(sock, path: str) -> int | None:
    """None when the server at ``path`` runs as our uid. Otherwise nothing is
    sent to it (our environment holds tokens, our fds are the terminal): one
    line on stderr and exit status 1, the command is not run."""
    from core.errors import MountError
    from core.peer import require_own_peer

    try:
        require_own_peer(sock, f"the resident server socket {path}")
    except MountError as e:
        sock.close()
        print(f"stargz-tui: {e}", file=sys.stderr)
        return 1
    return None


def _wait_worker(sock, lines: _Lines, pid: int) -> int:
    """The worker runs the command with our streams; pass on the signals we
    get (Ctrl-C reaches only this process) and return its exit status."""
    import _signal  # not ``signal``: it imports ``enum`` (see _via_server)

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except OSError:
            pass

    for sig in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
        _signal.signal(sig, forward)
    sock.settimeout(None)
    try:
        rc = _int_field(lines.readline(), "rc")
    except OSError:
        rc = None
    finally:
        sock.close()
    if rc is None:
        print("stargz-tui: the resident server's worker ended without a result "
              "(see `stargz-tui server status`)", file=sys.stderr)
        return 1
    return rc


def server_log() -> str:
    from core.paths import private_dir, state_dir

    return os.path.join(private_dir(os.path.join(state_dir(), "logs")), "server.log")


def spawn_server(ready_fd: int | None = None):
    """Start the resident server detached (it exits by itself when idle),
    logging to :func:`server_log`; with ``ready_fd`` it writes ``ok`` there
    once it serves. Returns the process."""
    import subprocess

    cmd = [sys.executable, "-m", "stargz_tui.resident"]
    if ready_fd is not None:
        cmd += ["--ready-fd", str(ready_fd)]
    logfd = os.open(server_log(), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(cmd, pass_fds=() if ready_fd is None else (ready_fd,),
                                stdin=subprocess.DEVNULL, stdout=logfd, stderr=logfd, cwd="/",
                                start_new_session=True)
    finally:
        os.close(logfd)


def start_server_background() -> None:
    """:func:`spawn_server` after a mount, for the next one; a server that
    cannot start only costs speed."""
    try:
        spawn_server()
    except Exception:  # noqa: BLE001
        pass


def main() -> int:
    argv = sys.argv[1:]
    mode = server_mode()
    handed = (bool(argv) and argv[0] in HANDED_TO_SERVER and mode != "off"
              and not {"-h", "--help"} & set(argv))
    if handed:
        rc = _via_server(argv)
        if rc is not None:
            return rc
    from .cli import main as cli_main

    rc = cli_main(argv)
    if handed and rc == 0 and argv[0] == "mount" and mode == "auto":
        start_server_background()
    return rc


if __name__ == "__main__":
    sys.exit(main())
