"""The mount service: one per user, it mounts, lists and supervises.

Contract:

* ``python -m core.service run`` (or ``stargz-tui service run``; systemd's
  ``ExecStart``) imports what a mount and a daemon use (trio, anyio, httpx,
  pyfuse3, the core), takes an flock next to its socket so one runs per
  runtime dir, and listens on ``runtime_dir()/service.sock`` (0600, in a
  0700 dir). It answers the requests of :mod:`core.service.protocol`; a
  peer of another uid (``SO_PEERCRED``) gets a refusal and nothing else.
* It never starts a thread or an event loop: each connection, each restart
  and the restore at start run in a forked worker, which forks the layer
  daemons in turn (:class:`core.starter.ForkStarter`): a mount through the
  service starts no interpreter. A bad request costs a worker, never the
  service.
* Supervision: it watches every daemon named in the mount records
  (``os.pidfd_open``, which works for daemons it did not start: a new
  service adopts the mounts of an old one, or of the CLI). A daemon that
  died and left its mount behind (a crash, ``kill -9``, the OOM killer) is
  started again at the same place from the same record, image file and
  cache (:func:`core.mount.revive`, counted; ``failed`` after
  ``core.mount.MAX_RESTARTS`` in ``RESTART_WINDOW``). A daemon that ended
  cleanly took its mount with it (an unmount): it is not restarted.
* At start it restores every recorded mount that is not served
  (:func:`core.mount.restore`: after a reboot, at login under systemd).
* Mounts never depend on it: daemons are their own sessions; stopping the
  service (``stop`` request, SIGTERM) leaves them serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import select
import signal
import socket
import sys
import time

from .. import mount as core_mount
from ..errors import CoreError
from ..peer import is_own_peer, peer_text
from ..starter import ForkStarter, Spare, SpareStarter, become_forked_child
from . import protocol as p

log = logging.getLogger("core.service")

SCAN_INTERVAL = 1.0  # seconds between looks at the mount records (new mounts, adoption)
RETRY_DELAY = 2.0  # seconds before a mountpoint whose restart failed is tried again
REQUEST_TIMEOUT = 30.0  # a client has this long to send its request
SPARE_DELAY = 0.2  # seconds from a spare daemon's use (or death) to the next one's fork


def preload() -> None:
    """Import (and warm) what a mount and a daemon use, so forked workers and
    daemons start with them loaded."""
    import importlib

    import anyio
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
    import core.mergeddaemon  # noqa: F401 - a merged mount's daemon
    import core.mergedfs  # noqa: F401
    import core.registry.client  # noqa: F401
    import core.registry.store  # noqa: F401
    import core.resolver  # noqa: F401
    import core.tasks  # noqa: F401
    import core.warmup

    core.warmup.prepare()  # the sample layer every spare daemon indexes first

    # the backend module anyio.run(backend="trio") loads in each daemon
    importlib.import_module("anyio._backends._trio")
    # what a daemon's control socket loads at its first request (a mounts
    # listing, an unmount): imported there, the answer waits for it
    importlib.import_module("anyio.streams.buffered")
    # what httpx loads only at a daemon's first registry request (its
    # transport, the HTTP/1.1 parser, the CA bundle's locator, IDNA host
    # names): ~6 MB private to each daemon when loaded there (issue 17, B12)
    for name in ("httpcore", "httpcore._backends.trio", "httpcore._backends.anyio", "h11",
                 "certifi", "encodings.idna", "stringprep", "resource"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    for name in ("open_signal_receiver", "create_unix_listener", "create_task_group",
                 "fail_after", "move_on_after", "to_thread", "Event", "Lock",
                 "CapacityLimiter"):
        getattr(anyio, name, None)  # anyio imports these lazily
    # Everything loaded so far lives as long as the service: out of the
    # collector's sight, a forked worker's or daemon's collections do not
    # write to (and so copy) the pages it shares with the service.
    gc.collect()
    gc.freeze()


class Service:
    def __init__(self, path: str):
        self.path = path
        self.listener: socket.socket | None = None
        self.lock_fd = -1
        self.inode = None
        self.stop = False
        self.started = time.time()
        self.workers: dict[int, str] = {}  # pid -> what it does
        self.watched: dict[int, tuple[int, str]] = {}  # pidfd -> (daemon pid, mountpoint)
        self.restarting: dict[str, int] = {}  # mountpoint -> restart worker pid
        self.next_try: dict[str, float] = {}
        self.spare: Spare | None = None  # the next mount's daemon, forked ahead
        self.spare_due = 0.0  # when a new spare may be forked

    # -- setup -----------------------------------------------------------------
    def start(self) -> bool:
        """Take the lock and the socket; False when another service holds them."""
        self.lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a dead service's socket: we hold the lock
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            lst.bind(self.path)
        finally:
            os.umask(old)
        lst.listen(64)
        self.listener = lst
        self.inode = os.stat(self.path).st_ino
        return True

    def _still_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    def close(self) -> None:
        self._drop_spare()
        for fd in list(self.watched):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.watched.clear()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            if self._still_ours():
                with contextlib.suppress(OSError):
                    os.unlink(self.path)

    # -- the loop ----------------------------------------------------------------
    def serve(self) -> None:
        self._fork("restore", self._restore_worker)
        last_scan = 0.0
        while not self.stop:
            fds = [self.listener, *self.watched]
            wait = SCAN_INTERVAL / 2
            if self.spare is None:
                wait = min(wait, max(0.0, self.spare_due - time.monotonic()))
            try:
                ready, _, _ = select.select(fds, [], [], wait)
            except InterruptedError:
                continue
            event = False
            for r in ready:
                if r is self.listener:
                    self._accept()
                else:
                    pid, mp = self.watched.pop(r)
                    os.close(r)
                    log.info("daemon %d of %s ended", pid, mp)
                    event = True
            event = self._reap() or event
            if event or time.monotonic() - last_scan >= SCAN_INTERVAL:
                last_scan = time.monotonic()
                self._scan()
            self._renew_spare()
            if not self._still_ours():
                log.info("socket %s is gone: exiting", self.path)
                break
        log.info("stopping; the mounts keep serving")
        self.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            self._fork("request", self._request_worker, conn,
                       keep=self.spare.fds() if self.spare is not None else ())

    def _renew_spare(self) -> None:
        """Fork a spare daemon ``SPARE_DELAY`` after the last one was taken
        or died: its fork and first run then do not compete with the first
        reads of the mount that took the last."""
        now = time.monotonic()
        if self.spare is not None:
            if not self.spare.taken():
                return
            self._drop_spare()
            self.spare_due = now + SPARE_DELAY
        if now < self.spare_due:
            return
        try:
            self.spare = Spare.fork()
        except (OSError, CoreError) as e:
            log.warning("cannot fork a spare daemon: %s", e)

    def _drop_spare(self) -> None:
        if self.spare is not None:
            self.spare.close()
            self.spare = None

    def _reap(self) -> bool:
        any_done = False
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return any_done
            if not pid:
                return any_done
            any_done = True
            if self.spare is not None and pid == self.spare.pid:
                # it died before a mount took it (killed?): a new one later
                self._drop_spare()
                self.spare_due = time.monotonic() + SPARE_DELAY
            what = self.workers.pop(pid, "?")
            if what.startswith("restart "):
                mp = what[len("restart "):]
                self.restarting.pop(mp, None)
                if os.waitstatus_to_exitcode(status) != 0:
                    self.next_try[mp] = time.monotonic() + RETRY_DELAY

    def _scan(self) -> None:
        """Watch every live daemon of the records; restart the crashed ones."""
        try:
            records = core_mount.read_records()
        except (OSError, CoreError) as e:
            log.warning("cannot read the mount records: %s", e)
            return
        seen = {pid for pid, _ in self.watched.values()}
        now = time.monotonic()
        for rec in records:
            mp = rec["mountpoint"]
            for e in rec["layers"]:
                pid = e.get("pid")
                if not pid or pid in seen or not core_mount.daemon_alive(e):
                    continue
                try:
                    fd = os.pidfd_open(pid)
                except OSError:
                    continue
                if not core_mount.daemon_alive(e):  # it ended (or the pid was reused) meanwhile
                    os.close(fd)
                    continue
                self.watched[fd] = (pid, mp)
                seen.add(pid)
                log.info("watching daemon %d of %s", pid, mp)
            if (mp not in self.restarting and not rec.get("failed")
                    and now >= self.next_try.get(mp, 0.0) and core_mount.crashed(rec)):
                log.warning("%s: a daemon died without unmounting: starting it again", mp)
                pid = self._fork(f"restart {mp}", self._restart_worker, None, mp)
                if pid:
                    self.restarting[mp] = pid

    # -- workers ------------------------------------------------------------------
    def _fork(self, what: str, fn, conn: socket.socket | None = None, *args,
              keep: tuple[int, ...] = ()) -> int | None:
        try:
            pid = os.fork()
        except OSError as e:
            log.error("cannot fork a worker for %s: %s", what, e)
            return None
        if pid:
            self.workers[pid] = what
            return pid
        rc = 1
        try:
            null = os.open(os.devnull, os.O_RDONLY)
            # the listener, the lock and the pidfds stay with the service
            become_forked_child((null, 1, 2),
                                keep=(*keep, conn.fileno()) if conn is not None else keep)
            _log_setup()
            rc = fn(conn, *args) if conn is not None else fn(*args)
        except BaseException:  # noqa: BLE001 - a worker never returns into the service's loop
            log.exception("worker for %s failed", what)
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(rc or 0)

    def _restore_worker(self) -> int:
        for r in core_mount.restore(starter=ForkStarter()):
            if r["status"] != "serving":
                log.info("restore %s: %s%s", r["mountpoint"], r["status"],
                         f" ({r['error']})" if r.get("error") else "")
        return 0

    @staticmethod
    def _restart_worker(mp: str) -> int:
        try:
            rec = core_mount.revive(mp, starter=ForkStarter(), supervised=True)
        except CoreError as e:
            log.error("%s: restart failed: %s", mp, e)
            return 1
        if rec is not None and rec.get("failed"):
            log.error("%s: failed (%s)", mp, rec.get("lastError"))
        return 0

    def _request_worker(self, conn: socket.socket) -> int:
        conn.settimeout(REQUEST_TIMEOUT)
        if not is_own_peer(conn):
            # its request is read (bounded) and dropped, so the refusal is
            # what it reads back rather than a reset connection
            log.warning("refused a connection from uid %s", peer_text(conn))
            with contextlib.suppress(OSError, EOFError, p.ProtocolError):
                p.read_frame(conn)
            _send(conn, p.Reply(ok=False, kind="MountError", error=(
                f"this mount service serves uid {os.getuid()} only")))
            return 1
        try:
            req = p.decode_request(p.read_frame(conn))
        except p.ProtocolError as e:
            log.warning("refused a request: %s", e)
            _send(conn, p.Reply(ok=False, error=str(e), kind="MountError"))
            return 1
        except (EOFError, OSError):
            return 1
        conn.settimeout(None)
        if isinstance(req, p.Watch):
            return self._watch(conn, req)
        try:
            data = self._answer(req, conn)
        except CoreError as e:
            _send(conn, p.Reply(ok=False, error=str(e), kind=type(e).__name__))
            return 1
        except Exception as e:  # noqa: BLE001 - one line to the client, the trace in our log
            log.exception("request %s failed", type(req).__name__)
            _send(conn, p.Reply(ok=False, error=f"{type(e).__name__}: {e}", kind="MountError"))
            return 1
        _send(conn, p.Reply(data=data))
        return 0

    def _answer(self, req, conn: socket.socket):
        if isinstance(req, p.Mount):
            log.info("mount %s at %s", req.options.image, req.options.mountpoint)
            return core_mount.mount(req.options, starter=SpareStarter(self.spare),
                                    cancelled=lambda: _client_gone(conn))
        if isinstance(req, p.Unmount):
            log.info("unmount %s%s", req.mountpoint, " (force)" if req.force else "")
            return core_mount.unmount(req.mountpoint, force=req.force)
        if isinstance(req, p.List):
            return core_mount.list_mounts()
        if isinstance(req, p.Restore):
            return core_mount.restore(starter=ForkStarter())
        if isinstance(req, p.Repair):
            return core_mount.repair(starter=ForkStarter())
        if isinstance(req, p.Stop):
            os.kill(os.getppid(), signal.SIGTERM)
        spare = self.spare.pid if self.spare is not None and not self.spare.taken() else None
        return {"pid": os.getppid(), "started": self.started, "version": p.VERSION, "spare": spare,
                "socket": self.path, "log": _log_path_hint()}

    @staticmethod
    def _watch(conn: socket.socket, req: p.Watch) -> int:
        interval = min(max(req.interval, 0.1), 3600.0)
        n = 0
        while req.count <= 0 or n < req.count:
            try:
                data = core_mount.list_mounts()
                reply = p.Reply(data=data)
            except CoreError as e:
                reply = p.Reply(ok=False, error=str(e), kind=type(e).__name__)
            if not _send(conn, reply):
                return 0  # the client went away
            n += 1
            if req.count <= 0 or n < req.count:
                time.sleep(interval)
        return 0


class ClientGone(CoreError):
    """The client of a mount under way went away (Ctrl-C): the mount is undone."""


def _client_gone(conn: socket.socket) -> None:
    """Raise :class:`ClientGone` when the client closed its end (it sends
    nothing after its request, so a readable socket means EOF)."""
    ready, _, _ = select.select([conn], [], [], 0)
    if ready:
        try:
            data = conn.recv(1, socket.MSG_PEEK)
        except OSError:
            data = b""
        if not data:
            raise ClientGone("the mount's client went away: undoing it")


def _send(conn: socket.socket, reply: p.Reply) -> bool:
    try:
        conn.sendall(p.frame(reply))
    except (OSError, p.ProtocolError):
        return False
    return True


def _log_path_hint() -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink("/proc/self/fd/2")
    return None


def _log_setup() -> None:
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")


def run(ready_fd: int | None = None) -> int:
    """Serve until stopped (the ``run`` command); ``ready_fd`` gets ``ok``
    once serving, ``busy`` when another service holds the socket."""
    from ..proctitle import set_title
    from .client import socket_path

    _log_setup()
    set_title("stargz-tui-service")
    try:
        service = Service(socket_path())
        preload()
        started = service.start()
        if not started:
            log.info("another service holds %s", service.path)
    except Exception as e:  # noqa: BLE001 - one line; clients then mount in-process
        log.error("cannot start: %s", e)
        started = False
    if ready_fd is not None:
        with contextlib.suppress(OSError):
            os.write(ready_fd, b"ok\n" if started else b"busy\n")
            os.close(ready_fd)
    if not started:
        return 0
    signal.signal(signal.SIGTERM, lambda *_: setattr(service, "stop", True))
    signal.signal(signal.SIGINT, lambda *_: setattr(service, "stop", True))
    log.info("serving on %s (pid %d)", service.path, os.getpid())
    service.serve()
    return 0


__all__ = ["Service", "run", "preload"]
