"""The disk chunk store: verified chunks in pack files under ``<root>/packs``.

One pack per :meth:`PackStore.put_many` call (the reader stores each fetched
range's chunks together), so a background fetch creates a file per few MiB,
not per chunk; the pack format and writer are :mod:`core.chunkstore_packio`.
The key -> (pack, offset, size, crc32) index is rebuilt from the packs'
headers (the directory is listed again when its mtime changes, so packs
other processes write are found). Keys with the memory-only scope
(:data:`core.chunkstore.MEMORY_ONLY`) are never written.

The cache root holds a format marker (:data:`FORMAT_FILE`). A root without
it (or with another one) that holds packs or the old one-file-per-chunk
``chunks/`` layout was written by an older build: its packs and ``chunks/``
are deleted, once, under a lock, with one log line, and the marker written;
nothing of it is ever read. A root that cannot be marked (read-only, full)
is neither read nor written until it can be.

A chunk is checked once per store object: the first time it is loaded from
disk (a pack holding a damaged chunk is deleted and the chunk treated as a
miss); chunks this object wrote itself count as verified. Every chunk was
verified against its digest before it was stored, so a load checks the
crc32 its pack recorded at store time: that catches a torn, truncated or
bit-rotted chunk at a small fraction of sha256's cost. A crc32 does not
catch a chunk forged on purpose by whoever can write the cache, so it is
relied on only in a *private* cache (:attr:`PackStore.private`: the root and
its ``packs`` owned by this user and writable by no one else, and every
directory above owned by this user or root and writable by others only when
sticky, as for the default cache dir), where only this user or root could
forge a chunk, and they could as well change the program. In any other cache
(a shared ``--cache-dir``) a loaded chunk is checked against its digest
(sha256; size for scoped keys). Verified chunks can then be read in pieces
(:meth:`PackStore.read_range`: a ``pread`` of just the range, outside any
lock), and runs of chunks loaded into a caller's buffer
(:meth:`PackStore.plan_loads` / :meth:`PackStore.load`, O_DIRECT).

The store has a size budget with least-recently-used eviction of whole
packs (pack mtimes are touched on hits). Running out of space (ENOSPC,
EDQUOT, a read-only cache dir) never fails a caller: the store logs one
warning, stops writing for a while and ``put_many`` returns False.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Iterable

from isal import isal_zlib

from .chunkstore import MEMORY_ONLY, matches_key
from .chunkstore_packio import PACK_SUFFIX, PackFiles, PackWriter, pack_header, read_header

log = logging.getLogger("core.cache")

FORMAT_FILE = "FORMAT"
FORMAT = "stargz-tui chunk cache 2 (packs of SGZPACK2)\n"
_LOCK_FILE = ".lock"
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
_DISK_RETRY_AFTER = 30.0
_KEY_RE = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


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


def _read_marker(root: str) -> str | None:
    try:
        with open(os.path.join(root, FORMAT_FILE), encoding="utf-8", errors="replace") as f:
            return f.read(200)
    except OSError:
        return None


def ensure_format(root: str, pack_dir: str) -> bool:
    """Make ``root`` a cache of this build's format (module docs): a root
    an older build wrote is emptied of its chunks. Returns whether it was.
    Raises OSError when the root cannot be checked or marked."""
    if _read_marker(root) == FORMAT:
        return False
    fd = os.open(os.path.join(root, _LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two processes opening an old cache rebuild it once
        if _read_marker(root) == FORMAT:
            return False
        old_chunks = os.path.join(root, "chunks")
        try:
            stale = [n for n in os.listdir(pack_dir) if not n.startswith(".tmp-")]
        except FileNotFoundError:
            stale = []
        rebuilt = bool(stale) or os.path.lexists(old_chunks)
        if rebuilt:
            log.warning("chunk cache %s was written by an older stargz-tui; "
                        "rebuilding it (its %d pack(s) deleted)", root, len(stale))
            for n in stale:
                try:
                    os.unlink(os.path.join(pack_dir, n))
                except OSError:
                    pass
            shutil.rmtree(old_chunks, ignore_errors=True)
        tmp = os.path.join(root, f".{FORMAT_FILE}.{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(FORMAT)
        os.replace(tmp, os.path.join(root, FORMAT_FILE))
        return rebuilt
    finally:
        os.close(fd)  # releases the lock


class PackStore:
    """Chunks in pack files (module docs); a :class:`core.chunkstore.ChunkStore`.

    Not split: ~27 methods in one class, because the index, the verified set and the budget
    share one lock and one pack-drop path (a pack dropped for damage,
    eviction or a prune leaves all three at once); the file-level parts
    (format, writer, descriptors) are in :mod:`core.chunkstore_packio`.
    """

    def __init__(self, root: str, *, max_bytes: int, direct: bool = True):
        self.root = root
        self.pack_dir = os.path.join(root, "packs")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._ilock = threading.Lock()  # index refreshes
        self._disk_off_until = 0.0
        self._disk_size: int | None = None  # estimate; None = not scanned yet
        # the index: key -> (pack name, offset, size, crc32); pack name -> its keys
        self._index: dict[str, tuple[str, int, int, int]] = {}
        self._packs: dict[str, list[str]] = {}
        self._dir_mtime: int | None = None  # pack dir mtime at the last listing
        self._verified: dict[str, int] = {}  # chunks known good here -> size
        self._files = PackFiles(self.pack_dir, direct=direct)
        self._writer = PackWriter(self.pack_dir, direct=direct)
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.write_errors = 0
        self.corrupt = 0
        self.evicted = 0
        self.warning: str | None = None
        # False: the root could not be checked or marked as this build's
        # format (read-only, say): none of its packs is indexed, never misread.
        self._format_ok = False
        self._mark()
        # Chunks loaded from disk are checked by crc32 only in a private cache (module docs).
        self.private = _is_private(root) and _is_private(self.pack_dir)

    def _mark(self) -> bool:
        """Make the root this build's cache (:func:`ensure_format`); False
        (writes off for a while) when it cannot be."""
        try:
            # makedirs applies mode only to the leaf: create the root 0700 too
            # (chunks are image content the user may not want others to read).
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.makedirs(self.pack_dir, mode=0o700, exist_ok=True)
            ensure_format(self.root, self.pack_dir)
        except OSError as e:
            self._disable(e)
            return False
        self._format_ok = True
        self._dir_mtime = None  # list the packs (again)
        return True

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
        """Forget a pack (gone or damaged): its chunks, verification, descriptors."""
        with self._lock:
            keys = self._packs.pop(name, None) or []
            for k in keys:
                loc = self._index.get(k)
                if loc is not None and loc[0] == name:
                    del self._index[k]
                    self._verified.pop(k, None)
        self._files.forget(name)

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
                names = {n for n in os.listdir(self.pack_dir)
                         if n.endswith(PACK_SUFFIX)} if self._format_ok else set()
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
            rows = read_header(fd, os.fstat(fd).st_size)
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

    def _locate(self, key: str) -> tuple[str, int, int, int] | None:
        loc = self._index.get(key)
        if loc is None:
            self._refresh()
            loc = self._index.get(key)
        return loc

    def location(self, key: str) -> tuple[str, int, int] | None:
        """Where ``key`` is on disk: ``(pack file path, offset, size)`` or
        None (for diagnostics and tests: readers never need it)."""
        loc = self._locate(key)
        if loc is None:
            return None
        return os.path.join(self.pack_dir, loc[0]), loc[1], loc[2]

    # -- reading -----------------------------------------------------
    def has(self, key: str) -> bool:
        return self._locate(key) is not None

    def cached(self, keys: Iterable[str]) -> list[bool]:
        """For each key: is it on disk? One look at the pack directory."""
        self._refresh()
        index = self._index
        return [k in index for k in keys]

    def is_empty(self) -> bool:
        self._refresh()
        return not self._index

    def _intact(self, key: str, data, crc: int | None) -> bool:
        """Is ``data``, loaded from disk, what was stored as ``key``? By
        ``crc``, the crc32 its pack recorded, in a private cache; else (or
        when the pack is no longer indexed) by the key's digest."""
        if crc is not None and self.private:
            return isal_zlib.crc32(data) == crc
        return matches_key(key, data)

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

    def get(self, key: str) -> bytes | None:
        """The chunk's bytes, or None. Checks chunks loaded from disk."""
        loc = self._locate(key)
        if loc is None:
            self.misses += 1
            return None
        name, off, size, crc = loc
        data = self._files.pread(name, size, off)
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
        return data

    def is_verified(self, key: str, size: int | None = None) -> bool:
        """Is ``key`` on disk and known good in this process (read_range works)?"""
        got = self._verified.get(key)
        return got is not None and (size is None or got == size)

    def read_range(self, key: str, offset: int, length: int, size: int):
        """``length`` bytes (bytes-like) at ``offset`` of a verified chunk of
        ``size`` bytes, or None (not verified in this process yet, another
        size, gone, or short). Cheap enough for an event loop thread: one
        ``pread``; when the range is not in the page cache the kernel is
        asked to read the rest of the chunk in the background."""
        if self._verified.get(key) != size or offset + length > size:
            return None
        loc = self._index.get(key)
        if loc is None:
            return None
        name, off = loc[0], loc[1]
        buf = self._files.pread_piece(name, off + offset, length, (off, size))
        if buf is None:
            self._drop_pack(name)
            return None
        self.hits += 1
        return buf

    def plan_loads(self, items: list[tuple[str, int]], limit: int) -> list[tuple[object, list[int]]]:
        """Group ``items`` (``(key, size)``, in the order they will be read)
        into loads of at most ``limit`` bytes, each one read of the disk:
        ``(load, positions in items)``. Items not indexed here (or of
        another size) are left out. Give a load to :meth:`load`."""
        out: list[tuple[object, list[int]]] = []
        run = None  # [pack, offset, length, [(key, rel, size)]]
        index = self._index
        for pos, (key, size) in enumerate(items):
            loc = index.get(key)
            if loc is None or loc[2] != size:
                continue
            name, off = loc[0], loc[1]
            if run is not None and run[0] == name and run[1] + run[2] == off \
                    and run[2] + size <= limit:
                run[3].append((key, run[2], size))
                run[2] += size
                out[-1][1].append(pos)
            else:
                run = [name, off, size, [(key, 0, size)]]
                out.append((run, [pos]))
        return out

    def load(self, load, buf) -> list:
        """Blocking: read a load of :meth:`plan_loads` into ``buf`` (a
        page-aligned buffer of at least its length + 8 KiB) and return, per
        chunk, a view of it in ``buf`` (checked once per process) or None."""
        name, off, length, items = load
        view = self._files.read_into(name, off, length, buf)
        if view is None:
            return [None] * len(items)
        out = []
        for key, rel, size in items:
            v = view[rel : rel + size]
            out.append(v if self._check_loaded(key, v) else None)
        return out

    def _check_loaded(self, key: str, data) -> bool:
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

    # -- writing -----------------------------------------------------
    def _disable(self, e: OSError) -> None:
        self.write_errors += 1
        self._disk_off_until = time.monotonic() + _DISK_RETRY_AFTER
        msg = f"chunk cache {self.root} is not writable ({e.strerror or e}); serving from the network"
        if self.warning != msg:
            log.warning(msg)
        self.warning = msg

    def put(self, key: str, data: bytes) -> bool:
        return self.put_many([(key, data)])

    def put_many(self, items: list[tuple[str, bytes]]) -> bool:
        """Store verified chunks together in one pack (chunks already on disk
        and memory-only keys are skipped); False when the disk could not keep them."""
        if time.monotonic() < self._disk_off_until or not (self._format_ok or self._mark()):
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
        header = pack_header([(k, len(d), c) for (k, d), c in zip(todo, crcs, strict=True)])
        total = len(header) + sum(len(d) for _k, d in todo)
        try:
            name = self._writer.write([header, *(d for _k, d in todo)], total)
        except OSError as e:
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

    # -- budget and management ------------------------------------------
    def _scan(self) -> list[tuple[float, int, str]]:
        """(mtime, size, name) of every pack; temp files of crashed writers
        older than an hour are deleted."""
        out = []
        try:
            with os.scandir(self.pack_dir) as it:
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
                    if de.is_file(follow_symlinks=False):
                        out.append((st.st_mtime, st.st_size, de.name))
        except OSError:
            pass
        return out

    def _enforce_budget(self) -> None:
        files = self._scan()
        total = sum(f[1] for f in files)
        if total > self.max_bytes:
            files.sort()
            target = int(self.max_bytes * 0.9)
            for _mtime, size, name in files:
                if total <= target:
                    break
                try:
                    os.unlink(os.path.join(self.pack_dir, name))
                except OSError:
                    continue
                self._drop_pack(name)
                total -= size
                self.evicted += 1
        with self._lock:
            self._disk_size = total

    def usage(self) -> dict:
        files = self._scan()
        self._refresh()
        with self._lock:
            chunks = sum(len(v) for v in self._packs.values())
        return {"dir": self.root, "chunks": chunks, "files": len(files),
                "bytes": sum(f[1] for f in files), "maxBytes": self.max_bytes}

    def stats(self) -> dict:
        return {"dir": self.root, "hits": self.hits, "misses": self.misses,
                "writes": self.writes, "writeErrors": self.write_errors,
                "corrupt": self.corrupt, "evicted": self.evicted, "warning": self.warning}

    def prune(self) -> dict:
        """Delete every chunk on disk; returns what was removed."""
        before = self.usage()
        for f in os.listdir(self.pack_dir) if os.path.isdir(self.pack_dir) else []:
            try:
                os.unlink(os.path.join(self.pack_dir, f))
            except OSError:
                pass
        with self._lock:
            self._disk_size = 0
            names = list(self._packs)
        for n in names:
            self._drop_pack(n)
        self._dir_mtime = None
        return {"dir": self.root, "removedChunks": before["chunks"], "removedBytes": before["bytes"]}

    def close(self) -> None:
        self._files.close()
