"""The chunk cache: a memory store in front of a disk store, one interface.

:class:`ChunkCache` is what readers, views and the app use: a
:class:`core.chunkstore.ChunkStore` (get / put / has / which-are-cached,
stats, close) over a :class:`core.chunkstore.MemoryStore` (an LRU of what
was read on demand) and a :class:`core.chunkstore_pack.PackStore` (verified
chunks in pack files, with a size budget), plus what a reader needs to serve
a chunk without copying or re-checking it: :meth:`ChunkCache.read_range`
(a piece of a chunk verified in this process) and
:meth:`ChunkCache.plan_loads` / :meth:`ChunkCache.load` (runs of chunks
loaded into the caller's buffer). Callers see chunks by key, never packs;
keys are :func:`chunk_key` (the rules of shared and memory-only keys are in
:mod:`core.chunkstore`).

Only memory-only keys and chunks the disk could not keep stay in memory
alone; every other :meth:`ChunkCache.put` goes to disk. The disk store never
fails a caller for lack of space (it logs one warning and stops writing for
a while). All methods are blocking and thread-safe: async callers run the
disk paths in worker threads (:meth:`ChunkCache.get_memory`,
:meth:`ChunkCache.in_memory` and :meth:`ChunkCache.read_range` are cheap
and may run anywhere).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from .chunkstore import MEMORY_ONLY, MemoryStore, chunk_key, digestless_scope
from .chunkstore_pack import PackStore
from .units import parse_size

__all__ = ["MEMORY_ONLY", "ChunkCache", "chunk_key", "default_cache_dir",
           "default_memory_bytes", "digestless_scope", "parse_size"]

log = logging.getLogger("core.cache")

DEFAULT_MAX_BYTES = 4 << 30
DEFAULT_MEMORY_BYTES = 64 << 20  # the memory LRU's floor ...
MAX_DEFAULT_MEMORY_BYTES = 256 << 20  # ... and cap: 1/64 of the RAM in between


def default_cache_dir() -> str:
    """The shared cache dir: :func:`core.paths.cache_dir` (``$STARGZ_TUI_CACHE_DIR``
    or the platform's user cache dir; where things live is read there)."""
    from .paths import cache_dir

    return cache_dir()


def default_memory_bytes() -> int:
    """The memory LRU's default size: 1/64 of the machine's RAM between 64
    and 256 MiB (``core.options.Tuning.memory_cache``, read from
    ``$STARGZ_TUI_MEMORY_CACHE`` once at the edge, overrides it; this module
    reads no environment).

    Random reads over many files (what a program loading a runtime or a
    database does once the kernel has dropped the pages) are served from
    this LRU without a disk read. It holds only what was read on demand
    (never the background fetch), and
    :meth:`ChunkCache.release_memory_if_idle` gives it back when nothing has
    read for a while."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        ram = 0
    return max(DEFAULT_MEMORY_BYTES, min(MAX_DEFAULT_MEMORY_BYTES, ram // 64))




class ChunkCache:
    """Memory store + pack store behind one :class:`core.chunkstore.ChunkStore`
    interface (module docs). ``root`` None: :func:`default_cache_dir`;
    ``memory_bytes`` None: :func:`default_memory_bytes`; ``direct``: whether
    the pack store may use O_DIRECT (a file system that refuses it is
    detected anyway). Both come from ``core.options.Tuning`` at the edge."""

    def __init__(self, root: str | None = None, *, max_bytes: int | None = None,
                 memory_bytes: int | None = None, direct: bool = True):
        self.root = os.path.abspath(root or default_cache_dir())
        self.memory_bytes = default_memory_bytes() if memory_bytes is None else memory_bytes
        self.memory = MemoryStore(self.memory_bytes)
        self.disk = PackStore(self.root, max_bytes=DEFAULT_MAX_BYTES if max_bytes is None
                              else max_bytes, direct=direct)
        self.max_bytes = self.disk.max_bytes
        self.pack_dir = self.disk.pack_dir
        # Chunks loaded from disk are checked by crc32 only in a private cache
        # (core.chunkstore_pack docs); digest-less keys are shared only then.
        self.private = self.disk.private
        # The hot paths, bound once: no extra call layer per chunk.
        self.get_memory = self.memory.get
        self.in_memory = self.memory.has
        self.remember = self.memory.put
        self.read_range = self.disk.read_range
        self.is_verified = self.disk.is_verified
        self.plan_loads = self.disk.plan_loads
        self.load = self.disk.load
        self.location = self.disk.location
        self.put_many = self.disk.put_many

    # counters the tests and `mounts` read
    @property
    def corrupt(self) -> int:
        return self.disk.corrupt

    @property
    def evicted(self) -> int:
        return self.disk.evicted

    @property
    def warning(self) -> str | None:
        return self.disk.warning

    def get(self, key: str) -> bytes | None:
        """The chunk's bytes from memory, else from disk (checked, then kept
        in memory), or None."""
        data = self.memory.get(key)
        if data is not None:
            return data
        data = self.disk.get(key)
        if data is not None:
            self.memory.put(key, data)
        return data

    def put(self, key: str, data: bytes, *, remember: bool = True) -> bool:
        """Store a verified chunk (in memory too when ``remember``); False
        when only memory could keep it."""
        if remember:
            self.memory.put(key, data)
        return self.disk.put_many([(key, data)])

    def has(self, key: str) -> bool:
        return self.memory.has(key) or self.disk.has(key)

    def cached(self, keys: Iterable[str]) -> list[bool]:
        """For each key: does memory or disk hold it? One look at the disk for all."""
        keys = list(keys)
        mem = self.memory.cached(keys)
        return [m or d for m, d in zip(mem, self.disk.cached(keys), strict=True)]

    def is_empty(self) -> bool:
        """No chunk on disk nor in memory (one directory listing)."""
        return not len(self.memory) and self.disk.is_empty()

    def release_memory_if_idle(self, idle: float) -> bool:
        """Empty the memory store when it was not used for ``idle`` seconds
        (returns whether it did): an idle mount holds no file data."""
        return self.memory.release_if_idle(idle)

    def usage(self) -> dict:
        return self.disk.usage()

    def stats(self) -> dict:
        d, m = self.disk.stats(), self.memory.stats()
        return {"dir": self.root, "hits": d["hits"] + m["memoryHits"],
                "memoryHits": m["memoryHits"], "misses": d["misses"], "writes": d["writes"],
                "writeErrors": d["writeErrors"], "corrupt": d["corrupt"],
                "evicted": d["evicted"], "memoryBytes": m["memoryBytes"],
                "warning": d["warning"]}

    def prune(self) -> dict:
        """Delete every cached chunk; returns what was removed."""
        self.memory.close()
        return self.disk.prune()

    def close(self) -> None:
        self.memory.close()
        self.disk.close()
