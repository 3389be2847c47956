"""The mount manager: daemons, mount records, merged views, unmount.

Python API (the CLI and the Textual app both use it):

* ``await mount_image(image, mountpoint, *, layer=None, ...) -> dict`` mounts
  one raw layer (``layer`` = index or digest) or, without ``layer``, the
  merged image: every layer mounted privately under the state dir by its own
  daemon, then an overlay at ``mountpoint`` (kernel overlayfs as root,
  ``fuse-overlayfs`` otherwise). Returns the mount record. The mountpoint
  must be empty unless ``force=True``; a second mount of a mountpoint while
  one is under way fails (a flock per mountpoint under the state dir).
* ``unmount(mountpoint, *, force=False) -> dict``: overlay first, then the
  layers, then the daemons stop. Busy without ``force`` raises
  :class:`MountError` naming the processes that hold it; ``force`` uses
  MNT_FORCE then a lazy detach. Idempotent; cleans up after killed daemons.
* ``list_mounts() -> list[dict]``: every record with live stats from the
  daemons' control sockets; ``state`` is ``"serving"`` or ``"stale"``.
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
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from . import fusecheck, idmap
from .errors import MountError
from .paths import private_dir, runtime_socket, state_dir
from .peer import require_own_peer

log = logging.getLogger("core.mount")

MNT_FORCE = 1
MNT_DETACH = 2
READY_TIMEOUT = 120.0
STOP_TIMEOUT = 5.0
FUSE_FSTYPE = "fuse.stargz"
# Set by a process that has pre-imported the daemon's modules and runs
# mounts single-threaded (stargz_tui.resident): daemons are forked from it.
FORK_DAEMONS = False


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


# Processes that act for this one (the client a resident-server worker runs a
# command for): not named as holders of a busy mount, as this process is not.
OWN_PIDS: set[int] = set()


def find_holders(path: str) -> list[dict]:
    """Processes with an open file, cwd or root under ``path`` (other than
    this process and :data:`OWN_PIDS`)."""
    path = os.path.abspath(path)
    prefix = path.rstrip("/") + "/"
    own = {os.getpid()} | OWN_PIDS
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
def _normalise_image(image: str) -> str:
    """Make ``oci:DIR`` absolute so the daemon (cwd /) finds it."""
    if image.startswith("oci:"):
        from .reference import parse_reference

        ref = parse_reference(image)
        rest = image[4 + len(ref.layout_dir):]
        return "oci:" + os.path.abspath(ref.layout_dir) + rest
    return image


def _daemon_env() -> dict:
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _spawn_daemon(*, image: str, layer: str, mountpoint: str, control: str, logfile: str,
                  options: dict) -> tuple[subprocess.Popen, int]:
    """Start one daemon; returns (process, read end of its ready pipe)."""
    r, w = os.pipe()
    argv = ["--image", image, "--layer", str(layer), "--mountpoint", mountpoint,
            "--control", control, "--log", logfile, "--ready-fd", str(w)]
    o = options
    if o.get("cache_dir"):
        argv += ["--cache-dir", os.path.abspath(o["cache_dir"])]
    if o.get("cache_size") is not None:
        argv += ["--cache-size", str(o["cache_size"])]
    for key, flag in (("no_prefetch", "--no-prefetch"),
                      ("no_background_fetch", "--no-background-fetch"),
                      ("wait_prefetch", "--wait-prefetch"), ("allow_other", "--allow-other"),
                      ("allow_unverified", "--allow-unverified"), ("debug", "--debug"),
                      ("no_pre_resolve", "--no-pre-resolve")):
        if o.get(key):
            argv.append(flag)
    if o.get("silence") is not None:
        argv += ["--silence", str(o["silence"])]
    if o.get("prefetch_size"):
        argv += ["--prefetch-size", str(o["prefetch_size"])]
    if o.get("platform"):
        argv += ["--platform", o["platform"]]
    for host in o.get("insecure_registries") or ():
        argv += ["--insecure-registry", host]
    if o.get("opaque_xattrs"):
        argv += ["--opaque-xattrs", o["opaque_xattrs"]]
    if o.get("image_file"):
        argv += ["--image-file", o["image_file"]]
    if o.get("resolve_timeout"):
        argv += ["--resolve-timeout", str(o["resolve_timeout"])]
    if o.get("read_timeout"):
        argv += ["--read-timeout", str(o["read_timeout"])]
    for key, flag in (("uid_map", "--uid-map"), ("gid_map", "--gid-map")):
        for id_range in o.get(key) or ():
            argv += [flag, str(id_range)]
    if o.get("record"):
        argv += ["--record", o["record"]]
    logfd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        if FORK_DAEMONS and threading.active_count() == 1:
            proc = _fork_daemon(argv, logfd, w)
        else:
            proc = subprocess.Popen([sys.executable, "-m", "core.daemon", *argv], stdin=subprocess.DEVNULL, stdout=logfd, stderr=logfd,
                                    pass_fds=(w,), cwd="/", env=_daemon_env(),
                                    start_new_session=True)
    finally:
        os.close(logfd)
        os.close(w)
    return proc, r


class _ForkedDaemon:
    """The part of ``subprocess.Popen`` the mount uses, for a forked daemon."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


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


def _fork_daemon(argv: list[str], logfd: int, ready_w: int) -> _ForkedDaemon:
    """Run ``core.daemon.main(argv)`` in a forked child: what a process that
    has already imported the daemon's modules (the resident server) does
    instead of starting a new interpreter, which costs ~0.2 s of imports.
    Only called single-threaded: forking a threaded process can deadlock."""
    pid = os.fork()
    if pid:
        return _ForkedDaemon(pid)
    rc = 1
    try:
        os.setsid()
        os.chdir("/")
        null = os.open(os.devnull, os.O_RDONLY)
        # nothing of the parent's (client sockets, its listener) stays open
        become_forked_child((null, logfd, logfd), keep=(ready_w,))
        from . import daemon

        rc = daemon.main(argv)
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


def _wait_ready(proc: subprocess.Popen, rfd: int, timeout: float, logfile: str) -> dict:
    """Wait for the daemon's ready line; returns what it says about its layer
    (``index``, ``digest``, ``manifestDigest``; empty from an older daemon)."""
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([rfd], [], [], min(0.5, max(0.0, deadline - time.monotonic())))
            if ready:
                piece = os.read(rfd, 4096)
                if not piece:
                    break
                buf += piece
                if buf.endswith(b"\n"):
                    break
            elif proc.poll() is not None:
                break
    finally:
        os.close(rfd)
    line = buf.decode(errors="replace").strip()
    if line == "ok" or line.startswith("ok "):
        try:
            info = json.loads(line[3:]) if line[3:] else {}
        except ValueError:
            info = {}
        return info if isinstance(info, dict) else {}
    if line.startswith("error"):
        raise MountError(line[5:].strip())
    if proc.poll() is None:
        raise MountError(f"the mount daemon did not become ready in {timeout:g} s (log: {logfile})")
    raise MountError(f"the mount daemon exited with status {proc.returncode} (log: {logfile})")


def _overlay_mount(lowers: list[str], mountpoint: str, allow_other: bool) -> str:
    """Mount an overlay of ``lowers`` (top first) at ``mountpoint``; returns the kind."""
    if len(lowers) == 1:  # overlayfs needs two lower dirs without an upper
        empty = private_dir(os.path.join(state_dir(), "empty"))
        lowers = lowers + [empty]
    lowerdir = ":".join(p.replace(":", "\\:").replace(",", "\\,") for p in lowers)
    if os.geteuid() == 0:
        opts = f"lowerdir={lowerdir}"
        r = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts + ",ro,nosuid,nodev",
                            mountpoint], capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return "overlay"
        log.warning("kernel overlay mount failed (%s); trying fuse-overlayfs", r.stderr.strip())
    exe = shutil.which("fuse-overlayfs")
    if not exe:
        raise MountError("cannot build the merged view: kernel overlayfs needs root and "
                         "fuse-overlayfs is not installed")
    opts = f"lowerdir={lowerdir},ro,nosuid,nodev"
    if allow_other:
        opts += ",allow_other"
    r = subprocess.run([exe, "-o", opts, mountpoint], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise MountError(f"fuse-overlayfs failed: {r.stderr.strip() or r.returncode}")
    return "fuse-overlayfs"


async def mount_image(image: str, mountpoint: str, *, layer: str | int | None = None,
                      platform: str | None = None, **options) -> dict:
    """Mount ``image`` (one layer with ``layer``, else the merged view) at
    ``mountpoint``; returns the mount record once it is served.

    Options: ``prefetch``, ``background_fetch``, ``wait_prefetch``,
    ``allow_other``, ``allow_unverified``, ``cache_dir``, ``cache_size``,
    ``debug``, ``silence``, ``prefetch_size``, ``timeout``, ``read_timeout`` (seconds a
    mounted read waits for the registry before EIO), ``force`` (mount
    onto a non-empty directory, which is refused otherwise), id mapping
    (core.idmap): ``map_owner``, ``uid_map``/``gid_map`` (``C:H:N`` strings),
    ``record`` (a file the daemons append each file opened to, see
    :mod:`core.record`). A mountpoint that another mount is under way at is
    refused at once."""
    import anyio.to_thread

    steps = _mount_steps(image, mountpoint, layer=layer, platform=platform, **options)
    value, error = None, None
    for _ in range(1 << 16):  # a few steps per layer
        try:
            step = steps.throw(error) if error is not None else steps.send(value)
        except StopIteration as done:
            return done.value
        value, error = None, None
        try:
            if step[0] == "open":
                value = await _open_layers(*step[1:])
            else:
                value = await anyio.to_thread.run_sync(*step[1:])
        except BaseException as e:  # noqa: BLE001 - thrown into the steps, which clean up
            error = e
    raise MountError("mounting took too many steps")


def mount_blocking(image: str, mountpoint: str, *, layer: str | int | None = None,
                   platform: str | None = None, **options) -> dict:
    """:func:`mount_image` without an event loop or a thread in this process:
    the merged view's image is resolved in a forked child
    (:func:`_open_in_child`). A process that forks its daemons
    (``FORK_DAEMONS``) mounts images this way, since it must stay
    single-threaded."""
    steps = _mount_steps(image, mountpoint, layer=layer, platform=platform, **options)
    value, error = None, None
    for _ in range(1 << 16):
        try:
            step = steps.throw(error) if error is not None else steps.send(value)
        except StopIteration as done:
            return done.value
        value, error = None, None
        try:
            value = _open_in_child(*step[1:]) if step[0] == "open" else step[1](*step[2:])
        except BaseException as e:  # noqa: BLE001 - thrown into the steps, which clean up
            error = e
    raise MountError("mounting took too many steps")


def _open_in_child(image: str, platform: str | None, insecure_registries=(),
                   cache_dir: str | None = None):
    """:func:`_open_layers` run in a forked child (the event loop and the
    threads it may start for name lookups stay there); the resolved image
    comes back as :func:`core.image.dump_image` JSON over a pipe."""
    from . import errors
    from .image import image_from_dump

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: resolve, report, exit
        payload: dict = {"error": "resolving the image failed", "type": "MountError"}
        try:
            os.close(r)
            import anyio

            from .image import dump_image

            payload = {"image": dump_image(anyio.run(_open_layers, image, platform,
                                                     insecure_registries, cache_dir,
                                                     backend="trio"))}
        except errors.CoreError as e:
            payload = {"error": str(e), "type": type(e).__name__}
        except BaseException as e:  # noqa: BLE001 - reported to the parent, one line
            payload = {"error": f"{type(e).__name__}: {e}", "type": "MountError"}
        finally:
            with contextlib.suppress(BaseException):
                data = json.dumps(payload).encode()
                view = memoryview(data)
                while view:
                    view = view[os.write(w, view):]
            os._exit(0)
    os.close(w)
    chunks = []
    try:
        while True:
            piece = os.read(r, 1 << 16)
            if not piece:
                break
            chunks.append(piece)
    except BaseException:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.close(r)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    try:
        payload = json.loads(b"".join(chunks))
    except ValueError:
        raise MountError("resolving the image failed (its process ended early)") from None
    if "image" not in payload:
        cls = getattr(errors, str(payload.get("type")), MountError)
        if not (isinstance(cls, type) and issubclass(cls, errors.CoreError)):
            cls = MountError
        raise cls(str(payload.get("error")))
    return image_from_dump(payload["image"], None, image)


async def _open_layers(image: str, platform: str | None, insecure_registries=(),
                       cache_dir: str | None = None):
    from .image import open_image, open_store
    from .records import Records, recorded_store
    from .reference import parse_reference

    opts = {"insecure_registries": list(insecure_registries)} if insecure_registries else {}
    ref = parse_reference(image)
    # the manifest and config are kept in the cache dir's records (core.records),
    # where the layer daemons find them again after a crash or a reboot
    store = recorded_store(open_store(ref, **opts), Records.for_cache_dir(cache_dir))
    img = await open_image(ref, store=store, platform=platform)
    try:
        if not img.layers:
            raise MountError(f"{image} has no layers")
    finally:
        with contextlib.suppress(Exception):
            await img.store.aclose()
    return img


def _mount_steps(image: str, mountpoint: str, *, layer: str | int | None = None,
                 force: bool = False, **options):
    """The mount as a generator of blocking steps (``("call", fn, *args)``,
    or ``("open", image, platform)`` for the merged view's image) that its
    driver runs, in a worker thread or directly; it returns the record.

    One mount at a time per mountpoint (:class:`_MountpointLock`); a
    non-empty mountpoint is refused unless ``force`` (a mount would hide
    what it holds)."""
    mp = os.path.realpath(mountpoint)
    if not os.path.isdir(mp):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    lock = _MountpointLock(mp)  # held until the record is written (or the mount failed)
    try:
        return (yield from _mount_locked(image, mp, layer=layer, force=force, **options))
    finally:
        lock.release()


def _mount_locked(image: str, mp: str, *, layer, force: bool, prefetch: bool = True,
                  background_fetch: bool = True, wait_prefetch: bool = False,
                  allow_other: bool = False, allow_unverified: bool = False,
                  cache_dir: str | None = None, cache_size: int | None = None,
                  debug: bool = False, silence: float | None = None, prefetch_size: int = 0,
                  platform: str | None = None, insecure_registries=(),
                  timeout: float = READY_TIMEOUT, read_timeout: float | None = None,
                  map_owner: bool = False, uid_map=(), gid_map=(), record: str | None = None):
    existing = _find_record(mp)
    if existing is not None:
        raise MountError(f"{mp} is already a stargz-tui mount of {existing['image']} "
                         "(unmount it first)")
    if is_mounted(mp):
        raise MountError(f"{mp} is already a mountpoint")
    if not force:
        _refuse_non_empty(mp)
    image = _normalise_image(image)
    image_file = None
    if layer is not None:
        # One layer: the daemon resolves the image itself and says which layer
        # it serves, so the manifest and config are fetched once, not twice.
        descs = [_Pending(layer)]
        manifest_digest = None
    else:
        img = yield ("open", image, platform, tuple(insecure_registries), cache_dir)
        descs = list(img.layers)
        manifest_digest = img.manifest_digest
    # a plain user's fuse-overlayfs is one more FUSE mount
    fusecheck.check_mount(mp, allow_other=allow_other, merged=layer is None,
                          fuse_mounts=len(descs) + (layer is None and os.geteuid() != 0))
    uid_ranges, gid_ranges = _id_ranges(map_owner, uid_map, gid_map)
    mid = _mount_id(mp)
    sd = state_dir()
    if record:
        record = _start_record(record)
    logs = private_dir(os.path.join(sd, "logs"))
    if layer is None:
        # the daemons read the resolved manifest and config from here
        image_file = _write_image_file(sd, mid, img)
    rec = {
        "id": mid, "mountpoint": mp, "image": image, "manifestDigest": manifest_digest,
        "kind": "layer" if layer is not None else "merged",
        "overlay": None, "created": time.time(), "layers": [],
        "cacheDir": os.path.abspath(cache_dir) if cache_dir else None, "record": record,
        "options": {"prefetch": prefetch, "backgroundFetch": background_fetch,
                    "allowOther": allow_other, "allowUnverified": allow_unverified,
                    "debug": debug, "uidMap": [str(r) for r in uid_ranges],
                    "gidMap": [str(r) for r in gid_ranges]},
    }
    options = {"cache_dir": cache_dir, "cache_size": cache_size,
               "no_prefetch": not prefetch, "no_background_fetch": not background_fetch,
               "wait_prefetch": wait_prefetch, "allow_other": allow_other,
               "allow_unverified": allow_unverified, "debug": debug, "silence": silence,
               "prefetch_size": prefetch_size, "platform": platform,
               "read_timeout": read_timeout,
               "insecure_registries": list(insecure_registries),
               "no_pre_resolve": layer is None,
               # each layer's daemon shows the mapped ids: the overlay over them
               # (kernel or fuse-overlayfs) shows what its lowers show
               "uid_map": uid_ranges, "gid_map": gid_ranges,
               "record": record,
               # a kernel overlay (root) reads trusted.overlay.opaque and would pass
               # user.overlay.opaque through to the merged view
               "opaque_xattrs": "trusted" if layer is None and os.geteuid() == 0 else "both"}
    procs = []
    fds: list[int] = []
    try:
        for d in descs:
            if layer is not None:
                lmp = mp
            else:
                lmp = private_dir(os.path.join(sd, "layers", mid, str(d.index)))
            n = d.index if d.index is not None else 0
            entry = {"index": d.index, "digest": d.digest, "mountpoint": lmp,
                     "control": _socket_path(mid, n),
                     "log": os.path.join(logs, f"{mid}-{n}.log"), "pid": None,
                     "startTime": None}
            proc, rfd = _spawn_daemon(image=image, layer=d.digest or d.selector, mountpoint=lmp,
                                      control=entry["control"], logfile=entry["log"],
                                      options=dict(options, image_file=image_file))
            procs.append(proc)
            fds.append(rfd)
            entry["pid"] = proc.pid
            entry["startTime"] = _start_time(proc.pid)
            rec["layers"].append(entry)
            _write_record(rec)
        # wait for all daemons (they resolve in parallel)
        while procs:
            proc, rfd, entry = procs[0], fds[0], rec["layers"][len(rec["layers"]) - len(procs)]
            procs.pop(0)
            fds.pop(0)
            info = yield ("call", _wait_ready, proc, rfd, timeout, entry["log"])
            if entry["digest"] is None:
                entry["index"], entry["digest"] = info.get("index"), info.get("digest")
                rec["manifestDigest"] = info.get("manifestDigest")
        if layer is None:
            lowers = [e["mountpoint"] for e in reversed(rec["layers"])]  # top first
            rec["overlay"] = yield ("call", _overlay_mount, lowers, mp, allow_other)
        rec["pid"] = rec["layers"][0]["pid"]
        _write_record(rec)
        return rec
    except BaseException:
        yield ("call", _cleanup_failed, rec, fds)
        raise
    finally:
        if image_file:
            with contextlib.suppress(OSError):
                os.unlink(image_file)


class _MountpointLock:
    """An exclusive flock on ``STATE/locks/<mount id>.lock`` (keyed by the
    mountpoint's realpath, as the records are): a second mount of the same
    mountpoint while one is under way fails at once, in one line, instead of
    making a second kernel mount under one record. The lock file is removed
    by its holder; a lock taken on a file that was meanwhile removed (or
    replaced) is retried, so two holders never hold two different files."""

    def __init__(self, mp: str):
        d = private_dir(os.path.join(state_dir(), "locks"))
        self.path = os.path.join(d, _mount_id(mp) + ".lock")
        self.fd = -1
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MountError(f"{mp} is already being mounted by another stargz-tui "
                                 "(wait for it, or unmount it first)") from None
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


class _Pending:
    """The layer of a single-layer mount before its daemon resolved it."""

    def __init__(self, selector):
        s = str(selector).strip()
        self.selector = s
        self.digest = None
        self.index = int(s) if s.isdigit() else None


def _write_image_file(sd: str, mid: str, img) -> str:
    """The resolved image for the daemons of a merged mount (0600, removed once
    they are ready): they skip fetching the manifest and config again."""
    from .image import dump_image

    d = private_dir(os.path.join(sd, "images"))
    fd, path = tempfile.mkstemp(prefix=f"{mid}-", suffix=".json", dir=d)
    with os.fdopen(fd, "w") as f:
        json.dump(dump_image(img), f)
    return path


def _cleanup_failed(rec: dict, fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    with contextlib.suppress(MountError):
        _teardown(rec, force=True)


def _teardown(rec: dict, force: bool) -> list[str]:
    done = []
    mp = rec["mountpoint"]
    if rec.get("kind") == "merged":
        done.append(f"{mp}: {_unmount_path(mp, force)}")
    # after a lazily detached overlay, the layers stay busy until it is released
    layer_force = force or any("detached" in d for d in done)
    for e in reversed(rec["layers"]):
        try:
            how = _unmount_path(e["mountpoint"], layer_force)
        except MountError:
            if rec.get("kind") == "merged" and not force:
                how = _unmount_path(e["mountpoint"], True)
            else:
                raise
        done.append(f"{e['mountpoint']}: {how}")
    for e in rec["layers"]:
        _stop_daemon(e, unmount=False)
        with contextlib.suppress(OSError):
            if e.get("control"):
                os.unlink(e["control"])
    if rec.get("kind") == "merged":
        shutil.rmtree(os.path.join(state_dir(), "layers", rec["id"]), ignore_errors=True)
    with contextlib.suppress(OSError):
        os.unlink(_record_path(rec["id"]))
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
    # a merged mount: the overlay must go first and, if busy, nothing else moves
    if rec.get("kind") == "merged" and not force and is_mounted(rec["mountpoint"]):
        _unmount_path(rec["mountpoint"], False)
    elif rec.get("kind") == "layer" and not force:
        _unmount_path(rec["mountpoint"], False)
    steps = _teardown(rec, force)
    return {"mountpoint": rec["mountpoint"], "status": "unmounted", "steps": steps}


# -- listing ---------------------------------------------------------------------
_SUM_FIELDS = ("bytesFetched", "requests", "chunksCached", "chunksTotal", "digestErrors",
               "readErrors", "errors", "retries", "blobSize", "prefetchBytes", "recorded")


def _layer_status(e: dict, mounted: dict[str, str]) -> dict:
    out = {"index": e["index"], "digest": e["digest"], "pid": e.get("pid"),
           "mountpoint": e["mountpoint"], "log": e.get("log"), "state": "stale"}
    if not _alive(e.get("pid"), e.get("startTime")):
        out["reason"] = "daemon is not running"
        return out
    if e["mountpoint"] not in mounted:
        out["reason"] = "layer is not mounted"
        return out
    try:
        resp = daemon_request(e["control"], "stats", timeout=2.0)
    except MountError as err:
        out["reason"] = str(err)
        return out
    out["state"] = "serving"
    out["stats"] = resp["stats"]
    return out


def mount_status(rec: dict, mounted: dict[str, str] | None = None) -> dict:
    """A record plus live state and summed stats (the ``mounts --json`` object)."""
    if mounted is None:
        mounted = mount_table()
    layers = [_layer_status(e, mounted) for e in rec["layers"]]
    serving = all(lay["state"] == "serving" for lay in layers) and rec["mountpoint"] in mounted
    out = {
        "mountpoint": rec["mountpoint"], "image": rec["image"], "kind": rec.get("kind"),
        "overlay": rec.get("overlay"), "manifestDigest": rec.get("manifestDigest"),
        "pid": layers[0]["pid"] if layers else None, "pids": [lay["pid"] for lay in layers],
        "state": "serving" if serving else "stale", "created": rec.get("created"),
        "layers": layers, "record": rec.get("record"),
    }
    for k in _SUM_FIELDS:
        out[k] = sum((lay.get("stats") or {}).get(k, 0) or 0 for lay in layers)
    out["prefetchDone"] = bool(layers) and all(
        (lay.get("stats") or {}).get("prefetchDone", False) for lay in layers)
    out["backgroundFetchDone"] = bool(layers) and all(
        (lay.get("stats") or {}).get("backgroundFetchDone", False) for lay in layers)
    if not serving:
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
