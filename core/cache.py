"""The chunk cache: decompressed, verified chunks on disk, an LRU in memory.

Keys are chunk digests where the TOC gives one (so identical chunks of
different layers, or of two mounts of one image, are stored once): such a
chunk is checked against its digest before it is stored, so any image may
find it. A chunk without a digest is checked by nothing: its bytes are
whatever the image it came from says, so it must never be found by another
image (a hostile layout that claims a genuine layer's blob digest would
otherwise fill the genuine image's keys). Its key is
``<scope>-<offset>-<inner offset>-<size>`` where the scope
(:func:`digestless_scope`) is a hash of the TOC digest that vouches for the
chunk's place (verified against the manifest annotation), the blob digest
and the source the bytes come from (a layout path, a registry repository):
a blob digest or a TOC alone is a claim anyone can copy (a TOC without
digests says nothing about the bytes). A layer whose TOC is not verified
(``--allow-unverified``), or a cache others may write, gets a
``mem-<nonce>`` scope instead: such keys stay in this process's memory LRU
and are never written to disk (:meth:`ChunkCache.put_many` skips them).

On disk, chunks live in *pack* files under ``<root>/packs``: one pack per
:meth:`ChunkCache.put_many` call (the reader stores each fetched range's
chunks together), so a background fetch creates a file per few MiB, not per
chunk. A pack starts with a header (``SGZPACK2``, a length, then a JSON list
of ``[key, offset, size, crc32]``) followed by the chunks' bytes (packs of
the first format, ``SGZPACK1``, without the crc32, are still read). Every pack is
written to a temporary name and renamed into place, so a crash never leaves
a torn pack under a real name; the key -> (pack, offset, size) index is
rebuilt from the packs' headers (the directory is listed again when its
mtime changes, so packs other processes write are found).

A chunk is checked once per cache object: the first time it is loaded from
disk (a pack holding a damaged chunk is deleted and the chunk treated as a
miss); chunks this object wrote itself count as verified. Every chunk was
verified against its digest before it was stored, so the load checks the
crc32 its pack recorded at store time: that catches a torn, truncated or
bit-rotted chunk at ~30 GB/s, where sha256 runs at ~1.5 GB/s and took a
third of a warm read's CPU. A crc32 does not catch a chunk forged on
purpose by whoever can write the cache, so it is relied on only in a
*private* cache (:attr:`ChunkCache.private`: the root and its ``packs``
owned by this user and writable by no one else, and every directory above
owned by this user or root and writable by others only when sticky, as for
the default cache dir), where only this user or root could forge a chunk,
and they could as well change the program. In any other cache (a shared ``--cache-dir``), and
for packs of the first format, a loaded chunk is checked against its
digest (sha256; size for keys without a digest). For comparison,
stargz-snapshotter checks nothing when it reads its cache. Verified chunks can then be read in
pieces with :meth:`ChunkCache.read_range` (a ``pread`` of just the range on
a kept-open pack descriptor; preads run in parallel, outside any lock), so a
warm read never loads or hashes a whole chunk again. Read-ahead loads whole
runs of chunks with :meth:`ChunkCache.read_into` (O_DIRECT into the
caller's buffer: no page-cache copy) and :meth:`ChunkCache.check_loaded`.

The disk store has a size budget with least-recently-used eviction of whole
packs (pack mtimes are touched on hits). Running out of space (ENOSPC,
EDQUOT, a read-only cache dir) never fails a read: the cache logs one
warning, stops writing for a while and the reader keeps serving from the
network. Files of the old one-file-per-chunk layout (``<root>/chunks``) are
never read; they count in :meth:`usage`, are evicted first and pruned.

All methods are blocking and thread-safe: async callers run the disk paths
in worker threads (``get_memory`` is cheap and may run anywhere).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from isal import isal_zlib

log = logging.getLogger("core.cache")

DEFAULT_MAX_BYTES = 4 << 30
DEFAULT_MEMORY_BYTES = 64 << 20  # the memory LRU's floor ...
MAX_DEFAULT_MEMORY_BYTES = 256 << 20  # ... and cap: 1/64 of the RAM in between
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_DISK_RETRY_AFTER = 30.0
_KEY_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_MAX_FDS = 512  # pack descriptors kept open (fewer when the fd limit is low)
_TOUCH_EVERY = 300.0  # a pack's mtime (its place in the eviction order) is touched at most this often
_DIRECT_MIN = 256 << 10  # packs at least this big are written with O_DIRECT
_ALIGN = 4096
_WBUF_STEP = 8 << 20  # direct-write buffers come in multiples of this
_WBUFS = 2  # ... and this many are kept for reuse
_MAGIC = b"SGZPACK2"  # rows [key, offset, size, crc32]
_MAGIC_V1 = b"SGZPACK1"  # rows [key, offset, size]: read, no longer written
_HEAD = struct.Struct("<8sI")
_PACK_SUFFIX = ".pack"
_HEADER_READ = 64 << 10
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_DIRECT_SLOT = "\0direct"  # _fds key suffix of a pack's O_DIRECT descriptor


def default_cache_dir() -> str:
    """``$STARGZ_TUI_CACHE_DIR`` or the platform's user cache dir."""
    env = os.environ.get("STARGZ_TUI_CACHE_DIR")
    if env:
        return env
    import platformdirs

    return platformdirs.user_cache_dir("stargz-tui")


def default_memory_bytes() -> int:
    """The memory LRU's default size: ``$STARGZ_TUI_MEMORY_CACHE`` (e.g.
    ``64M``), else 1/64 of the machine's RAM between 64 and 256 MiB.

    Random reads over many files (what a program loading a runtime or a
    database does once the kernel has dropped the pages) are served from
    this LRU without a disk read; ratarmount keeps about 250 MB of such data
    for the same workload. It holds only what was read on demand (never the
    background fetch), and :meth:`ChunkCache.release_memory_if_idle` gives it
    back when nothing has read for a while."""
    env = os.environ.get("STARGZ_TUI_MEMORY_CACHE")
    if env:
        try:
            return max(0, parse_size(env))
        except ValueError:
            log.warning("ignoring STARGZ_TUI_MEMORY_CACHE=%r (use e.g. 64M)", env)
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        ram = 0
    return max(DEFAULT_MEMORY_BYTES, min(MAX_DEFAULT_MEMORY_BYTES, ram // 64))


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


MEMORY_ONLY = "mem-"  # the scope prefix of keys never written to disk


def digestless_scope(index, origin: str, *, shareable: bool = True) -> str:
    """The key scope of ``index``'s chunks without a digest (module docs):
    shared on disk only when the TOC was verified against the manifest
    annotation (``index.toc_verified``) and ``shareable`` (a private cache);
    else a fresh memory-only scope, found by no other reader."""
    if shareable and getattr(index, "toc_verified", False) and index.toc_digest:
        h = hashlib.sha256("\0".join((index.toc_digest, index.blob_digest, origin)).encode())
        return "toc-" + h.hexdigest()
    return MEMORY_ONLY + os.urandom(16).hex()


def chunk_key(blob_digest: str, chunk, scope: str | None = None) -> str:
    """The cache key of a :class:`core.estargz.Chunk`; ``scope`` (from
    :func:`digestless_scope`) places a chunk without a digest. Without one
    such a chunk gets a memory-only key (that no reader of the disk finds)."""
    if chunk.digest:
        algo, _, hexd = chunk.digest.partition(":")
        return f"{algo}-{hexd}"
    if scope is None:
        scope = MEMORY_ONLY + blob_digest.partition(":")[2]
    return f"{scope}-{chunk.offset}-{chunk.inner_offset}-{chunk.chunk_size}"


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


def _copy_into(buf: mmap.mmap, parts: list) -> None:
    """Copy ``parts`` (bytes) one after the other into ``buf`` with the GIL
    released (``ctypes.memmove``): a pack is MiBs, and a copy of that under
    the GIL stalls the event loop and the decoding threads."""
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    pos = 0
    for part in parts:
        n = len(part)
        if n >= 64 << 10 and isinstance(part, bytes):
            ctypes.memmove(base + pos, part, n)
        else:
            buf[pos:pos + n] = part
        pos += n


def _pack_header(entries: list) -> bytes:
    """The header of a pack whose chunks (``(key, size, crc32)`` in order) follow it."""
    # offsets depend on the header's length: compute them with a fixed-width guess
    body = json.dumps([[k, 0, s, c] for k, s, c in entries], separators=(",", ":")).encode()
    # each offset may take up to 15 digits more than "0"
    head_len = _HEAD.size + len(body) + 15 * len(entries)
    off = head_len
    rows = []
    for k, s, c in entries:
        rows.append([k, off, s, c])
        off += s
    body = json.dumps(rows, separators=(",", ":")).encode()
    body += b" " * (head_len - _HEAD.size - len(body))
    return _HEAD.pack(_MAGIC, len(body)) + body


def _read_header(fd: int, file_size: int) -> list[tuple[str, int, int, int | None]] | None:
    """The chunks a pack holds (``(key, offset, size, crc32 or None)``), or
    None when the header is damaged."""
    head = os.pread(fd, _HEADER_READ, 0)
    if len(head) < _HEAD.size:
        return None
    magic, n = _HEAD.unpack_from(head)
    if magic not in (_MAGIC, _MAGIC_V1) or _HEAD.size + n > file_size:
        return None
    if _HEAD.size + n > len(head):
        head = os.pread(fd, _HEAD.size + n, 0)
    try:
        rows = json.loads(head[_HEAD.size:_HEAD.size + n])
        if magic == _MAGIC:
            out = [(str(k), int(o), int(s), int(c)) for k, o, s, c in rows]
        else:
            out = [(str(k), int(o), int(s), None) for k, o, s in rows]
    except (ValueError, TypeError):
        return None
    return out


def _is_private(path: str) -> bool:
    """Is ``path`` a directory owned by this user that no one else can write,
    nor swap for another (as ssh's StrictModes checks: every directory above
    it owned by this user or root, and writable by others only when sticky)?"""
    me = os.geteuid()
    try:
        st = os.lstat(path)
        if st.st_uid != me or not stat.S_ISDIR(st.st_mode) or st.st_mode & 0o022:
            return False
        parent = os.path.dirname(path)
        while parent != path:
            st = os.stat(parent)
            if st.st_uid not in (me, 0) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
                return False
            path, parent = parent, os.path.dirname(parent)
    except OSError:
        return False
    return True


class ChunkCache:
    """Disk store of chunks (pack files) with a memory LRU in front (see module docs).

    Why one class (~700 lines, ~40 methods) still: the memory LRU, the pack
    files and their index share one lock and one budget; the split into a
    chunk-store interface with memory and pack stores behind it is issue 15's
    next step, kept for a tree no other branch is changing.
    """

    def __init__(self, root: str | None = None, *, max_bytes: int | None = None,
                 memory_bytes: int | None = None, direct: bool | None = None):
        self.root = os.path.abspath(root or default_cache_dir())
        self.pack_dir = os.path.join(self.root, "packs")
        self.chunk_dir = os.path.join(self.root, "chunks")  # the old layout (pruned, evicted)
        self.max_bytes = DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        self.memory_bytes = default_memory_bytes() if memory_bytes is None else memory_bytes
        self._mem_used = 0.0  # when the memory LRU was last read or filled
        self._mem: OrderedDict[str, bytes] = OrderedDict()
        self._mem_size = 0
        self._lock = threading.Lock()
        self._ilock = threading.Lock()  # index refreshes
        self._disk_off_until = 0.0
        self._disk_size: int | None = None  # estimate; None = not scanned yet
        # the index: key -> (pack name, offset, size, the crc32 the pack
        # recorded or None); pack name -> its keys
        self._index: dict[str, tuple[str, int, int, int | None]] = {}
        self._packs: dict[str, list[str]] = {}
        self._dir_mtime: int | None = None  # pack dir mtime at the last listing
        self._verified: dict[str, int] = {}  # chunks known good here -> size
        self._fds: OrderedDict[str, int] = OrderedDict()  # open packs (read_range)
        # Descriptors taken from _fds (pack dropped, LRU) wait here until no
        # pread is running (_busy == 0): preads run outside any lock, in
        # parallel, and never on a closed (or reused) descriptor number.
        self._fd_garbage: list[int] = []
        self._busy = 0
        self._touched: dict[str, float] = {}  # pack -> when its mtime was last touched
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ImportError, OSError, ValueError):
            soft = 1024
        if soft < 0:  # RLIM_INFINITY
            soft = 1 << 20
        self._max_fds = max(16, min(_MAX_FDS, soft // 4))
        self._nowait = bool(_RWF_NOWAIT)  # preadv2(RWF_NOWAIT) works here (page cache probe)
        self._tmp_seq = 0
        self._wbufs: list[mmap.mmap] = []  # free aligned buffers for O_DIRECT writes
        # direct=None: the environment's STARGZ_TUI_CACHE_DIRECT (a mount daemon
        # is given the value its mount read at the edge, core.options.Tuning)
        self._direct_ok = (os.environ.get("STARGZ_TUI_CACHE_DIRECT", "1") != "0"
                           if direct is None else direct)
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
            os.makedirs(self.pack_dir, mode=0o700, exist_ok=True)
        except OSError as e:
            self._disable(e)
        # Chunks loaded from disk are checked by crc32 only in a private cache (module docs).
        self.private = _is_private(self.root) and _is_private(self.pack_dir)

    # -- memory LRU --------------------------------------------------
    def get_memory(self, key: str) -> bytes | None:
        # No lock: single OrderedDict operations are atomic (C, under the
        # GIL); an entry evicted between them is just not moved.
        mem = self._mem
        data = mem.get(key)
        if data is not None:
            try:
                mem.move_to_end(key)
            except KeyError:
                pass
            self.memory_hits += 1
            self._mem_used = time.monotonic()
        return data

    def release_memory_if_idle(self, idle: float) -> bool:
        """Empty the memory LRU when it was not used for ``idle`` seconds
        (returns whether it did): an idle mount holds no file data."""
        if not self._mem or time.monotonic() - self._mem_used < idle:
            return False
        with self._lock:
            self._mem.clear()
            self._mem_size = 0
        return True

    def in_memory(self, key: str) -> bool:
        """Is ``key`` in the memory LRU (no LRU touch, no counting)?"""
        return key in self._mem

    def remember(self, key: str, data: bytes) -> None:
        """Keep ``data`` (verified bytes of ``key``) in the memory LRU only."""
        self._remember(key, data)

    def _remember(self, key: str, data: bytes) -> None:
        if len(data) > self.memory_bytes // 4:
            return
        self._mem_used = time.monotonic()
        with self._lock:
            old = self._mem.pop(key, None)
            if old is not None:
                self._mem_size -= len(old)
            self._mem[key] = data
            self._mem_size += len(data)
            while self._mem_size > self.memory_bytes and self._mem:
                _, d = self._mem.popitem(last=False)
                self._mem_size -= len(d)

    # -- the index ---------------------------------------------------
    def _add_pack(self, name: str, rows) -> None:
        """Under ``_lock``: index a pack's chunks (a key already indexed keeps its pack)."""
        if name in self._packs:
            return
        keys = []
        for k, off, size, crc in rows:
            if k not in self._index:
                self._index[k] = (name, off, size, crc)
                keys.append(k)
        self._packs[name] = keys

    def _drop_pack(self, name: str) -> None:
        """Forget a pack (gone or damaged): its chunks, verification, descriptor."""
        with self._lock:
            keys = self._packs.pop(name, None) or []
            for k in keys:
                loc = self._index.get(k)
                if loc is not None and loc[0] == name:
                    del self._index[k]
                    self._verified.pop(k, None)
            for slot in (name, name + _DIRECT_SLOT):
                fd = self._fds.pop(slot, None)
                if fd is not None:
                    self._fd_garbage.append(fd)
            garbage = self._take_garbage()
        for x in garbage:
            _close(x)

    def _refresh(self, force: bool = False) -> None:
        """List the pack dir again if it changed since the last listing."""
        try:
            mt = os.stat(self.pack_dir).st_mtime_ns
        except OSError:
            mt = -1
        if not force and mt == self._dir_mtime:
            return
        with self._ilock:
            if not force and mt == self._dir_mtime:
                return
            try:
                names = {n for n in os.listdir(self.pack_dir) if n.endswith(_PACK_SUFFIX)}
            except OSError:
                names = set()
            with self._lock:
                known = set(self._packs)
            for gone in known - names:
                self._drop_pack(gone)
            for name in names - known:
                rows = self._load_header(name)
                if rows is not None:
                    with self._lock:
                        if name not in self._packs:
                            self._add_pack(name, rows)
            self._dir_mtime = mt

    def _load_header(self, name: str):
        path = os.path.join(self.pack_dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            rows = _read_header(fd, os.fstat(fd).st_size)
        except OSError:
            rows = None
        finally:
            os.close(fd)
        if rows is None:
            self.corrupt += 1
            log.warning("cache pack %s is damaged; dropped", name)
            try:
                os.unlink(path)
            except OSError:
                pass
        return rows

    def _locate(self, key: str) -> tuple[str, int, int, int | None] | None:
        loc = self._index.get(key)
        if loc is None:
            self._refresh()
            loc = self._index.get(key)
        return loc

    def location(self, key: str) -> tuple[str, int, int] | None:
        """Where ``key`` is on disk: ``(pack file path, offset, size)`` or None."""
        loc = self._locate(key)
        if loc is None:
            return None
        return os.path.join(self.pack_dir, loc[0]), loc[1], loc[2]

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
        return self._locate(key) is not None

    def cached(self, keys: Iterable[str]) -> list[bool]:
        """For each key: does the cache (memory or disk) hold it? One look
        at the pack directory for all of them."""
        self._refresh()
        index, mem = self._index, self._mem
        return [k in index or k in mem for k in keys]

    def is_empty(self) -> bool:
        """No chunk on disk nor in memory (one directory listing)."""
        if self._mem:
            return False
        self._refresh()
        return not self._index

    def _take_garbage(self) -> list[int]:
        """Under ``_lock``: the descriptors to close now (none while a pread runs)."""
        if self._busy or not self._fd_garbage:
            return []
        garbage, self._fd_garbage = self._fd_garbage, []
        return garbage

    def _acquire_fd(self, name: str, direct: bool = False) -> int | None:
        """A kept-open descriptor of pack ``name`` (touched for the LRU when
        opened; ``direct``: opened with O_DIRECT), or None when it is gone.
        Give it back with :meth:`_release_fd`."""
        slot = name + _DIRECT_SLOT if direct else name
        with self._lock:
            fd = self._fds.get(slot)
            if fd is not None:
                self._fds.move_to_end(slot)
                self._busy += 1
                return fd
        flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
        try:
            fd = os.open(os.path.join(self.pack_dir, name), flags)
        except OSError:
            return None
        if not direct:
            now = time.monotonic()
            if now - self._touched.get(name, -_TOUCH_EVERY) >= _TOUCH_EVERY:
                self._touched[name] = now
                try:
                    os.utime(fd)  # LRU order of the disk budget
                except OSError:
                    pass
        with self._lock:
            old = self._fds.get(slot)
            if old is not None:  # another thread opened it meanwhile: use that one
                self._fds.move_to_end(slot)
                self._fd_garbage.append(fd)
                fd = old
            else:
                self._fds[slot] = fd
                while len(self._fds) > self._max_fds:
                    self._fd_garbage.append(self._fds.popitem(last=False)[1])
            self._busy += 1
        return fd

    def _release_fd(self) -> None:
        with self._lock:
            self._busy -= 1
            garbage = self._take_garbage()
        for x in garbage:
            _close(x)

    def _pread(self, name: str, length: int, offset: int) -> bytes | None:
        """``os.pread`` on pack ``name``; None when it is gone or unreadable."""
        fd = self._acquire_fd(name)
        if fd is None:
            return None
        try:
            return os.pread(fd, length, offset)
        except OSError:
            return None
        finally:
            self._release_fd()

    def get(self, key: str) -> bytes | None:
        """The chunk's bytes, or None. Verifies chunks loaded from disk."""
        data = self.get_memory(key)
        if data is not None:
            self.hits += 1
            return data
        loc = self._locate(key)
        if loc is None:
            self.misses += 1
            return None
        name, off, size, crc = loc
        data = self._pread(name, size, off)
        if data is None:
            self._drop_pack(name)
            self.misses += 1
            return None
        if len(data) != size or not self._intact(key, data, crc):
            self._damaged(key, name)
            self.misses += 1
            return None
        self.hits += 1
        with self._lock:
            self._verified[key] = size
        self._remember(key, data)
        return data

    def is_verified(self, key: str, size: int | None = None) -> bool:
        """Is ``key`` on disk and known good in this process (read_range works)?"""
        got = self._verified.get(key)
        return got is not None and (size is None or got == size)

    def read_range(self, key: str, offset: int, length: int, size: int):
        """``length`` bytes (bytes-like) at ``offset`` of a verified chunk of
        ``size`` bytes, or None (not verified in this process yet, another
        size, gone, or short). A ``pread`` on a kept-open descriptor (no lock
        held while it runs), cheap enough for an event loop thread: when the
        range is not in the page cache (``RWF_NOWAIT`` says so) the piece is
        read at once and the kernel asked to read the rest of the chunk in
        the background (``POSIX_FADV_WILLNEED``), so the next reads of that
        chunk (random reads of one file) do not wait for the disk."""
        if self._verified.get(key) != size or offset + length > size:
            return None
        loc = self._index.get(key)
        if loc is None:
            return None
        name, off = loc[0], loc[1]
        fd = self._acquire_fd(name)
        got = -1
        if fd is not None:
            buf = bytearray(length)
            try:
                got = 0
                if self._nowait:
                    try:
                        got = os.preadv(fd, [buf], off + offset, _RWF_NOWAIT)
                    except BlockingIOError:
                        pass
                    except OSError as e:
                        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                            raise
                        self._nowait = False
                if got < length:  # not (all) in the page cache
                    got += os.preadv(fd, [memoryview(buf)[got:]], off + offset + got)
                    if size > length:
                        os.posix_fadvise(fd, off, size, os.POSIX_FADV_WILLNEED)
            except OSError:
                got = -1
            finally:
                self._release_fd()
        if got != length:
            self._drop_pack(name)
            return None
        self.hits += 1
        return buf

    def where(self, key: str) -> tuple[str, int, int] | None:
        """``(pack name, offset, size)`` of a chunk known to be on disk (no
        directory listing: None when this object has not indexed it)."""
        loc = self._index.get(key)
        return None if loc is None else loc[:3]

    def read_into(self, name: str, offset: int, length: int, buf) -> memoryview | None:
        """Read ``length`` bytes at ``offset`` of pack ``name`` into ``buf``
        (a page-aligned writable buffer of at least ``length + 2 * 4096``
        bytes, e.g. an anonymous mmap) and return the view of them in it, or
        None (gone, short). Uses O_DIRECT where the file system allows it:
        the disk writes straight into ``buf``, with no page-cache copy (most
        of the CPU of a buffered read on this kind of VM). The bytes are not
        verified: see :meth:`check_loaded`."""
        if self._direct_ok and hasattr(os, "O_DIRECT"):
            start = offset - offset % _ALIGN
            end = -(-(offset + length) // _ALIGN) * _ALIGN
            if end - start <= len(buf):
                fd = self._acquire_fd(name, direct=True)
                if fd is None:
                    return None
                try:
                    got = os.preadv(fd, [memoryview(buf)[: end - start]], start)
                except OSError as e:
                    got = None
                    if e.errno == errno.EINVAL:  # this file system's O_DIRECT rules
                        self._direct_ok = False
                finally:
                    self._release_fd()
                if got is not None:
                    if got < offset + length - start:
                        return None
                    return memoryview(buf)[offset - start : offset - start + length]
        if length > len(buf):
            return None
        fd = self._acquire_fd(name)
        if fd is None:
            return None
        try:
            got = os.preadv(fd, [memoryview(buf)[:length]], offset)
        except OSError:
            return None
        finally:
            self._release_fd()
        return memoryview(buf)[:length] if got == length else None

    def _intact(self, key: str, data, crc: int | None) -> bool:
        """Is ``data``, loaded from disk, what was stored as ``key``? By
        ``crc``, the crc32 its pack recorded, in a private cache; else by
        the key's digest."""
        if crc is not None and self.private:
            return isal_zlib.crc32(data) == crc
        return _check(key, data)

    def _damaged(self, key: str, name: str | None) -> None:
        """``key``, loaded from pack ``name``, failed its check: the pack is
        dropped and deleted (``name`` None: no longer indexed, only counted)."""
        self.corrupt += 1
        log.warning("cached chunk %s is damaged; dropped its pack", key)
        if name is None:
            return
        self._drop_pack(name)
        try:
            os.unlink(os.path.join(self.pack_dir, name))
        except OSError:
            pass

    def check_loaded(self, key: str, data) -> bool:
        """Is ``data`` (read with :meth:`read_into`) the chunk ``key``? Known
        good once per process (as :meth:`get`); a damaged chunk's pack is
        dropped and deleted."""
        size = len(data)
        if self._verified.get(key) == size:
            return True
        loc = self._index.get(key)
        if self._intact(key, data, None if loc is None else loc[3]):
            with self._lock:
                self._verified[key] = size
            return True
        self._damaged(key, None if loc is None else loc[0])
        return False

    def put(self, key: str, data: bytes, *, remember: bool = True) -> bool:
        """Store a verified chunk; False when only memory could keep it."""
        if remember:
            self._remember(key, data)
        return self.put_many([(key, data)])

    def put_many(self, items: list[tuple[str, bytes]]) -> bool:
        """Store verified chunks together in one pack (chunks already on disk
        are skipped); False when the disk could not keep them."""
        if time.monotonic() < self._disk_off_until:
            return False
        seen = set()
        todo = []
        for key, data in items:
            if key in seen or key in self._index or key.startswith(MEMORY_ONLY):
                continue
            if not _KEY_RE.match(key):
                raise ValueError(f"bad cache key {key!r}")
            seen.add(key)
            todo.append((key, data))
        if not todo:
            return True
        crcs = [isal_zlib.crc32(d) for _k, d in todo]
        header = _pack_header([(k, len(d), c) for (k, d), c in zip(todo, crcs, strict=True)])
        total = len(header) + sum(len(d) for _k, d in todo)
        with self._lock:
            self._tmp_seq += 1
            seq = self._tmp_seq
        name = f"{time.time_ns():x}-{os.getpid()}-{seq}{_PACK_SUFFIX}"
        tmp = os.path.join(self.pack_dir, f".tmp-{os.getpid()}-{threading.get_ident()}-{seq}")
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            try:
                fd = os.open(tmp, flags, 0o600)
            except FileNotFoundError:  # the dir was pruned meanwhile
                os.makedirs(self.pack_dir, mode=0o700, exist_ok=True)
                fd = os.open(tmp, flags, 0o600)
            try:
                parts = [header, *(d for _k, d in todo)]
                if not (total >= _DIRECT_MIN and self._write_direct(fd, parts, total)):
                    self._write_all(fd, parts)
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(self.pack_dir, name))
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
            log.warning("cannot write %d cached chunk(s): %s", len(todo), e)
            self.write_errors += 1
            return False
        self.writes += len(todo)
        rows = []
        off = len(header)
        for (k, d), c in zip(todo, crcs, strict=True):
            rows.append((k, off, len(d), c))
            off += len(d)
        with self._lock:
            self._add_pack(name, rows)
            for k, _o, s, _c in rows:  # we wrote these very bytes (verified by the caller)
                self._verified[k] = s
            if self._disk_size is not None:
                self._disk_size += total
            need_scan = self._disk_size is None or self._disk_size > self.max_bytes
        if need_scan:
            self._enforce_budget()
        return True

    @staticmethod
    def _write_all(fd: int, parts: list) -> None:
        for part in parts:
            view = memoryview(part)
            while view:
                n = os.write(fd, view)
                view = view[n:]

    def _write_direct(self, fd: int, parts: list, size: int) -> bool:
        """Write ``parts`` (``size`` bytes) to the empty file ``fd`` bypassing
        the page cache (O_DIRECT from an aligned buffer, then cut to size).
        On this kind of VM buffered writes cost many times the CPU (page
        cache allocation, dirty accounting, writeback) and the cached copy is
        rarely read again: the kernel's FUSE page cache keeps the file data
        readers asked for. False (nothing written) when the file system
        refuses O_DIRECT; the caller then writes normally."""
        if not self._direct_ok or not hasattr(os, "O_DIRECT"):
            return False
        padded = (size + _ALIGN - 1) // _ALIGN * _ALIGN
        try:
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_DIRECT)
        except OSError:
            self._direct_ok = False
            return False
        buf = self._take_wbuf(padded)
        try:
            return self._write_direct_from(fd, fl, buf, parts, size, padded)
        finally:
            self._give_wbuf(buf)

    def _take_wbuf(self, size: int) -> mmap.mmap:
        """A page-aligned buffer of at least ``size`` bytes for a direct
        write: a reused one when there is one (the first touch of a fresh
        page costs a fault and a zeroing, about as much as the copy itself)."""
        with self._lock:
            for i, b in enumerate(self._wbufs):
                if len(b) >= size:
                    return self._wbufs.pop(i)
        return mmap.mmap(-1, -(-size // _WBUF_STEP) * _WBUF_STEP, flags=mmap.MAP_PRIVATE)

    def _give_wbuf(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._wbufs) < _WBUFS:
                self._wbufs.append(buf)
                return
            smallest = min(range(len(self._wbufs)), key=lambda i: len(self._wbufs[i]))
            if len(self._wbufs[smallest]) < len(buf):
                buf, self._wbufs[smallest] = self._wbufs[smallest], buf
        buf.close()

    def _write_direct_from(self, fd: int, fl: int, buf: mmap.mmap, parts: list, size: int,
                           padded: int) -> bool:
        _copy_into(buf, parts)
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
        """(mtime, size, path) of every cache file: packs, and files of the
        old layout (listed as oldest: evicted first)."""
        out = []
        dirs = [(self.pack_dir, False)]
        try:
            dirs += [(os.path.join(self.chunk_dir, sd), True) for sd in os.listdir(self.chunk_dir)]
        except OSError:
            pass
        for d, legacy in dirs:
            try:
                with os.scandir(d) as it:
                    for de in it:
                        try:
                            st = de.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        if de.name.startswith(".tmp-"):
                            if time.time() - st.st_mtime > 3600:
                                try:
                                    os.unlink(de.path)  # leftover of a crash
                                except OSError:
                                    pass
                            continue
                        if not de.is_file(follow_symlinks=False):
                            continue
                        out.append((0.0 if legacy else st.st_mtime, st.st_size, de.path))
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
                name = os.path.basename(path)
                if os.path.dirname(path) == self.pack_dir:
                    self._drop_pack(name)
                total -= size
                self.evicted += 1
        with self._lock:
            self._disk_size = total

    # -- management --------------------------------------------------
    def usage(self) -> dict:
        files = self._scan()
        self._refresh()
        with self._lock:
            chunks = sum(len(v) for v in self._packs.values())
        legacy = sum(1 for f in files if os.path.dirname(f[2]) != self.pack_dir)
        return {
            "dir": self.root,
            "chunks": chunks + legacy,
            "files": len(files),
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
        for f in os.listdir(self.pack_dir) if os.path.isdir(self.pack_dir) else []:
            try:
                os.unlink(os.path.join(self.pack_dir, f))
            except OSError:
                pass
        shutil.rmtree(self.chunk_dir, ignore_errors=True)
        with self._lock:
            self._mem.clear()
            self._mem_size = 0
            self._disk_size = 0
            names = list(self._packs)
        for n in names:
            self._drop_pack(n)
        self._dir_mtime = None
        return {"dir": self.root, "removedChunks": before["chunks"], "removedBytes": before["bytes"]}
