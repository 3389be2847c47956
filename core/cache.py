"""The chunk cache: decompressed, verified chunks on disk, a small LRU in memory.

Keys are chunk digests where the TOC gives one (so identical chunks of
different layers, or of two mounts of one image, are stored once) and
``<blob digest>-<offset>-<inner offset>-<size>`` otherwise. Every file is
written to a temporary name and renamed into place, so a crash never leaves a
torn chunk under a real key. A chunk file is verified (digest, or size for
keys without a digest) once per cache object: the first time it is loaded
from disk (a damaged file is deleted and treated as a miss); files this
object wrote itself count as verified. Verified chunks can then be read in
pieces with :meth:`ChunkCache.read_range` (a ``pread`` of just the range on
a kept-open file descriptor), so a warm read never loads or hashes a whole
chunk again.

The disk store has a size budget with least-recently-used eviction (file
mtimes are touched on hits). Running out of space (ENOSPC, EDQUOT, a
read-only cache dir) never fails a read: the cache logs one warning, stops
writing for a while and the reader keeps serving from the network.

All methods are blocking and thread-safe: async callers run the disk paths
in worker threads (``get_memory`` is cheap and may run anywhere).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import mmap
import os
import re
import shutil
import threading
import time
from collections import OrderedDict

log = logging.getLogger("core.cache")

DEFAULT_MAX_BYTES = 4 << 30
DEFAULT_MEMORY_BYTES = 64 << 20
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_DISK_RETRY_AFTER = 30.0
_KEY_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_MAX_FDS = 64  # chunk files kept open for read_range
_DIRECT_MIN = 256 << 10  # chunks at least this big are written with O_DIRECT
_ALIGN = 4096


def default_cache_dir() -> str:
    """``$STARGZ_TUI_CACHE_DIR`` or the platform's user cache dir."""
    env = os.environ.get("STARGZ_TUI_CACHE_DIR")
    if env:
        return env
    import platformdirs

    return platformdirs.user_cache_dir("stargz-tui")


def parse_size(text: str | int | None) -> int | None:
    """``"4G"``, ``"512MiB"``, ``"1000000"`` -> bytes (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)(i?b?)", s)
    if not m:
        raise ValueError(f"invalid size {text!r} (use e.g. 512M, 4G, 1000000)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * mult)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def chunk_key(blob_digest: str, chunk) -> str:
    """The cache key of a :class:`core.estargz.Chunk`."""
    if chunk.digest:
        algo, _, hexd = chunk.digest.partition(":")
        return f"{algo}-{hexd}"
    algo, _, hexd = blob_digest.partition(":")
    return f"{algo}-{hexd}-{chunk.offset}-{chunk.inner_offset}-{chunk.chunk_size}"


def _check(key: str, data: bytes) -> bool:
    """Does ``data`` match what ``key`` promises (digest keys only)?"""
    parts = key.split("-")
    if len(parts) == 2 and parts[0] == "sha256":
        return hashlib.sha256(data).hexdigest() == parts[1]
    if len(parts) == 5:
        try:
            return len(data) == int(parts[4])
        except ValueError:
            return False
    return True


class ChunkCache:
    """Disk store of chunks with a memory LRU in front (see module docs)."""

    def __init__(self, root: str | None = None, *, max_bytes: int | None = None,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES):
        self.root = os.path.abspath(root or default_cache_dir())
        self.chunk_dir = os.path.join(self.root, "chunks")
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        self.memory_bytes = memory_bytes
        self._mem: OrderedDict[str, bytes] = OrderedDict()
        self._mem_size = 0
        self._lock = threading.Lock()
        self._disk_off_until = 0.0
        self._disk_size: int | None = None  # estimate; None = not scanned yet
        self._verified: dict[str, int] = {}  # disk files known good here -> size
        self._fds: OrderedDict[str, int] = OrderedDict()  # open chunk files (read_range)
        # Descriptors are closed only under _rlock (read_range's), never while
        # a pread may use them: another thread's _forget queues them here.
        self._fd_garbage: list[int] = []
        self._rlock = threading.Lock()
        self._dirs_made: set[str] = set()
        self._tmp_seq = 0
        self._tls = threading.local()  # per-thread aligned buffer for O_DIRECT
        self._direct_ok = os.environ.get("STARGZ_TUI_CACHE_DIRECT", "1") != "0"
        self.hits = 0
        self.memory_hits = 0
        self.misses = 0
        self.writes = 0
        self.write_errors = 0
        self.corrupt = 0
        self.evicted = 0
        self.warning: str | None = None
        try:
            # makedirs applies mode only to the leaf: create the root 0700 too
            # (chunks are image content the user may not want others to read).
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.makedirs(self.chunk_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            self._disable(e)

    # -- paths -------------------------------------------------------
    def _path(self, key: str) -> str:
        if not _KEY_RE.match(key):
            raise ValueError(f"bad cache key {key!r}")
        h = key.rsplit("-", 1)[-1] if key.count("-") == 1 else hashlib.sha1(key.encode()).hexdigest()
        return os.path.join(self.chunk_dir, h[:2], key)

    # -- memory LRU --------------------------------------------------
    def get_memory(self, key: str) -> bytes | None:
        with self._lock:
            data = self._mem.get(key)
            if data is not None:
                self._mem.move_to_end(key)
                self.memory_hits += 1
            return data

    def remember(self, key: str, data: bytes) -> None:
        """Keep ``data`` (verified bytes of ``key``) in the memory LRU only."""
        self._remember(key, data)

    def _remember(self, key: str, data: bytes) -> None:
        if len(data) > self.memory_bytes // 4:
            return
        with self._lock:
            old = self._mem.pop(key, None)
            if old is not None:
                self._mem_size -= len(old)
            self._mem[key] = data
            self._mem_size += len(data)
            while self._mem_size > self.memory_bytes and self._mem:
                _, d = self._mem.popitem(last=False)
                self._mem_size -= len(d)

    # -- disk --------------------------------------------------------
    def _disable(self, e: OSError) -> None:
        self.write_errors += 1
        self._disk_off_until = time.monotonic() + _DISK_RETRY_AFTER
        msg = f"chunk cache {self.root} is not writable ({e.strerror or e}); serving from the network"
        if self.warning != msg:
            log.warning(msg)
        self.warning = msg

    def has(self, key: str) -> bool:
        if key in self._mem:
            return True
        try:
            return os.path.exists(self._path(key))
        except ValueError:
            return False

    def get(self, key: str) -> bytes | None:
        """The chunk's bytes, or None. Verifies digest-keyed chunks from disk."""
        data = self.get_memory(key)
        if data is not None:
            self.hits += 1
            return data
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            self.misses += 1
            return None
        if not _check(key, data):
            self.corrupt += 1
            log.warning("cached chunk %s is damaged; dropped", key)
            self._forget(key)
            try:
                os.unlink(path)
            except OSError:
                pass
            self.misses += 1
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        self.hits += 1
        with self._lock:
            self._verified[key] = len(data)
        self._remember(key, data)
        return data

    def is_verified(self, key: str, size: int | None = None) -> bool:
        """Is ``key`` on disk and known good in this process (read_range works)?"""
        got = self._verified.get(key)
        return got is not None and (size is None or got == size)

    def read_range(self, key: str, offset: int, length: int, size: int) -> bytes | None:
        """``length`` bytes at ``offset`` of a verified chunk file of ``size``
        bytes, or None (not verified in this process yet, another size, gone,
        or short). A ``pread`` on a kept-open descriptor: cheap enough for an
        event loop thread."""
        if self._verified.get(key) != size or offset + length > size:
            return None
        with self._rlock:
            with self._lock:
                garbage, self._fd_garbage = self._fd_garbage, []
                fd = self._fds.get(key)
                if fd is not None:
                    self._fds.move_to_end(key)
            for x in garbage:
                _close(x)
            if fd is None:
                try:
                    fd = os.open(self._path(key), os.O_RDONLY | os.O_CLOEXEC)
                except (OSError, ValueError):
                    self._forget(key)
                    return None
                try:
                    os.utime(fd)  # LRU order of the disk budget
                except OSError:
                    pass
                with self._lock:
                    old = self._fds.pop(key, None)
                    self._fds[key] = fd
                    close = [old] if old is not None else []
                    while len(self._fds) > _MAX_FDS:
                        close.append(self._fds.popitem(last=False)[1])
                for x in close:
                    _close(x)
            try:
                data = os.pread(fd, length, offset)
            except OSError:
                data = b""
        if len(data) != length:
            self._forget(key)
            return None
        self.hits += 1
        return data

    def _forget(self, key: str) -> None:
        """Drop what this process knows of ``key``'s disk file."""
        with self._lock:
            self._verified.pop(key, None)
            fd = self._fds.pop(key, None)
            if fd is not None:
                self._fd_garbage.append(fd)  # closed by the next read_range

    def put(self, key: str, data: bytes, *, remember: bool = True) -> bool:
        """Store a verified chunk; False when only memory could keep it."""
        if remember:
            self._remember(key, data)
        if time.monotonic() < self._disk_off_until:
            return False
        path = self._path(key)
        if os.path.exists(path):
            return True
        d = os.path.dirname(path)
        tmp = None
        try:
            if d not in self._dirs_made:
                os.makedirs(d, mode=0o700, exist_ok=True)
                self._dirs_made.add(d)
            with self._lock:
                self._tmp_seq += 1
                seq = self._tmp_seq
            tmp = os.path.join(d, f".tmp-{os.getpid()}-{threading.get_ident()}-{seq}")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            try:
                fd = os.open(tmp, flags, 0o600)
            except FileNotFoundError:  # the dir was pruned meanwhile
                os.makedirs(d, mode=0o700, exist_ok=True)
                fd = os.open(tmp, flags, 0o600)
            except FileExistsError:  # a crashed process of the same pid left it
                os.unlink(tmp)
                fd = os.open(tmp, flags, 0o600)
            try:
                if not (len(data) >= _DIRECT_MIN and self._write_direct(fd, data)):
                    view = memoryview(data)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
            finally:
                os.close(fd)
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            if tmp:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if e.errno in _DISK_FULL_ERRNOS:
                self._disable(e)
                return False
            log.warning("cannot write chunk %s: %s", key, e)
            self.write_errors += 1
            return False
        self.writes += 1
        with self._lock:
            self._verified[key] = len(data)  # we wrote these very bytes (verified by the caller)
            if self._disk_size is not None:
                self._disk_size += len(data)
            need_scan = self._disk_size is None or self._disk_size > self.max_bytes
        if need_scan:
            self._enforce_budget()
        return True

    def _write_direct(self, fd: int, data: bytes) -> bool:
        """Write ``data`` to the empty file ``fd`` bypassing the page cache
        (O_DIRECT from an aligned buffer, then cut to size). On this kind of
        VM a buffered write of a 4 MiB chunk costs ~10x the CPU (page cache
        allocation, dirty accounting, writeback) and the cached copy is
        rarely read again: the kernel's FUSE page cache keeps the file data
        readers asked for. False (nothing written) when the file system
        refuses O_DIRECT; the caller then writes normally."""
        if not self._direct_ok or not hasattr(os, "O_DIRECT"):
            return False
        size = len(data)
        padded = (size + _ALIGN - 1) // _ALIGN * _ALIGN
        buf = getattr(self._tls, "buf", None)
        if buf is None or len(buf) < padded:
            buf = mmap.mmap(-1, max(padded, 4 << 20))  # page aligned
            self._tls.buf = buf
        try:
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_DIRECT)
        except OSError:
            self._direct_ok = False
            return False
        buf[:size] = data
        if padded > size:
            buf[size:padded] = bytes(padded - size)
        view = memoryview(buf)[:padded]
        try:
            done = 0
            while done < padded:
                n = os.write(fd, view[done:])
                if n <= 0 or n % _ALIGN:
                    raise OSError(errno.EIO, "short direct write")
                done += n
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._direct_ok = False  # alignment rules of this file system: write normally
            os.ftruncate(fd, 0)
            fcntl.fcntl(fd, fcntl.F_SETFL, fl)
            os.lseek(fd, 0, os.SEEK_SET)
            return False
        finally:
            view.release()
        if padded > size:
            os.ftruncate(fd, size)
        return True

    def _scan(self) -> list[tuple[float, int, str]]:
        out = []
        try:
            subdirs = os.listdir(self.chunk_dir)
        except OSError:
            return out
        for sd in subdirs:
            p = os.path.join(self.chunk_dir, sd)
            try:
                with os.scandir(p) as it:
                    for de in it:
                        try:
                            st = de.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        if de.name.startswith(".tmp-") and time.time() - st.st_mtime > 3600:
                            try:
                                os.unlink(de.path)  # leftover of a crash
                            except OSError:
                                pass
                            continue
                        if de.name.startswith(".tmp-"):
                            continue
                        out.append((st.st_mtime, st.st_size, de.path))
            except OSError:
                continue
        return out

    def _enforce_budget(self) -> None:
        files = self._scan()
        total = sum(f[1] for f in files)
        if total > self.max_bytes:
            files.sort()
            target = int(self.max_bytes * 0.9)
            for _mtime, size, path in files:
                if total <= target:
                    break
                try:
                    os.unlink(path)
                except OSError:
                    continue
                self._forget(os.path.basename(path))
                total -= size
                self.evicted += 1
        with self._lock:
            self._disk_size = total

    # -- management --------------------------------------------------
    def usage(self) -> dict:
        files = self._scan()
        return {
            "dir": self.root,
            "chunks": len(files),
            "bytes": sum(f[1] for f in files),
            "maxBytes": self.max_bytes,
        }

    def stats(self) -> dict:
        return {
            "dir": self.root, "hits": self.hits, "memoryHits": self.memory_hits,
            "misses": self.misses, "writes": self.writes, "writeErrors": self.write_errors,
            "corrupt": self.corrupt, "evicted": self.evicted, "memoryBytes": self._mem_size,
            "warning": self.warning,
        }

    def prune(self) -> dict:
        """Delete every cached chunk; returns what was removed."""
        before = self.usage()
        if os.path.isdir(self.chunk_dir):
            for sd in os.listdir(self.chunk_dir):
                shutil.rmtree(os.path.join(self.chunk_dir, sd), ignore_errors=True)
        with self._lock:
            self._mem.clear()
            self._mem_size = 0
            self._disk_size = 0
            keys = list(self._verified)
        for k in keys:
            self._forget(k)
        with self._rlock, self._lock:
            garbage, self._fd_garbage = self._fd_garbage, []
        for x in garbage:
            _close(x)
        self._dirs_made.clear()
        return {"dir": self.root, "removedChunks": before["chunks"], "removedBytes": before["bytes"]}
