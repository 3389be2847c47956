"""The chunk store interface, chunk keys, and the memory store.

A *chunk store* keeps decompressed, verified chunks by key
(:class:`ChunkStore`: get / put / has / which-are-cached, stats, close).
Two implementations sit behind :class:`core.cache.ChunkCache`:
:class:`MemoryStore` (an LRU of bytes, this module) and
:class:`core.chunkstore_pack.PackStore` (pack files on disk). Callers see
chunks by key, never where a store keeps them.

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
``mem-<nonce>`` scope (:data:`MEMORY_ONLY`) instead: such keys stay in
memory and are never written to disk.

Every method of both stores is thread-safe; :meth:`MemoryStore.get` takes
no lock (single ``OrderedDict`` operations are atomic under the GIL).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Protocol

MEMORY_ONLY = "mem-"  # the scope prefix of keys never written to disk


class ChunkStore(Protocol):
    """Verified chunks by key (module docs). ``put`` stores bytes the
    caller verified; ``get`` returns only bytes that are what was put."""

    def get(self, key: str) -> bytes | None: ...

    def put(self, key: str, data: bytes) -> bool: ...

    def has(self, key: str) -> bool: ...

    def cached(self, keys: Iterable[str]) -> list[bool]: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...


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


def matches_key(key: str, data) -> bool:
    """Does ``data`` match what ``key`` promises (its sha256 for digest
    keys, its size for scoped keys)?"""
    parts = key.split("-")
    if len(parts) == 2 and parts[0] == "sha256":
        return hashlib.sha256(data).hexdigest() == parts[1]
    if len(parts) == 5:
        try:
            return len(data) == int(parts[4])
        except ValueError:
            return False
    return True


class MemoryStore:
    """An LRU of chunk bytes bounded by ``max_bytes`` (a chunk bigger than
    a quarter of it is not kept). ``last_used`` is when it was last read or
    filled (:meth:`release_if_idle`)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.last_used = 0.0
        self.hits = 0
        self._mem: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        # No lock: single OrderedDict operations are atomic (C, under the
        # GIL); an entry evicted between them is just not moved.
        mem = self._mem
        data = mem.get(key)
        if data is not None:
            try:
                mem.move_to_end(key)
            except KeyError:
                pass
            self.hits += 1
            self.last_used = time.monotonic()
        return data

    def put(self, key: str, data: bytes) -> bool:
        if len(data) > self.max_bytes // 4:
            return False
        self.last_used = time.monotonic()
        with self._lock:
            old = self._mem.pop(key, None)
            if old is not None:
                self._size -= len(old)
            self._mem[key] = data
            self._size += len(data)
            while self._size > self.max_bytes and self._mem:
                _, d = self._mem.popitem(last=False)
                self._size -= len(d)
        return True

    def has(self, key: str) -> bool:
        """No LRU touch, no counting."""
        return key in self._mem

    def cached(self, keys: Iterable[str]) -> list[bool]:
        mem = self._mem
        return [k in mem for k in keys]

    def __len__(self) -> int:
        return len(self._mem)

    @property
    def size(self) -> int:
        return self._size

    def release_if_idle(self, idle: float) -> bool:
        """Empty the LRU when it was not used for ``idle`` seconds (returns
        whether it did)."""
        if not self._mem or time.monotonic() - self.last_used < idle:
            return False
        self.close()
        return True

    def stats(self) -> dict:
        return {"memoryHits": self.hits, "memoryBytes": self._size}

    def close(self) -> None:
        """Drop every chunk."""
        with self._lock:
            self._mem.clear()
            self._size = 0
