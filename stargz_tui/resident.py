"""The resident server: runs ``mount`` / ``unmount`` without a cold start.

``python -m stargz_tui.resident`` imports what the CLI's mount path and the
mount daemon need (trio, anyio, httpx, pyfuse3, the core), then waits on a
Unix socket in the runtime directory (0600, and the peer must be our uid).
Each request is one JSON line, ``{"argv", "env", "cwd", "stamp"}``, with the
client's stdin/stdout/stderr passed as file descriptors. The server forks a
worker that takes those streams, that environment and working directory,
writes ``{"pid": N}`` back, runs :func:`stargz_tui.cli.main` and writes
``{"rc": N}``. The worker forks the mount daemon too (``core.mount`` with
``FORK_DAEMONS``), so a mount starts no interpreter at all: the same model as
stargz-snapshotter, whose daemon is resident and mounts in-process.

The server itself never starts a thread or an event loop (forking a threaded
process can deadlock), holds an flock so only one runs per runtime dir,
answers ``{"stale": true}`` and exits when the client's code stamp differs
from its own (an upgrade), and exits after ``--idle`` seconds without a
request or when its socket file is removed. Mounts never depend on it: each
daemon is its own session and outlives the server.
"""

from __future__ import annotations

import argparse
import array
import fcntl
import gc
import json
import logging
import os
import select
import signal
import socket
import sys
import time

from core.peer import is_own_peer, peer_text, require_own_peer

from .launcher import code_stamp, server_log, socket_path, spawn_server

log = logging.getLogger("stargz_tui.resident")

DEFAULT_IDLE = 900.0
MAX_REQUEST = 1 << 20


def preload() -> None:
    """Import (and warm) what a mount command and the daemon use."""
    import anyio
    import anyio._backends._trio  # noqa: F401 - the daemon's backend
    import httpx  # noqa: F401
    import platformdirs  # noqa: F401 - state and cache dirs
    import pyfuse3  # noqa: F401
    import trio  # noqa: F401

    import core.cache  # noqa: F401
    import core.daemon  # noqa: F401
    import core.fusefs  # noqa: F401
    import core.fuseloop  # noqa: F401
    import core.image  # noqa: F401
    import core.layer  # noqa: F401
    import core.mount  # noqa: F401
    import core.registry.client  # noqa: F401
    import core.registry.store  # noqa: F401
    import core.resolver  # noqa: F401
    import core.tasks  # noqa: F401
    from stargz_tui import cli

    for name in ("open_signal_receiver", "create_unix_listener", "create_task_group",
                 "fail_after", "move_on_after", "to_thread", "Event", "Lock",
                 "CapacityLimiter"):
        getattr(anyio, name, None)  # anyio imports these lazily
    cli.PARSER = cli.build_parser()  # imports every command module; reused by workers
    # Everything loaded so far lives as long as the server: out of the
    # collector's sight, a forked worker's or daemon's collections do not
    # write to (and so copy) the pages it shares with the server (~4 ms less
    # to a forked daemon's manifest and TOC).
    gc.collect()
    gc.freeze()


class Server:
    def __init__(self, path: str, idle: float):
        self.path = path
        self.idle = idle
        self.stamp = code_stamp()
        self.listener: socket.socket | None = None
        self.inode = None
        self.lock_fd = None
        self.stop = False
        self.started = time.time()

    def start(self) -> bool:
        """Take the lock and the socket; False when another server holds them."""
        self.lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        try:
            os.unlink(self.path)  # a dead server's socket: we hold the lock
        except FileNotFoundError:
            pass
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            lst.bind(self.path)
        finally:
            os.umask(old)
        lst.listen(32)
        self.listener = lst
        self.inode = os.stat(self.path).st_ino
        return True

    def _still_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    def serve(self) -> None:
        last = time.monotonic()
        while not self.stop:
            self._reap()
            try:
                ready, _, _ = select.select([self.listener], [], [], 2.0)
            except InterruptedError:
                continue
            if ready:
                try:
                    conn, _ = self.listener.accept()
                except OSError:
                    continue
                with conn:
                    if self._handle(conn):  # a status query is not activity
                        last = time.monotonic()
            if time.monotonic() - last > self.idle:
                log.info("idle for %.0f s: exiting", self.idle)
                break
            if not self._still_ours():
                log.info("socket %s is gone: exiting", self.path)
                break
        self.close()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            if self._still_ours():
                try:
                    os.unlink(self.path)
                except OSError:
                    pass

    @staticmethod
    def _reap() -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return

    def _handle(self, conn: socket.socket) -> bool:
        """Answer one request; True when it ran a command."""
        fds: list[int] = []
        try:
            if not is_own_peer(conn):
                log.warning("refused a request from uid %s", peer_text(conn))
                return False
            conn.settimeout(5.0)
            data, fds = self._receive(conn)
            req = json.loads(data)
            if isinstance(req, dict) and req.get("op") in ("status", "stop"):
                info = {"ok": True, "pid": os.getpid(), "started": self.started,
                        "stamp": self.stamp, "current": req.get("stamp") == self.stamp}
                conn.sendall(json.dumps(info).encode() + b"\n")
                self.stop = self.stop or req["op"] == "stop"
                return False
            if not isinstance(req, dict) or not isinstance(req.get("argv"), list):
                conn.sendall(b'{"refused": "bad request"}\n')
                return False
            if req.get("stamp") != self.stamp:
                log.info("a client runs other code (%s): exiting", req.get("stamp"))
                conn.sendall(b'{"stale": true}\n')
                self.stop = True
                return False
            if len(fds) != 3:
                conn.sendall(b'{"refused": "expected 3 file descriptors"}\n')
                return False
            pid = os.fork()
            if pid == 0:
                self._worker(conn, fds, req)  # never returns
            log.info("worker %d: %s", pid, " ".join(map(str, req["argv"]))[:200])
            return True
        except (OSError, ValueError) as e:
            log.warning("request failed: %s", e)
            return False
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    @staticmethod
    def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
        fds: list[int] = []
        buf = b""
        cmsg_space = socket.CMSG_SPACE(3 * array.array("i").itemsize)
        while not buf.endswith(b"\n"):
            data, ancdata, _flags, _addr = conn.recvmsg(65536, cmsg_space)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                    fds.extend(a)
            if not data:
                break
            buf += data
            if len(buf) > MAX_REQUEST:
                raise ValueError("request too large")
            cmsg_space = 0
        return buf, fds

    def _worker(self, conn: socket.socket, fds: list[int], req: dict) -> None:
        """The forked child: become the client's command, then exit."""
        rc = 1
        try:
            if self.listener is not None:
                self.listener.close()
            os.close(self.lock_fd)
            import core.mount

            core.mount.become_forked_child(tuple(fds), keep=(conn.fileno(),))
            env = req.get("env")
            if isinstance(env, dict):
                os.environ.clear()
                os.environ.update({str(k): str(v) for k, v in env.items()})
            import tempfile

            tempfile.tempdir = None  # recomputed from the client's TMPDIR
            os.chdir(str(req.get("cwd") or "/"))
            conn.settimeout(None)
            conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
            from stargz_tui import cli

            core.mount.FORK_DAEMONS = True
            argv = [str(a) for a in req["argv"]]
            sys.argv = ["stargz-tui", *argv]
            try:
                rc = cli.main(argv)
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except KeyboardInterrupt:
                rc = 130
        except BaseException:  # noqa: BLE001 - the worker must not return into the server
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:  # noqa: BLE001
                pass
            try:
                conn.sendall(json.dumps({"rc": int(rc or 0)}).encode() + b"\n")
            except Exception:  # noqa: BLE001
                pass
            os._exit(int(rc or 0) & 0xFF)


def request(op: str, timeout: float = 3.0) -> dict | None:
    """Ask the running server (``status`` or ``stop``); None when none answers.
    Raises :class:`core.errors.MountError` when the socket is served by
    another uid (nothing is sent to it)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = socket_path()
    try:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError:
            return None
        require_own_peer(s, f"the resident server socket {path}")
        s.sendall(json.dumps({"op": op, "stamp": code_stamp()}).encode() + b"\n")
        line = s.makefile("rb").readline()
        resp = json.loads(line) if line else None
    except (OSError, ValueError):
        return None
    finally:
        s.close()
    return resp if isinstance(resp, dict) else None


def start_and_wait(timeout: float = 60.0) -> dict:
    """Start a detached server and wait until it serves (or another does)."""
    r, w = os.pipe()
    try:
        proc = spawn_server(ready_fd=w)
    finally:
        os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], timeout)
        line = os.read(r, 64).decode().strip() if ready else ""
    finally:
        os.close(r)
    info = request("status") or {}
    return {"started": line == "ok", "pid": info.get("pid", proc.pid if line == "ok" else None),
            "running": bool(info), "log": server_log()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stargz_tui.resident",
                                description="stargz-tui's resident mount server.")
    p.add_argument("--idle", type=float, default=float(os.environ.get(
        "STARGZ_TUI_SERVER_IDLE", DEFAULT_IDLE)), help="exit after this many idle seconds")
    p.add_argument("--ready-fd", type=int, help="write 'ok' here once serving")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    try:
        server = Server(socket_path(), args.idle)
        preload()
        started = server.start()
        if not started:
            log.info("another server holds %s", server.path)
    except Exception as e:  # noqa: BLE001 - one line, the launcher runs commands itself
        log.error("cannot start: %s", e)
        started = False
    if args.ready_fd is not None:
        try:
            os.write(args.ready_fd, b"ok\n" if started else b"busy\n")
            os.close(args.ready_fd)
        except OSError:
            pass
    if not started:
        return 0
    signal.signal(signal.SIGTERM, lambda *_: setattr(server, "stop", True))
    log.info("serving on %s (idle exit after %.0f s)", server.path, args.idle)
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
