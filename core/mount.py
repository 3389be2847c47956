"""The mount manager: daemons, mount records, merged views, unmount,
supervision and restore.

Python API (the mount service, the CLI and the app use it):

* ``mount(opts: MountOptions, *, starter=None) -> dict`` mounts one raw layer
  (``opts.layer`` = index or digest; a :mod:`core.daemon`) or, without it,
  the merged image: one :mod:`core.mergeddaemon` process serves every layer
  merged at the mountpoint (no overlay, no private layer mounts; the same
  for root and plain users). Blocking, no event loop, no thread; daemons are
  started by ``starter`` (:mod:`core.starter`; default: spawn a fresh
  interpreter). The daemon resolves the image and saves it
  (``images/<id>.json``) for a restart without the registry. Returns the
  mount record: ``layers`` lists the image's layers (``index``, ``digest``),
  each with the daemon serving it (``pid``, ``control``, ``log``,
  ``config``: a merged mount's layers all name its one daemon), so the same
  daemon can be started again from its :class:`core.options.DaemonConfig`. The mountpoint must be empty unless ``opts.force``; a second mount
  of a mountpoint while one is under way fails (a flock per mountpoint under
  the state dir, also held by unmount and by a restart).
  ``await mount_image(image, mountpoint, **fields)``: the same for async callers.
* ``unmount(mountpoint, *, force=False) -> dict``: the mount, then its
  daemon stops. Busy without ``force`` raises
  :class:`MountError` naming the processes that hold it; ``force`` uses
  MNT_FORCE then a lazy detach. Idempotent; cleans up after killed daemons.
* ``list_mounts() -> list[dict]``: every record with live stats from the
  daemons' control sockets; ``state`` is ``"serving"``, ``"stale"`` or
  ``"failed"``; ``restarts``, ``lastError``.
* ``crashed(rec)``: a daemon died and left its mount (kill -9, a crash);
  ``revive(mountpoint, supervised=...)``: lazily detach the dead mount and
  start its daemon again from the record (counted; ``failed`` after
  :data:`MAX_RESTARTS` in :data:`RESTART_WINDOW`); ``restore()`` /
  ``repair()``: every record not served made to serve again.
* ``daemon_request(socket_path, op) -> dict``, ``cache_usage()``,
  ``cache_prune()``; paths: ``core.paths.state_dir()``, ``runtime_dir()``.

Directories come from ``$STARGZ_TUI_STATE_DIR`` / ``$STARGZ_TUI_RUNTIME_DIR``
/ ``$STARGZ_TUI_CACHE_DIR`` when set (tests use them), else platformdirs.
State and runtime dirs are 0700; control sockets 0600.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import msgspec

from . import fusecheck, idmap
from .errors import MountError
from .options import DaemonConfig, MountOptions, config_from_builtins, to_builtins
from .paths import private_dir, runtime_socket, state_dir
from .peer import require_own_peer
from .starter import DaemonProcess, SpawnStarter

log = logging.getLogger("core.mount")

MNT_FORCE = 1
MNT_DETACH = 2
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 5.0
FUSE_FSTYPE = "fuse.stargz"


# -- directories ----------------------------------------------------------
def _records_dir() -> str:
    return private_dir(os.path.join(state_dir(), "mounts"))


def _mount_id(mountpoint: str) -> str:
    return hashlib.sha256(mountpoint.encode()).hexdigest()[:16]


def _socket_path(mid: str, n: int) -> str:
    return runtime_socket(f"{mid}-{n}.sock")


# -- records ---------------------------------------------------------------
def _record_path(mid: str) -> str:
    return os.path.join(_records_dir(), mid + ".json")


def _write_record(rec: dict) -> None:
    path = _record_path(rec["id"])
    fd, tmp = tempfile.mkstemp(prefix=".rec-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(rec, f, indent=2)
    os.replace(tmp, path)


def _read_records() -> list[dict]:
    out = []
    d = _records_dir()
    for name in sorted(os.listdir(d)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(d, name)) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and "mountpoint" in rec:
            out.append(rec)
    return out


def read_records() -> list[dict]:
    """Every mount record of this user (what ``mounts`` lists, the supervisor watches)."""
    return _read_records()


def daemon_alive(entry: dict) -> bool:
    """Is the daemon a record's layer entry names still running (the same
    process: its start time is checked, so a reused pid is not it)?"""
    return _alive(entry.get("pid"), entry.get("startTime"))


def layer_cache_dirs(digest: str) -> list[str]:
    """The ``--cache-dir`` of every mount that serves layer ``digest`` with
    its own cache (records only: no daemon is asked)."""
    out = []
    for rec in _read_records():
        d = rec.get("cacheDir")
        if d and d not in out and any(isinstance(e, dict) and e.get("digest") == digest
                                      for e in rec.get("layers") or []):
            out.append(d)
    return out


def _find_record(mountpoint: str) -> dict | None:
    real = os.path.realpath(mountpoint)
    for rec in _read_records():
        if rec["mountpoint"] in (real, os.path.abspath(mountpoint)):
            return rec
    return None


# -- processes ---------------------------------------------------------------
def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    return data.rsplit(")", 1)[1].split()[19]


def _alive(pid: int | None, start: str | None) -> bool:
    if not pid:
        return False
    st = _start_time(pid)
    if st is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
    except OSError:
        return False
    return start is None or st == start


def _wait_gone(pid: int, start: str | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # reap our own children
        if not _alive(pid, start):
            return True
        time.sleep(0.05)
    return not _alive(pid, start)


def _stop_daemon(layer: dict, unmount: bool = False) -> None:
    pid, start = layer.get("pid"), layer.get("startTime")
    if not _alive(pid, start):
        return
    sock = layer.get("control")
    if sock:
        with contextlib.suppress(MountError):
            daemon_request(sock, "shutdown", unmount=unmount, timeout=2.0)
    if _wait_gone(pid, start, STOP_TIMEOUT):
        return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, start, STOP_TIMEOUT):
        return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    _wait_gone(pid, start, STOP_TIMEOUT)


def daemon_request(sock_path: str, op: str, timeout: float = 3.0, **fields) -> dict:
    """One JSON-lines request to a daemon's control socket (served by our
    own uid, else :class:`MountError` and nothing is sent)."""
    msg = dict(fields, op=op)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(sock_path)
            require_own_peer(s, f"the daemon socket {sock_path}")
            s.sendall((json.dumps(msg) + "\n").encode())
            buf = b""
            while not buf.endswith(b"\n") and len(buf) < (64 << 20):
                piece = s.recv(1 << 16)
                if not piece:
                    break
                buf += piece
    except OSError as e:
        raise MountError(f"daemon at {sock_path} does not answer: {e.strerror or e}") from None
    try:
        resp = json.loads(buf)
    except ValueError:
        raise MountError(f"daemon at {sock_path} sent a bad answer") from None
    if not resp.get("ok"):
        raise MountError(f"daemon at {sock_path}: {resp.get('error', 'request failed')}")
    return resp


# -- the mount table -----------------------------------------------------------
def _unescape(s: str) -> str:
    return s.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "surrogateescape") \
        if "\\" in s else s


def mount_table() -> dict[str, str]:
    """Mountpoint -> filesystem type, from /proc/self/mountinfo."""
    out = {}
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts = left.split()
                if len(parts) >= 5:
                    out[_unescape(parts[4])] = right.split()[0] if right else ""
    except OSError:
        pass
    return out


def is_mounted(path: str) -> bool:
    return os.path.abspath(path) in mount_table()


_libc = None


def _umount2(path: str, flags: int) -> None:
    global _libc
    if _libc is None:
        # The interpreter's own symbols hold libc's umount2: no
        # find_library, which runs `ldconfig -p` (a fork and exec per unmount).
        _libc = ctypes.CDLL(None, use_errno=True)
        if not hasattr(_libc, "umount2"):
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.umount2(os.fsencode(path), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)


def find_holders(path: str) -> list[dict]:
    """Processes with an open file, cwd or root under ``path`` (other than
    this process)."""
    path = os.path.abspath(path)
    prefix = path.rstrip("/") + "/"
    own = {os.getpid()}
    out = []
    for pid_s in os.listdir("/proc"):
        if not pid_s.isdigit() or int(pid_s) in own:
            continue
        how = []
        base = f"/proc/{pid_s}"
        for what in ("cwd", "root"):
            try:
                t = os.readlink(f"{base}/{what}")
            except OSError:
                continue
            if t == path or t.startswith(prefix):
                how.append(what)
        try:
            fds = os.listdir(f"{base}/fd")
        except OSError:
            fds = []
        for fd in fds:
            try:
                t = os.readlink(f"{base}/fd/{fd}")
            except OSError:
                continue
            if t == path or t.startswith(prefix):
                how.append(f"fd {fd} ({t})")
                break
        if how:
            try:
                with open(f"{base}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            out.append({"pid": int(pid_s), "command": comm, "uses": how})
    return out


def _holders_text(holders: list[dict]) -> str:
    if not holders:
        return "no process found holding it (a nested mount or the kernel?)"
    return "held by " + ", ".join(
        f"pid {h['pid']} ({h['command']}: {', '.join(h['uses'])})" for h in holders[:8])


def _fusermount_unmount(path: str, lazy: bool) -> None:
    exe = fusecheck.find_fusermount() or shutil.which("fusermount")
    if not exe:
        raise OSError(errno.EPERM, "only root may, or a plain user through fusermount3, "
                      "which is not installed (Debian: `apt install fuse3`)", path)
    r = subprocess.run([exe, "-uz" if lazy else "-u", path], capture_output=True, text=True,
                       timeout=30)
    if r.returncode != 0:
        msg = r.stderr.strip()
        code = errno.EBUSY if "busy" in msg.lower() else errno.EPERM
        raise OSError(code, msg or "fusermount3 failed", path)


def _unmount_path(path: str, force: bool) -> str:
    """Unmount one mount; returns how ("unmounted", "detached", "not-mounted")."""
    if not is_mounted(path):
        return "not-mounted"
    try:
        try:
            _umount2(path, 0)
        except OSError as e:
            if e.errno == errno.EPERM:
                _fusermount_unmount(path, lazy=False)
            else:
                raise
        return "unmounted"
    except OSError as e:
        if e.errno == errno.EINVAL and not is_mounted(path):
            return "not-mounted"
        if e.errno != errno.EBUSY:
            raise MountError(f"cannot unmount {path}: {e.strerror}") from None
    if not force:
        raise MountError(f"{path} is busy: {_holders_text(find_holders(path))}; "
                         "close them or use --force")
    with contextlib.suppress(OSError):
        _umount2(path, MNT_FORCE)
        if not is_mounted(path):
            return "unmounted"
    try:
        _umount2(path, MNT_DETACH)
    except OSError as e:
        if e.errno == errno.EPERM:
            try:
                _fusermount_unmount(path, lazy=True)
            except OSError as e2:
                raise MountError(f"cannot detach {path}: {e2.strerror}") from None
        elif is_mounted(path):
            raise MountError(f"cannot detach {path}: {e.strerror}") from None
    return "detached"


# -- mounting ------------------------------------------------------------------
def _image_file(mid: str) -> str:
    """Where a mount keeps its resolved image (core.image.dump_image JSON,
    written by its first daemon): daemons started again after a crash or a
    reboot read the manifest and config from here, not from the registry."""
    return os.path.join(private_dir(os.path.join(state_dir(), "images")), mid + ".json")


def _detach(path: str) -> None:
    """Lazily detach whatever is mounted at ``path`` (a dead daemon's mount:
    every access fails with ENOTCONN until it is gone)."""
    if not is_mounted(path):
        return
    try:
        _umount2(path, MNT_DETACH)
    except OSError as e:
        if e.errno != errno.EPERM:
            if is_mounted(path):
                raise MountError(f"cannot detach {path}: {e.strerror}") from None
            return
        try:
            _fusermount_unmount(path, lazy=True)
        except OSError as e2:
            raise MountError(f"cannot detach {path}: {e2.strerror}") from None


def _start_daemon(starter, cfg: DaemonConfig, entry: dict) -> DaemonProcess:
    proc = starter.start(cfg)
    entry["pid"] = proc.pid
    entry["startTime"] = _start_time(proc.pid)
    return proc


def _wait_ready(proc: DaemonProcess, deadline: float, timeout: float, logfile: str,
                cancelled=None) -> dict:
    """Wait for the daemon's ``ok`` line; returns what it says about its layer
    (``index``, ``digest``, ``manifestDigest``)."""
    try:
        line = proc.read_line(deadline, cancelled)
    finally:
        proc.close()
    line = line or ""
    if line == "ok" or line.startswith("ok "):
        try:
            info = json.loads(line[3:]) if line[3:] else {}
        except ValueError:
            info = {}
        return info if isinstance(info, dict) else {}
    if line.startswith("error"):
        raise MountError(line[5:].strip())
    if proc.poll() is None and time.monotonic() >= deadline:
        raise MountError(f"the mount daemon did not become ready in {timeout:g} s (log: {logfile})")
    return _exited(proc, logfile)


def _exited(proc: DaemonProcess, logfile: str):
    rc = proc.poll()
    how = f"with status {rc}" if rc is not None and rc >= 0 else "early"
    raise MountError(f"the mount daemon exited {how} (log: {logfile})")


def mount(opts: MountOptions, *, starter=None, cancelled=None) -> dict:
    """Mount as ``opts`` says (one raw layer with ``opts.layer``, else the
    merged view); returns the mount record once it is served. Blocking, no
    event loop and no thread: the mount service's single-threaded workers
    call it with a :class:`core.starter.ForkStarter`, the CLI and the app
    without a service with the default :class:`core.starter.SpawnStarter`.

    One mount at a time per mountpoint (:class:`_MountpointLock`); a
    non-empty mountpoint is refused unless ``opts.force`` (a mount would hide
    what it holds). ``cancelled()`` is asked while daemons start; what it
    raises stops the mount, which is undone (the service's worker raises
    when its client went away: Ctrl-C)."""
    starter = starter if starter is not None else SpawnStarter()
    mp = os.path.realpath(opts.mountpoint)
    if not os.path.isdir(mp):
        raise MountError(f"mountpoint {opts.mountpoint} is not a directory")
    lock = _MountpointLock(mp)  # held until the record is written (or the mount failed)
    try:
        return _mount_locked(opts, mp, starter, cancelled)
    finally:
        lock.release()


async def mount_image(image: str, mountpoint: str, *, layer: str | int | None = None,
                      starter=None, **options) -> dict:
    """:func:`mount` for async callers (in a worker thread); ``options`` are
    :class:`core.options.MountOptions` fields, relative paths taken against
    this process's working directory."""
    import functools

    import anyio.to_thread

    opts = MountOptions.build(image, mountpoint, layer=layer, **options)
    return await anyio.to_thread.run_sync(functools.partial(mount, opts, starter=starter))


def _daemon_config(opts: MountOptions, *, layer: str, mountpoint: str, control: str, log: str,
                   image_file: str, merged: bool, uid_ranges, gid_ranges,
                   record: str | None) -> DaemonConfig:
    from .cache import default_cache_dir

    return DaemonConfig(
        image=opts.image, layer=layer, merged=merged, mountpoint=mountpoint, control=control,
        log=log,
        # the cache dir is fixed now: a daemon started again (a restart, a
        # restore at login) uses the same cache whatever its environment
        image_file=image_file, cache_dir=opts.cache_dir or default_cache_dir(),
        cache_size=opts.cache_size,
        prefetch=opts.prefetch, background_fetch=opts.background_fetch,
        prefetch_size=opts.prefetch_size, wait_prefetch=opts.wait_prefetch,
        pre_resolve=not merged, allow_other=opts.allow_other,
        allow_unverified=opts.allow_unverified, silence=opts.silence,
        read_timeout=opts.read_timeout, platform=opts.platform,
        insecure_registries=opts.insecure_registries,
        uid_map=tuple(str(r) for r in uid_ranges), gid_map=tuple(str(r) for r in gid_ranges),
        record=record, debug=opts.debug, tuning=opts.tuning)


def _mount_locked(opts: MountOptions, mp: str, starter, cancelled) -> dict:
    existing = _find_record(mp)
    if existing is not None:
        raise MountError(f"{mp} is already a stargz-tui mount of {existing['image']} "
                         "(unmount it first)")
    if is_mounted(mp):
        raise MountError(f"{mp} is already a mountpoint")
    if not opts.force:
        _refuse_non_empty(mp)
    merged = opts.layer is None
    # one FUSE mount either way: a merged mount is one process serving every layer
    fusecheck.check_mount(mp, allow_other=opts.allow_other, fuse_mounts=1)
    uid_ranges, gid_ranges = _id_ranges(opts.map_owner, opts.uid_map, opts.gid_map)
    mid = _mount_id(mp)
    sd = state_dir()
    record = _start_record(opts.record) if opts.record else None
    logs = private_dir(os.path.join(sd, "logs"))
    image_file = _image_file(mid)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(image_file)  # a former mount's at this mountpoint
    rec = {
        "id": mid, "mountpoint": mp, "image": opts.image, "manifestDigest": None,
        "kind": "merged" if merged else "layer",
        "overlay": None, "created": time.time(), "layers": [],
        "cacheDir": opts.cache_dir, "record": record, "imageFile": image_file,
        "restarts": 0, "restartTimes": [], "lastError": None, "failed": False,
        "options": {"prefetch": opts.prefetch, "backgroundFetch": opts.background_fetch,
                    "allowOther": opts.allow_other, "allowUnverified": opts.allow_unverified,
                    "debug": opts.debug, "uidMap": [str(r) for r in uid_ranges],
                    "gidMap": [str(r) for r in gid_ranges]},
        "mountOptions": to_builtins(opts),
    }
    sel = opts.layer if not merged else "0"
    n = int(sel) if sel.isdigit() else 0
    entry = {"index": None if merged else (n if sel.isdigit() else None), "digest": None,
             "mountpoint": mp, "control": _socket_path(mid, n),
             "log": os.path.join(logs, f"{mid}-{n}.log"), "pid": None, "startTime": None}
    cfg = _daemon_config(opts, layer=sel, mountpoint=mp, control=entry["control"],
                         log=entry["log"], image_file=image_file, merged=merged,
                         uid_ranges=uid_ranges, gid_ranges=gid_ranges, record=record)
    entry["config"] = to_builtins(cfg)
    deadline = time.monotonic() + opts.timeout
    proc = None
    try:
        proc = _start_daemon(starter, cfg, entry)
        rec["layers"].append(entry)
        _write_record(rec)
        info = _wait_ready(proc, deadline, opts.timeout, entry["log"], cancelled)
        rec["manifestDigest"] = info.get("manifestDigest")
        if merged:
            # the image's layers, bottom first, each served by the one daemon
            rec["layers"] = [dict(entry, index=lay.get("index"), digest=lay.get("digest"))
                             for lay in info.get("layers") or []]
            if not rec["layers"]:
                raise MountError(f"{opts.image} has no layers")
        else:
            entry["index"], entry["digest"] = info.get("index"), info.get("digest")
        rec["pid"] = entry["pid"]
        _write_record(rec)
        return rec
    except BaseException:
        if proc is not None:
            proc.close()
        if not rec["layers"]:
            rec["layers"].append(entry)
        with contextlib.suppress(MountError):
            _teardown(rec, force=True)
        raise


# -- supervision: daemons started again ---------------------------------------------
# A daemon that keeps dying is given up on: more than this many restarts in
# the window and the mount is marked failed (shown with the daemon's last log line).
MAX_RESTARTS = 5
RESTART_WINDOW = 600.0
RESTORE_LOCK_WAIT = 30.0  # restore waits this long for a restart or mount under way


def last_log_line(path: str | None) -> str | None:
    """The last non-empty line of a daemon's log (why it died, usually)."""
    lines = [x.strip() for x in fusecheck.log_tail(path) if x.strip()]
    return lines[-1] if lines else None


def _dead_layers(rec: dict, mounted: dict[str, str]) -> list[int]:
    return [i for i, e in enumerate(rec["layers"])
            if not _alive(e.get("pid"), e.get("startTime")) or e["mountpoint"] not in mounted]


def crashed(rec: dict) -> bool:
    """Did a daemon of this mount die without unmounting (kill -9, a crash,
    the OOM killer)? Its mount is still in the table, answering ENOTCONN. A
    daemon that ended cleanly (SIGTERM, an unmount from outside) took its
    mount with it: that is a stop, not a crash."""
    mounted = mount_table()
    return any(not _alive(e.get("pid"), e.get("startTime")) and e["mountpoint"] in mounted
               for e in rec["layers"])


def needs_revival(rec: dict) -> bool:
    """Is a recorded mount not served (a daemon gone, a mount missing)?"""
    mounted = mount_table()
    return bool(_dead_layers(rec, mounted)) or rec["mountpoint"] not in mounted


def revive(mountpoint: str, *, starter=None, supervised: bool = False,
           reset: bool = False, wait: float = 0.0) -> dict | None:
    """Make a recorded mount serve again at the same place, from its record,
    its saved image file and its cache: a dead daemon's mount is lazily
    detached and a new daemon started with the same config (a merged mount:
    its one daemon, for every layer). Returns the record (None when there is
    none any more).

    ``supervised``: a restart after a crash, counted in the record
    (``restarts``, ``restartTimes``); after :data:`MAX_RESTARTS` in
    :data:`RESTART_WINDOW` the mount is marked ``failed`` (with the dead
    daemon's last log line as ``lastError``) and not restarted. A failed
    mount is left alone unless ``reset`` (``mounts repair``). Raises
    ``MountError`` when the mountpoint's lock is taken (a mount or unmount
    is under way) or a daemon cannot be started (recorded as ``lastError``)."""
    starter = starter if starter is not None else SpawnStarter()
    rec = _find_record(mountpoint)
    if rec is None:
        return None
    lock = _MountpointLock(rec["mountpoint"], busy="is being mounted or unmounted right now",
                           wait=wait)
    try:
        rec = _find_record(rec["mountpoint"])  # as it is now that we hold the lock
        if rec is None:
            return None
        if reset:
            rec["failed"], rec["restartTimes"] = False, []
        if rec.get("failed"):
            return rec
        mounted = mount_table()
        dead = _dead_layers(rec, mounted)
        if not dead and rec["mountpoint"] in mounted:
            return rec
        if supervised:
            now = time.time()
            times = [t for t in rec.get("restartTimes") or [] if now - t < RESTART_WINDOW]
            gone = rec["layers"][dead[0]] if dead else {}
            tail = last_log_line(gone.get("log"))
            why = (f"daemon {gone.get('pid')} of layer {gone.get('index')} died without "
                   f"unmounting" + (f"; its last log line: {tail}" if tail else ""))
            if len(times) >= MAX_RESTARTS:
                rec["failed"] = True
                rec["lastError"] = why
                rec["restartTimes"] = times
                _write_record(rec)
                log.warning("%s: %d restarts in %.0f s: giving up (%s)", rec["mountpoint"],
                            len(times), RESTART_WINDOW, rec["lastError"])
                return rec
            rec["restartTimes"] = times + [now]
            rec["restarts"] = int(rec.get("restarts") or 0) + 1
            rec["lastError"] = why
        try:
            _revive_locked(rec, dead, mounted, starter)
        except MountError as e:
            rec["lastError"] = str(e)
            raise
        finally:
            _write_record(rec)
        return rec
    finally:
        lock.release()


def _daemon_groups(rec: dict) -> list[list[dict]]:
    """A record's daemons, each as the layer entries it serves (a merged
    mount: one daemon for every layer; a raw layer: one for its one)."""
    groups: dict[str, list[dict]] = {}
    for e in rec["layers"]:
        groups.setdefault(e.get("control") or e["mountpoint"], []).append(e)
    return list(groups.values())


def _revive_locked(rec: dict, dead: list[int], mounted: dict[str, str], starter) -> None:
    mp = rec["mountpoint"]
    opts = rec.get("mountOptions") or {}
    deadline = time.monotonic() + float(opts.get("timeout") or READY_TIMEOUT)
    dead_ids = {id(rec["layers"][i]) for i in dead}
    started = []
    for group in _daemon_groups(rec):
        if not any(id(e) in dead_ids for e in group):
            continue
        e = group[0]
        if _alive(e.get("pid"), e.get("startTime")):
            _stop_daemon(e, unmount=False)  # alive but its mount is gone
        _detach(e["mountpoint"])
        with contextlib.suppress(OSError):
            os.unlink(e["control"])
        cfg = config_from_builtins(e.get("config"))
        proc = _start_daemon(starter, msgspec.structs.replace(cfg, wait_prefetch=False), e)
        for other in group[1:]:  # the same daemon serves them all
            other["pid"], other["startTime"] = e["pid"], e["startTime"]
        started.append((proc, e))
    try:
        for proc, e in started:
            _wait_ready(proc, deadline, READY_TIMEOUT, e["log"])
    except BaseException:
        for proc, e in started:
            proc.close()
            _stop_daemon(e, unmount=True)
        raise
    rec["pid"] = rec["layers"][0]["pid"]
    log.info("%s: serving again (daemon %s)", mp, ", ".join(str(e["pid"]) for _, e in started))


def restore(*, starter=None, reset: bool = False) -> list[dict]:
    """Every recorded mount that is not served, made to serve again (after a
    reboot, or by the service when it starts): one result per record,
    ``{"mountpoint", "status": "serving"|"restored"|"failed"|"error", "error"?}``."""
    out = []
    for rec in _read_records():
        mp = rec["mountpoint"]
        if not reset and rec.get("failed"):
            out.append({"mountpoint": mp, "status": "failed", "error": rec.get("lastError")})
            continue
        if not needs_revival(rec):
            out.append({"mountpoint": mp, "status": "serving"})
            continue
        try:
            revive(mp, starter=starter, reset=reset, wait=RESTORE_LOCK_WAIT)
        except MountError as e:
            out.append({"mountpoint": mp, "status": "error", "error": str(e)})
            continue
        out.append({"mountpoint": mp, "status": "restored"})
    return out


def repair(*, starter=None) -> list[dict]:
    """:func:`restore` for every record, failed ones included; records whose
    mountpoint is gone are dropped (their mounts detached, daemons stopped),
    and stargz FUSE mounts no record knows are lazily detached."""
    out = []
    for rec in _read_records():
        if not os.path.isdir(rec["mountpoint"]) and not is_mounted(rec["mountpoint"]):
            with contextlib.suppress(MountError):
                _teardown(rec, force=True)
            out.append({"mountpoint": rec["mountpoint"], "status": "removed",
                        "error": "the mountpoint no longer exists"})
    out += restore(starter=starter, reset=True)
    known = {r["mountpoint"] for r in _read_records()}
    for path, fstype in mount_table().items():
        if fstype == FUSE_FSTYPE and path not in known and _owned_by_us(path):
            with contextlib.suppress(MountError):
                _detach(path)
                out.append({"mountpoint": path, "status": "detached",
                            "error": "a stargz mount without a record"})
    return out


def _owned_by_us(path: str) -> bool:
    """A FUSE mount's user_id (mountinfo super options) is ours."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                parts = left.split()
                if len(parts) >= 5 and _unescape(parts[4]) == path:
                    return f"user_id={os.getuid()}," in right + ","
    except OSError:
        pass
    return False


class _MountpointLock:
    """An exclusive flock on ``STATE/locks/<mount id>.lock`` (keyed by the
    mountpoint's realpath, as the records are): a second mount of the same
    mountpoint while one is under way fails at once, in one line, instead of
    making a second kernel mount under one record. The lock file is removed
    by its holder; a lock taken on a file that was meanwhile removed (or
    replaced) is retried, so two holders never hold two different files."""

    def __init__(self, mp: str, busy: str = "is already being mounted by another stargz-tui "
                 "(wait for it, or unmount it first)", wait: float = 0.0):
        d = private_dir(os.path.join(state_dir(), "locks"))
        self.path = os.path.join(d, _mount_id(mp) + ".lock")
        self.fd = -1
        deadline = time.monotonic() + wait
        for _ in range(100 + int(wait * 20)):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:  # (restore: a restart under way ends soon)
                    time.sleep(0.05)
                    continue
                raise MountError(f"{mp} {busy}") from None
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)  # its holder removed it after we opened it: take the new one
        raise MountError(f"cannot take the mount lock {self.path}")

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = -1


def _refuse_non_empty(mp: str) -> None:
    try:
        with os.scandir(mp) as it:
            first = next(it, None)
    except OSError as e:
        raise MountError(f"cannot read mountpoint {mp}: {e.strerror}") from None
    if first is not None:
        raise MountError(f"{mp} is not empty (it holds {first.name!r}): a mount would hide "
                         "its contents; choose an empty directory or pass --force")


def _id_ranges(map_owner: bool, uid_map, gid_map) -> tuple[list, list]:
    """The uid and gid ranges of a mount (core.idmap): explicit ones first,
    then ``map_owner``'s (the first range holding an id wins)."""
    uids, gids = idmap.parse_ranges(uid_map), idmap.parse_ranges(gid_map)
    if map_owner:
        ou, og = idmap.owner_mapping()
        uids, gids = uids + ou, gids + og
    return uids, gids


def _start_record(path: str) -> str:
    """Create (or empty) the record file every layer daemon appends to
    (core.record); returns its absolute path (the daemons run in /)."""
    path = os.path.abspath(path)
    try:
        with open(path, "w"):
            pass
    except OSError as e:
        raise MountError(f"cannot write the record file {path}: {e.strerror}") from None
    return path


def _teardown(rec: dict, force: bool) -> list[str]:
    done = []
    for group in _daemon_groups(rec):
        path = group[0]["mountpoint"]
        done.append(f"{path}: {_unmount_path(path, force)}")
    for group in _daemon_groups(rec):
        e = group[0]
        _stop_daemon(e, unmount=False)
        with contextlib.suppress(OSError):
            if e.get("control"):
                os.unlink(e["control"])
    with contextlib.suppress(OSError):
        os.unlink(_record_path(rec["id"]))
    if rec.get("imageFile"):
        with contextlib.suppress(OSError):
            os.unlink(rec["imageFile"])
    return done


def is_stargz_mount(mountpoint: str) -> bool:
    """Is ``mountpoint`` one of our mounts (a record of this user's, or a
    stargz FUSE mount left without one)? What :func:`unmount` would touch."""
    if _find_record(mountpoint) is not None:
        return True
    return mount_table().get(os.path.abspath(mountpoint)) == FUSE_FSTYPE


def unmount(mountpoint: str, *, force: bool = False) -> dict:
    """Unmount a stargz-tui mount (see module docs). Idempotent."""
    mp = os.path.realpath(mountpoint) if os.path.exists(mountpoint) or not os.path.isabs(
        mountpoint) else mountpoint
    rec = _find_record(mp)
    if rec is None:
        mp_abs = os.path.abspath(mountpoint)
        fstype = mount_table().get(mp_abs)
        if fstype is None:
            return {"mountpoint": mp_abs, "status": "not-mounted", "steps": []}
        if fstype != FUSE_FSTYPE:
            raise MountError(f"{mp_abs} is a {fstype} mount not made by stargz-tui; not touching it")
        return {"mountpoint": mp_abs, "status": "unmounted",
                "steps": [f"{mp_abs}: {_unmount_path(mp_abs, force)}"]}
    # the supervisor does not start a daemon again while we stop it
    lock = _MountpointLock(rec["mountpoint"], busy="is being mounted or restarted right now; "
                           "try again in a moment")
    try:
        rec = _find_record(rec["mountpoint"])
        if rec is None:
            return {"mountpoint": mp, "status": "unmounted", "steps": []}
        if not force:  # busy: nothing is torn down
            _unmount_path(rec["mountpoint"], False)
        steps = _teardown(rec, force)
    finally:
        lock.release()
    return {"mountpoint": rec["mountpoint"], "status": "unmounted", "steps": steps}


# -- listing ---------------------------------------------------------------------
_SUM_FIELDS = ("bytesFetched", "requests", "chunksCached", "chunksTotal", "digestErrors",
               "readErrors", "errors", "retries", "blobSize", "prefetchBytes", "recorded")


def _layer_status(e: dict, mounted: dict[str, str], answers: dict) -> dict:
    """One layer's state and stats; ``answers`` keeps each daemon's answer,
    so a merged mount's one daemon is asked once for all its layers."""
    out = {"index": e["index"], "digest": e["digest"], "pid": e.get("pid"),
           "mountpoint": e["mountpoint"], "log": e.get("log"), "state": "stale"}
    if not _alive(e.get("pid"), e.get("startTime")):
        out["reason"] = "daemon is not running"
        return out
    if e["mountpoint"] not in mounted:
        out["reason"] = "layer is not mounted"
        return out
    key = e["control"]
    if key not in answers:
        try:
            answers[key] = daemon_request(key, "stats", timeout=2.0)["stats"]
        except MountError as err:
            answers[key] = err
    stats = answers[key]
    if isinstance(stats, MountError):
        out["reason"] = str(stats)
        return out
    per = stats.get("layers")  # a merged daemon: each layer's own stats
    if isinstance(per, list):
        i = e.get("index")
        stats = per[i] if isinstance(i, int) and 0 <= i < len(per) else {}
    out["state"] = "serving"
    out["stats"] = stats
    return out


def mount_status(rec: dict, mounted: dict[str, str] | None = None) -> dict:
    """A record plus live state and summed stats (the ``mounts --json`` object);
    ``pids`` names each daemon once (a merged mount: one)."""
    if mounted is None:
        mounted = mount_table()
    answers: dict = {}
    layers = [_layer_status(e, mounted, answers) for e in rec["layers"]]
    serving = all(lay["state"] == "serving" for lay in layers) and rec["mountpoint"] in mounted
    out = {
        "mountpoint": rec["mountpoint"], "image": rec["image"], "kind": rec.get("kind"),
        "overlay": rec.get("overlay"), "manifestDigest": rec.get("manifestDigest"),
        "pid": layers[0]["pid"] if layers else None,
        "pids": list(dict.fromkeys(lay["pid"] for lay in layers)),
        "state": "failed" if rec.get("failed") else "serving" if serving else "stale",
        "created": rec.get("created"), "layers": layers, "record": rec.get("record"),
        "restarts": int(rec.get("restarts") or 0), "lastError": rec.get("lastError"),
    }
    for k in _SUM_FIELDS:
        out[k] = sum((lay.get("stats") or {}).get(k, 0) or 0 for lay in layers)
    out["prefetchDone"] = bool(layers) and all(
        (lay.get("stats") or {}).get("prefetchDone", False) for lay in layers)
    out["backgroundFetchDone"] = bool(layers) and all(
        (lay.get("stats") or {}).get("backgroundFetchDone", False) for lay in layers)
    if rec.get("failed"):
        out["reason"] = f"given up after {out['restarts']} restarts: {rec.get('lastError')}"
    elif not serving:
        reasons = [f"layer {lay['index']}: {lay['reason']}" for lay in layers if lay.get("reason")]
        if rec["mountpoint"] not in mounted:
            reasons.insert(0, "mountpoint is not mounted")
        out["reason"] = "; ".join(reasons)
    return out


def find_layer_mount(mounts: list[dict], digest: str) -> dict | None:
    """Of ``mounts`` (as :func:`list_mounts` gives them), the one that shows
    layer ``digest``: a raw mount of that layer before a merged image holding
    it, serving mounts before stale ones; None when it is not mounted."""
    def rank(m: dict) -> tuple[int, int]:
        return (m.get("state") != "serving", m.get("kind") != "layer")

    holding = [m for m in mounts
               if any(lay.get("digest") == digest for lay in m.get("layers") or [])]
    return min(holding, key=rank) if holding else None


def list_mounts() -> list[dict]:
    """Every recorded mount with live state (see :func:`mount_status`)."""
    mounted = mount_table()
    return [mount_status(rec, mounted) for rec in _read_records()]


# -- the cache ---------------------------------------------------------------------
def cache_usage(cache_dir: str | None = None) -> dict:
    """The chunk cache's usage, with its image records' under ``records``."""
    from .cache import ChunkCache
    from .records import Records

    usage = ChunkCache(cache_dir).usage()
    usage["records"] = Records.for_cache_dir(usage["dir"]).usage()
    return usage


def cache_prune(cache_dir: str | None = None) -> dict:
    """Remove the cached chunks and the image records no recorded mount names
    (a mount's records are what brings it back after a crash or a reboot)."""
    from .cache import ChunkCache
    from .records import Records

    res = ChunkCache(cache_dir).prune()
    keep = [rec.get("manifestDigest") for rec in _read_records()]
    res.update(Records.for_cache_dir(res["dir"]).prune(keep))
    return res
