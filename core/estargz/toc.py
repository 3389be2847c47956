"""The TOC model: a compact, read-only index of a layer's entries and chunks.

The JSON TOC (``stargz.index.json``) is parsed once into column arrays, so a
100k-entry layer costs a couple of hundred bytes per entry instead of a dict
per entry. :class:`Entry` is a light view over one row.

Names are normalised (no leading ``./`` or ``/``, no trailing ``/``);
directories the TOC leaves implicit are synthesised; landmark files are kept
out of the tree (they are markers, not content) but remembered.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import re
import sys
from array import array
from collections import deque
from collections.abc import Iterator
from datetime import datetime
from itertools import chain, compress, islice, repeat
from operator import add, and_, attrgetter, eq, gt, is_, is_not, lt, ne, not_, sub
from typing import Annotated, Any, Literal, NamedTuple

import msgspec

from ..errors import FormatError
from .formats import Format

PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
TOC_TAR_NAME = "stargz.index.json"
WHITEOUT_PREFIX = ".wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"

# Type codes stored per entry (one byte each).
TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo")
_TYPE_CODE = {t: i for i, t in enumerate(TYPES)}
DIR, REG, SYMLINK, HARDLINK, CHAR, BLOCK, FIFO = range(7)
# Unix file-type bits for each type (hardlinks take their target's).
TYPE_MODE_BITS = (0o040000, 0o100000, 0o120000, 0o100000, 0o020000, 0o060000, 0o010000)

# Bounds on what a TOC may claim, so hostile input is refused, not obeyed.
# Entries: a million-entry layer must mount (issue 17, B10). The index keeps
# ~140-200 B per entry; building it peaks at ~700 B per entry (the decoded
# structs, the columns; the JSON is dropped first, see the loader). What a
# TOC at this limit costs a command and a daemon is measured by
# tests/reliability/test_resource_bounds.py (test_toc_entry_limit_holds_memory).
# Entries that say more are bounded by the TOC's size
# (core.estargz.loader.MAX_TOC_BYTES).
MAX_ENTRIES = 1_250_000
# JSON objects a TOC may hold: an entry and its xattrs each.
MAX_OBJECTS = 2 * MAX_ENTRIES + 16
# Values (commas) a TOC may hold: an entry as writers state it has ~10-20
# fields. Without this bound a field the decoder takes as any JSON value
# could hold one array of tens of millions of numbers, each a Python object.
MAX_VALUES = 24 * MAX_ENTRIES
MAX_PATH_DEPTH = 1024
MAX_NAME_BYTES = 4096
# The most file bytes a chunk of a lazy layer may declare (counting the
# ``innerOffset`` bytes inflated before it). Writers cut chunks of at most
# 4 MiB; a reader inflates and verifies a chunk whole, so a TOC declaring a
# 3 GiB chunk (3 MB of gzip, 96 KB of zstd) is refused, not obeyed. A daemon
# holds a few chunks at once (two decoding, their cache writes): with 60 MiB
# chunks its background fetch peaked at 277 MB, with 30 MiB ones well under
# 256 MB, hence 32 MiB (8x what writers make).
MAX_CHUNK_BYTES = 32 << 20
# Compressed bytes a chunk of n file bytes may take, at most: stored deflate
# blocks and zstd's worst case add under 1/128; the rest is for headers (gzip
# member, zstd frame, small tar-header members before the data).
CHUNK_SLACK = 64 << 10


def max_compressed(n: int) -> int:
    """The most compressed bytes ``n`` inflated bytes of a chunk come from."""
    return n + (n >> 7) + CHUNK_SLACK


class Chunk(NamedTuple):
    """One chunk of a regular file.

    ``offset``/``end`` bound its compressed bytes in the blob; decompressing
    them and skipping ``inner_offset`` bytes yields ``chunk_size`` bytes of the
    file starting at ``chunk_offset``. ``index`` is the chunk's number within
    the layer (blob order), handy for cache state and chunk maps.
    """

    entry_id: int
    chunk_offset: int
    chunk_size: int
    offset: int
    end: int
    inner_offset: int
    digest: str | None
    index: int


def _norm_name(name: str) -> str:
    if "\x00" in name:
        raise FormatError(f"TOC entry name contains a NUL byte: {name!r}")
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise FormatError(f"TOC entry name escapes the layer root: {name!r}")
        parts.append(part)
    if len(parts) > MAX_PATH_DEPTH:
        raise FormatError(f"TOC entry name nests deeper than {MAX_PATH_DEPTH}: {name[:80]!r}...")
    return "/".join(parts)


def _parse_time(s) -> float:
    if not s or not isinstance(s, str):
        return 0.0
    try:
        if s.endswith("Z"):
            s = s[:-1] + "+00:00"
        # Go writes nanoseconds; Python's parser takes at most microseconds.
        if "." in s:
            head, _, rest = s.partition(".")
            frac = ""
            i = 0
            while i < len(rest) and rest[i].isdigit():
                frac += rest[i]
                i += 1
            s = head + "." + (frac[:6] or "0") + rest[i:]
        return datetime.fromisoformat(s).timestamp()
    except (ValueError, OverflowError):
        return 0.0


def _int(v, what: str, name: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise FormatError(f"TOC entry {name!r}: {what} is not an integer")
    if v < lo or v > hi:
        raise FormatError(f"TOC entry {name!r}: {what} {v} is out of range")
    return v


class Entry:
    """A view of one entry of a :class:`LayerIndex` (see docs/CONTRACTS.md)."""

    __slots__ = ("_ix", "id")

    def __init__(self, ix: LayerIndex, id: int):
        self._ix = ix
        self.id = id

    def __repr__(self) -> str:
        return f"<Entry {self.id} {self.type} {self.path!r}>"

    def __eq__(self, other) -> bool:
        return isinstance(other, Entry) and other._ix is self._ix and other.id == self.id

    def __hash__(self) -> int:
        return hash((id(self._ix), self.id))

    @property
    def name(self) -> str:
        return self._ix._names[self.id]

    @property
    def path(self) -> str:
        return self._ix.path_of(self.id)

    @property
    def type(self) -> str:
        return TYPES[self._ix._types[self.id]]

    @property
    def type_code(self) -> int:
        return self._ix._types[self.id]

    @property
    def size(self) -> int:
        return self._ix._sizes[self.id]

    @property
    def mode(self) -> int:
        return self._ix._modes[self.id]

    @property
    def uid(self) -> int:
        return self._ix._uids[self.id]

    @property
    def gid(self) -> int:
        return self._ix._gids[self.id]

    @property
    def mtime(self) -> float:
        return self._ix._mtimes[self.id]

    @property
    def parent_id(self) -> int:
        return self._ix._parents[self.id]

    def _extra(self, key, default=None):
        ex = self._ix._extras.get(self.id)
        return default if ex is None else ex.get(key, default)

    @property
    def uname(self) -> str:
        return self._ix._owner_names[self._ix._unames[self.id]]

    @property
    def gname(self) -> str:
        return self._ix._owner_names[self._ix._gnames[self.id]]

    @property
    def link_name(self) -> str:
        return self._extra("linkName", "")

    @property
    def dev_major(self) -> int:
        return self._extra("devMajor", 0)

    @property
    def dev_minor(self) -> int:
        return self._extra("devMinor", 0)

    @property
    def xattrs(self) -> dict[str, bytes]:
        return self._extra("xattrs", {}) or {}

    @property
    def digest(self) -> str | None:
        ix = self._ix
        if ix._f_has_digest[self.id]:
            i = self.id * 32
            return "sha256:" + ix._f_digests[i : i + 32].hex()
        return self._extra("digest")

    @property
    def target_id(self) -> int | None:
        return self._extra("target")

    @property
    def num_link(self) -> int:
        """Hard link count: 1 + the hardlinks pointing at this entry's target."""
        ix = self._ix
        tid = self.target_id
        return ix._nlinks.get(self.id if tid is None else tid, 1)

    @property
    def is_whiteout(self) -> bool:
        n = self.name
        return n.startswith(WHITEOUT_PREFIX) and n != WHITEOUT_OPAQUE

    @property
    def is_opaque_marker(self) -> bool:
        return self.name == WHITEOUT_OPAQUE

    @property
    def whiteout_target(self) -> str | None:
        """For ``.wh.NAME``, the NAME it hides; else None."""
        return self.name[len(WHITEOUT_PREFIX):] if self.is_whiteout else None


class LayerIndex:
    """Column-stored index of one layer's TOC (see docs/CONTRACTS.md).

    Not split: its methods are the accessors over one set of columns (the
    reason it is columns, not an object per entry, is memory: B4/B10)."""

    def __init__(self, *, format: str, blob_digest: str, blob_size: int, toc_digest: str,
                 toc_offset: int):
        self.format = format
        self.blob_digest = blob_digest
        self.blob_size = blob_size
        self.toc_digest = toc_digest
        # the TOC digest matched the manifest annotation (set by the loader)
        self.toc_verified = False
        self.toc_offset = toc_offset
        self.prefetch_end: int | None = None
        self.no_prefetch = False
        self.toc_size = 0  # compressed bytes of the TOC region
        # zstd:chunked only (filled in by core/estargz/zstdchunked.py): the
        # sha256 of the compressed TOC (what the manifest-checksum annotation
        # states), the Chunk.index of "zeros" chunks (holes, served without
        # fetching), and where the tar-split lives (None: not in the blob).
        self.manifest_checksum: str | None = None
        self.zero_chunks: frozenset[int] = frozenset()
        self.tar_split = None
        # Hardlinks whose target is not in this layer (entry ids), and, for
        # plain layers, the sparse map of each sparse file (entry id ->
        # ((file offset, length), ...) of its stored data).
        self.outside_hardlinks: list[int] = []
        self.sparse_maps: dict[int, tuple[tuple[int, int], ...]] = {}
        self.warnings: list[str] = []
        # Per-entry columns.
        self._names: list[str] = []
        self._types = bytearray()
        self._parents = array("i")
        self._sizes = array("q")
        self._modes = array("I")
        self._uids = array("I")
        self._gids = array("I")
        self._mtimes = array("d")
        self._first_chunk = array("i")  # per entry; -1 when none
        self._chunk_count = array("i")
        self._extras: dict[int, dict] = {}
        # User and group names: indexes into a small shared table ("" first).
        self._owner_names: list[str] = [""]
        self._unames = array("H")
        self._gnames = array("H")
        # File digests (sha256) as a column: 32 bytes per entry, flag per entry;
        # other digest forms stay in _extras.
        self._f_digests = bytearray()
        self._f_has_digest = bytearray()
        self._nlinks: dict[int, int] = {}
        # Children: (ids ordered by (parent, name), per-entry start, per-entry
        # count), built on the first lookup or listing rather than at resolve:
        # see _child_index.
        self._children: tuple[array, array, array] | None = None
        # Per-chunk columns, ordered by blob offset.
        self._c_entry = array("i")
        self._c_file_off = array("q")
        self._c_size = array("q")
        self._c_off = array("q")
        self._c_end = array("q")
        self._c_inner = array("q")
        # 32 bytes each (all-zero: none) and a flag each; both None when every
        # chunk's digest is its file's (single-chunk files, as writers state them).
        self._c_digests: bytearray | None = bytearray()
        self._c_has_digest: bytearray | None = bytearray()
        # Chunk indexes of each file in file order: entries' chunks are
        # contiguous in _file_chunk_ids, starting at _first_chunk[entry].
        self._file_chunk_ids = array("i")

    # -- basic access -------------------------------------------------
    def __len__(self) -> int:
        return len(self._names)

    @property
    def root(self) -> Entry:
        return Entry(self, 0)

    def entry(self, id: int) -> Entry:
        if not 0 <= id < len(self._names):
            raise IndexError(id)
        return Entry(self, id)

    def iter_entries(self) -> Iterator[Entry]:
        for i in range(len(self._names)):
            yield Entry(self, i)

    def path_of(self, id: int) -> str:
        parts = []
        names, parents = self._names, self._parents
        while id != 0:
            parts.append(names[id])
            id = parents[id]
        return "/".join(reversed(parts))

    def parent(self, entry: Entry) -> Entry:
        return Entry(self, self._parents[entry.id])

    def _child_index(self) -> tuple[array, array, array]:
        """The children index, built on first use: resolving a layer (what a
        mount, ``ls PATH`` and the app wait for) does not sort every entry by
        name, the first lookup does. Two threads racing here build the same
        triple; it is assigned whole, so neither sees half of one."""
        ci = self._children
        if ci is None:
            ci = self._children = _build_children(self._names, self._parents)
        return ci

    def prepare(self) -> None:
        """Build now what the index otherwise builds on first use (the
        children index): for a worker thread right after loading, so that
        the first lookup on an event loop (a FUSE request, the app's first
        paint) does not sort every entry."""
        self._child_index()

    def children(self, entry: Entry) -> list[Entry]:
        ids, start, count = self._child_index()
        s = start[entry.id]
        return [Entry(self, i) for i in ids[s : s + count[entry.id]]]

    def child_ids(self, id: int) -> array:
        ids, start, count = self._child_index()
        s = start[id]
        return ids[s : s + count[id]]

    def child(self, entry: Entry | int, name: str) -> Entry | None:
        id = entry if isinstance(entry, int) else entry.id
        ids, start, count = self._child_index()
        s, n = start[id], count[id]
        names = self._names
        lo, hi = s, s + n
        # Binary search over children sorted by name.
        while lo < hi:
            mid = (lo + hi) // 2
            if names[ids[mid]] < name:
                lo = mid + 1
            else:
                hi = mid
        if lo < s + n and names[ids[lo]] == name:
            return Entry(self, ids[lo])
        return None

    def scan_columns(self) -> tuple[list[str], list[int], list[int]]:
        """The name, type-code and size columns, indexed by entry id (0 is the
        root): for a scan over every entry (the app's search) without an
        :class:`Entry` each. Read-only by contract: the index's own lists."""
        return self._names, self._types, self._sizes

    def stat_row(self, id: int) -> tuple:
        """``(name, shown_id, type_code, mode, uid, gid, size, mtime, nlink)``
        of entry ``id`` in one call, the fields after ``name`` from what it
        shows (a hardlink: its target, ``shown_id``). The FUSE server's stat
        path (``find -ls`` asks it once per entry) reads it instead of an
        :class:`Entry`'s properties, a call each."""
        ex = self._extras.get(id)
        t = id
        if ex is not None:
            t = ex.get("target", id)
        return (self._names[id], t, self._types[t], self._modes[t], self._uids[t],
                self._gids[t], self._sizes[t], self._mtimes[t], self._nlinks.get(t, 1))

    def lookup(self, path: str) -> Entry | None:
        cur = 0
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if self._types[cur] != DIR:
                return None
            e = self.child(cur, part)
            if e is None:
                return None
            cur = e.id
        return Entry(self, cur)

    # -- chunks -------------------------------------------------------
    @property
    def num_chunks(self) -> int:
        return len(self._c_off)

    def chunk(self, index: int) -> Chunk:
        d = None
        if self._c_digests is None:  # every chunk's digest is its file's
            e = self._c_entry[index]
            if self._f_has_digest[e]:
                d = "sha256:" + self._f_digests[e * 32 : e * 32 + 32].hex()
        elif self._c_has_digest[index]:
            d = "sha256:" + self._c_digests[index * 32 : index * 32 + 32].hex()
        return Chunk(self._c_entry[index], self._c_file_off[index], self._c_size[index],
                     self._c_off[index], self._c_end[index], self._c_inner[index], d, index)

    def chunks(self, entry: Entry) -> list[Chunk]:
        """The chunks of a regular file in file order (hardlinks: the target's)."""
        id = entry.id
        tid = entry.target_id
        if tid is not None:
            id = tid
        first = self._first_chunk[id]
        if first < 0:
            return []
        ids = self._file_chunk_ids[first : first + self._chunk_count[id]]
        return [self.chunk(i) for i in ids]

    def chunks_for_range(self, entry: Entry, offset: int, size: int) -> list[Chunk]:
        """The chunks of ``entry`` overlapping ``[offset, offset+size)``."""
        chunks = self.chunks(entry)
        if not chunks or size <= 0:
            return []
        starts = [c.chunk_offset for c in chunks]
        i = max(0, bisect.bisect_right(starts, offset) - 1)
        out = []
        end = offset + size
        while i < len(chunks) and chunks[i].chunk_offset < end:
            c = chunks[i]
            if c.chunk_offset + c.chunk_size > offset:
                out.append(c)
            i += 1
        return out

    def all_chunks(self) -> Iterator[Chunk]:
        for i in range(len(self._c_off)):
            yield self.chunk(i)

    def chunk_digest_hexes(self, start: int = 0, stop: int | None = None) -> list[str | None]:
        """The sha256 (hex, no ``sha256:``) of chunks ``start:stop`` in blob
        order, None for a chunk without one: what :meth:`chunk` says of
        each chunk's digest, without a :class:`Chunk` each (a layer-wide
        cache look, the app's chunk map, then costs ~0.3 s for a million
        chunks instead of ~2 s)."""
        start, stop, _ = slice(start, stop).indices(len(self._c_off))
        if stop <= start:
            return []
        if self._c_digests is None:  # every chunk's digest is its file's
            owner = self._c_entry[start:stop]
            blob, has = self._f_digests, self._f_has_digest
            lo, hi = min(owner), max(owner) + 1  # (files are in blob order: a short span)
            owner = map(sub, owner, repeat(lo))
        else:
            owner, blob, has, lo, hi = None, self._c_digests, self._c_has_digest, start, stop
        # one hex string cut in C, not a slice per chunk in Python
        out: list = blob[lo * 32 : hi * 32].hex(" ", -32).split(" ")
        has = has[lo:hi]
        if not all(has):  # (the span of files holds directories too: a few holes)
            for k in compress(range(len(out)), map(not_, has)):
                out[k] = None
        return out if owner is None else list(map(out.__getitem__, owner))

    def chunk_entry_path(self, chunk: Chunk) -> str:
        return self.path_of(chunk.entry_id)

    @property
    def prefetch_chunk_count(self) -> int:
        """How many chunks (in blob order) lie in the prefetch region."""
        if self.prefetch_end is None:
            return 0
        return bisect.bisect_left(self._c_off, self.prefetch_end)

    def memory_estimate(self) -> int:
        """Approximate resident bytes held by the index."""
        total = sys.getsizeof(self._names) + sum(sys.getsizeof(n) for n in self._names)
        for col in (self._types, self._parents, self._sizes, self._modes, self._uids, self._gids,
                    self._mtimes, self._first_chunk, self._chunk_count,
                    *self._child_index(), self._c_entry, self._c_file_off,
                    self._c_size, self._c_off, self._c_end, self._c_inner, self._c_digests,
                    self._c_has_digest, self._file_chunk_ids, self._f_digests,
                    self._f_has_digest, self._unames, self._gnames):
            if col is not None:
                total += sys.getsizeof(col)
        total += sys.getsizeof(self._extras) + sum(
            sys.getsizeof(v) + sum(sys.getsizeof(x) for x in v.values()) for v in self._extras.values()
        )
        return total


_XATTR_LIMIT = 64 * 1024
_ZERO32 = bytes(32)
_ZERO_HEX = "0" * 64
# A missing digest: compared by identity, so a TOC's own all-zero digest
# string is still a digest.
_NO_DIGEST = "sha256:" + "0" * 64


class _TocEntry(msgspec.Struct, gc=False):
    """One TOC entry as decoded: the fields the index reads, each any JSON
    value (checked where it is used); the decoder skips other fields. An
    absent field is its default: absent ints and null ones mean the same
    (0), ``mode`` absent or null is the type's default, an absent digest is
    ``_NO_DIGEST`` (a null one None), and ``endOffset`` keeps "absent"."""

    name: Any = None
    type: Any = None
    size: Any = 0
    modtime: Any = None
    mode: Any = None
    uid: Any = 0
    gid: Any = 0
    userName: Any = None
    groupName: Any = None
    linkName: Any = None
    devMajor: Any = 0
    devMinor: Any = 0
    xattrs: Any = None
    digest: Any = _NO_DIGEST
    offset: Any = 0
    chunkOffset: Any = 0
    chunkSize: Any = 0
    chunkDigest: Any = _NO_DIGEST
    innerOffset: Any = 0
    endOffset: Any = msgspec.UNSET


class _Toc(msgspec.Struct, gc=False):
    entries: list[_TocEntry]


_U32 = 0xFFFFFFFF
_I62 = 1 << 62
_UInt32 = Annotated[int, msgspec.Meta(ge=0, le=_U32)]
_UInt62 = Annotated[int, msgspec.Meta(ge=0, le=_I62)]
# A sha256 digest's length ("sha256:" and 64 hex digits: checked later).
_Digest71 = Annotated[str, msgspec.Meta(min_length=71, max_length=71)]


class _CheckedEntry(msgspec.Struct, gc=False):
    """A :class:`_TocEntry` as TOC writers make them, the numbers the index
    keeps checked by the decoder: a name as a string, a known type (one
    shared string each), sizes, offsets, modes and ids as ints within
    bounds, digests as strings of a sha256 digest's length. A TOC where any
    entry (even one the index ignores) is otherwise is decoded again as
    :class:`_TocEntry`, and its values checked where they are used."""

    name: str
    type: Literal["dir", "reg", "symlink", "hardlink", "char", "block", "fifo", "chunk"]
    size: _UInt62 = 0
    modtime: str | None = None
    mode: _UInt32 | None = None
    uid: _UInt32 = 0
    gid: _UInt32 = 0
    userName: Any = None
    groupName: Any = None
    linkName: Any = None
    devMajor: Any = 0
    devMinor: Any = 0
    xattrs: Any = None
    digest: _Digest71 = _NO_DIGEST
    offset: _UInt62 = 0
    chunkOffset: Any = 0
    chunkSize: _UInt62 = 0
    chunkDigest: _Digest71 = _NO_DIGEST
    innerOffset: Any = 0
    endOffset: Any = msgspec.UNSET


class _CheckedToc(msgspec.Struct, gc=False):
    entries: list[_CheckedEntry]


_TOC_DECODER = msgspec.json.Decoder(_Toc)
_CHECKED_DECODER = msgspec.json.Decoder(_CheckedToc)
_NO_FIELDS = _TocEntry()  # an implicit directory's fields


def _decode_xattrs(raw, name: str, warnings: list[str]) -> dict[str, bytes]:
    if not isinstance(raw, dict):
        warnings.append(f"{name}: xattrs is not an object; ignored")
        return {}
    out = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str):
            warnings.append(f"{name}: xattr {k!r} is not a base64 string; ignored")
            continue
        try:
            val = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            warnings.append(f"{name}: xattr {k!r} is not valid base64; ignored")
            continue
        if len(val) > _XATTR_LIMIT:
            warnings.append(f"{name}: xattr {k!r} is larger than 64 KiB; ignored")
            continue
        out[k] = val
    return out


def _digest_bytes(d) -> bytes | None:
    if isinstance(d, str) and d.startswith("sha256:") and len(d) == 71:
        try:
            return binascii.unhexlify(d[7:])  # strict: no whitespace, unlike fromhex
        except ValueError:
            return None
    return None


class _OwnerTable(dict):
    """User/group name -> small id, filling ``names`` on first sight."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = names
        self[None] = self[""] = 0

    def __missing__(self, v) -> int:
        if not isinstance(v, str) or len(self.names) >= 0xFFFF:
            return 0  # not a name, or absurdly many owners: numeric ids only
        i = self[v] = len(self.names)
        self.names.append(v)
        return i


class _TimeCache(dict):
    """modtime string -> seconds; TOCs repeat a handful of timestamps."""

    def __missing__(self, v) -> float:
        t = _parse_time(v)
        if len(self) < 65536:
            self[v] = t
        return t


_CHUNK = len(TYPES)  # pseudo type code of "chunk" continuation entries
_TYPE_CODE_WITH_CHUNK = {**_TYPE_CODE, "chunk": _CHUNK}
_DEFAULT_MODE = tuple(0o755 if t == DIR else 0o644 for t in range(len(TYPES)))
# bytes.translate tables over type codes: 1 where the type is (not) so.
_IS_REG = bytes(1 if t == REG else 0 for t in range(256))
_IS_NOT_REG = bytes(0 if t == REG else 1 for t in range(256))
_IS_OTHER = bytes(0 if t in (DIR, REG) else 1 for t in range(256))


def _int_column(typecode: str, values: list, what: str, lo: int, hi: int,
                path_of, nulls: list | None = None, checked: int = -1) -> array:
    """``values`` (None meaning 0, or ``nulls``' value at its place) as an
    array, every one an int in [lo, hi]; otherwise a :class:`FormatError`
    naming the first bad entry. ``checked`` >= 0: the decoder made sure
    every value is an int (or None) in [0, checked], so only what it left
    open is checked."""
    if checked >= 0 and lo <= 0:
        try:
            col = array(typecode, values)
        except TypeError:  # nulls (implicit directories' modes): filled in place
            for k in compress(range(len(values)), map(is_, values, repeat(None))):
                values[k] = 0 if nulls is None else nulls[k]
            col = array(typecode, values)
        if checked <= hi or not col or max(col) <= hi:
            return col
        checked = -1  # past hi: the precise pass names the entry
    try:
        try:
            col = array(typecode, values)
        except TypeError:  # None (a null)
            if nulls is None:
                col = array(typecode, [0 if v is None else v for v in values])
            else:
                col = array(typecode, [d if v is None else v
                                       for v, d in zip(values, nulls, strict=True)])
        if col and (min(col) < lo or max(col) > hi):
            raise ValueError
        if bool in set(map(type, values)):
            raise TypeError
        return col
    except (TypeError, ValueError, OverflowError):
        for k, v in enumerate(values):
            _int(v, what, path_of(k), lo, hi)
        raise FormatError(f"TOC has an invalid {what}") from None


_HEX_BATCH = 512


def _sha256_column(digests: list, sized: bool = False) -> tuple[list[bool], bytes]:
    """Which of ``digests`` are well-formed sha256 digests, and all of them as
    32-byte pieces (zeros for the others), decoded in one go. ``_NO_DIGEST``
    (this very object) stands for a missing one. ``sized``: every one is
    known to be a string of 71 characters."""
    n = len(digests)
    try:
        # The common case, checked at C speed: every one a string of 71
        # characters (so every 71st character of them joined starts one)
        # starting "sha256:", 64 hex digits after it (a hex part holding
        # "sha256:" would lose it to the replace: hence the length check).
        # A few hundred at a time: small temporaries stay in the cache
        # (whole-column ones cost a third more, in page faults).
        if sized or not n or set(map(len, digests)) == {71}:
            pieces = []
            for s in range(0, n, _HEX_BATCH):
                joined = "".join(digests[s : s + _HEX_BATCH])
                m = len(joined) // 71
                if not all(joined[k::71] == c * m for k, c in enumerate("sha256:")):
                    break
                pieces.append(binascii.unhexlify(joined.replace("sha256:", "")))
            else:
                blob = b"".join(pieces)
                if len(blob) == 32 * n:
                    return list(map(is_not, digests, repeat(_NO_DIGEST))), blob
    except (TypeError, ValueError):  # not strings; not hex (binascii.Error)
        pass
    good = [type(d) is str and len(d) == 71 and d.startswith("sha256:") and d is not _NO_DIGEST
            for d in digests]
    try:
        blob = binascii.unhexlify("".join([d[7:] if ok else _ZERO_HEX
                                           for d, ok in zip(digests, good, strict=True)]))
    except ValueError:  # some hex part is not hex: decode one by one
        pieces = [_digest_bytes(d) if ok else None for d, ok in zip(digests, good, strict=True)]
        good = [p is not None for p in pieces]
        blob = b"".join([p or _ZERO32 for p in pieces])
    return good, blob


class _ChunkColumns:
    """Chunks as parallel lists while the index is built (``has_digest`` and
    ``digests`` None: each chunk's digest is its file's)."""

    def __init__(self):
        self.owners: list[int] = []
        self.file_offs: list[int] = []
        self.sizes: list[int] = []
        self.offs: list[int] = []
        self.hints: list[int | None] = []
        self.inners: list[int] = []
        self.has_digest = bytearray()
        self.digests = bytearray()

    def set_digests(self, digests: list, sized: bool = False) -> None:
        good, blob = _sha256_column(digests, sized)
        self.has_digest = bytearray(good)
        self.digests = bytearray(blob)

    def add(self, rec: tuple) -> None:
        owner, foff, size, off, hint, inner, dig = rec
        self.owners.append(owner)
        self.file_offs.append(foff)
        self.sizes.append(size)
        self.offs.append(off)
        self.hints.append(hint)
        self.inners.append(inner)
        self.has_digest.append(1 if dig else 0)
        self.digests += dig or _ZERO32


def _entries_of(doc) -> list[_TocEntry]:
    """The entries of a parsed TOC document (``json.loads``'s dicts), as the
    decoder would have made them."""
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise FormatError("TOC has no 'entries' list")
    ents = doc["entries"]
    if len(ents) > MAX_ENTRIES:
        raise FormatError(f"TOC has {len(ents)} entries; the limit is {MAX_ENTRIES}")
    try:
        return msgspec.convert(ents, list[_TocEntry])
    except msgspec.ValidationError as e:
        # "Expected `object`, got `int` - at `$[12]`": the only thing that
        # can fail, every field taking any value.
        where = re.search(r"\$\[(\d+)\]", str(e))
        raise FormatError(f"TOC entry {where[1] if where else '?'} is not an object") from None


class ObjectCounter:
    """Counts the JSON objects and arrays of a TOC fed to it piece by piece
    (its braces and brackets: one inside a string counts too, which errs on
    the safe side) and refuses the TOC past ``MAX_OBJECTS``, or past
    ``MAX_VALUES`` commas (values in arrays and objects). Every entry is one object (two
    with xattrs): far more is a TOC built to exhaust memory in the decoder,
    refused undecoded, and by the loader before it is all inflated.
    (Counting '"name"' keys too would bound entries to MAX_ENTRIES rather
    than twice that, but costs a second, slower pass, ~10% of a resolve;
    decoding 2 * MAX_ENTRIES minimal entries before refusing them costs
    less memory than indexing MAX_ENTRIES full ones, which is what bounds a
    TOC we accept.)"""

    def __init__(self):
        self.count = 0
        self.values = 0

    def feed(self, piece: bytes) -> None:
        # '[' too: an array is as much an object to the decoder as '{' is
        self.count += piece.count(b"{") + piece.count(b"[")
        self.values += piece.count(b",")
        if self.count > MAX_OBJECTS:
            raise FormatError(f"TOC holds more objects than {MAX_ENTRIES} entries could (the "
                              "entry limit); refused")
        if self.values > MAX_VALUES:
            raise FormatError(f"TOC holds more values than {MAX_ENTRIES} entries could (the "
                              "entry limit); refused")


def _decode_toc(toc_json: bytes, counted: bool = False) -> tuple[list[_TocEntry], bool]:
    """The TOC's entries, and whether they are :class:`_CheckedEntry` ones
    (``counted``: an :class:`ObjectCounter` saw all of ``toc_json``)."""
    if not counted:
        ObjectCounter().feed(toc_json)
    checked = True
    try:
        try:
            ents = _CHECKED_DECODER.decode(toc_json).entries
        except msgspec.ValidationError:
            checked = False
            ents = _TOC_DECODER.decode(toc_json).entries
    except RecursionError:
        # arrays or objects nested thousands deep in a field taking any value
        raise FormatError("TOC nests values deeper than the decoder allows; refused") from None
    except (msgspec.DecodeError, msgspec.ValidationError):
        # Not JSON, not a TOC, or JSON that json reads and msgspec does not
        # (a BOM, NaN, 1e400, lone surrogates): parsed the way it always was,
        # for the same index or the same error.
        try:
            doc = json.loads(toc_json)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise FormatError(f"TOC is not valid JSON: {str(e)[:120]}") from None
        return _entries_of(doc), False
    if len(ents) > MAX_ENTRIES:
        raise FormatError(f"TOC has {len(ents)} entries; the limit is {MAX_ENTRIES}")
    return ents, checked


def build_index(toc_json: bytes | dict, *, format: str, blob_digest: str, blob_size: int,
                toc_digest: str, toc_offset: int) -> LayerIndex:
    """Parse TOC JSON bytes into a :class:`LayerIndex`. CPU-heavy: run it in a
    worker thread from async code. Raises :class:`FormatError` on a TOC that
    is not valid or makes claims outside the blob. (:func:`decode_entries`
    then :func:`index_entries`; a caller that can drop the JSON between the
    two, as the loader does, peaks lower.)"""
    if isinstance(toc_json, dict):
        # Already parsed (plain layers index their tar this way).
        ents, checked = _entries_of(toc_json), False
    else:
        ents, checked = decode_entries(toc_json)
    return index_entries(ents, checked, format=format, blob_digest=blob_digest,
                         blob_size=blob_size, toc_digest=toc_digest, toc_offset=toc_offset)


def decode_entries(toc_json: bytes, *, counted: bool = False) -> tuple[list, bool]:
    """The TOC's entries as light structs, and whether the checked decoder
    took them (their numbers are then known to be in bounds); raises
    :class:`FormatError` for JSON that is not a TOC or holds more than
    ``MAX_ENTRIES`` entries (``counted``: an :class:`ObjectCounter` already
    saw all of it). The structs do not refer to ``toc_json``: the caller may
    drop it before :func:`index_entries`."""
    return _decode_toc(toc_json, counted)


def index_entries(ents: list, checked: bool, *, format: str, blob_digest: str, blob_size: int,
                  toc_digest: str, toc_offset: int) -> LayerIndex:
    """Index decoded entries (see :func:`decode_entries`).

    This is the resolve hot path of large layers: msgspec decoded the
    entries into light structs (only the fields the index reads; about half
    the time of ``json.loads``), one Python loop (:func:`_tree_loop`) works
    out names and the tree; every other column is built by ``map`` over the
    entries straight into arrays and validated in bulk, with a slow, precise
    pass only to name the culprit when something is wrong. (Whole-list
    operations for the tree too were tried, again for this layout: no
    faster than the loop, which makes fewer strings.)"""
    ix = LayerIndex(format=format, blob_digest=blob_digest, blob_size=blob_size,
                    toc_digest=toc_digest, toc_offset=toc_offset)
    names, types, parents, src, by_path, chunk_refs, landmark_offsets = _tree_loop(
        ents, blob_size, ix.warnings)
    ix._names, ix._types, ix._parents = names, types, parents
    # Columns, from each id's defining entry; src's -1 (an implicit
    # directory) picks the _NO_FIELDS appended last.
    fields = list(map([*ents, _NO_FIELDS].__getitem__, src))
    _Columns(ix, fields, checked).build()
    chunks = _first_chunks(ix, fields, checked)
    hardlinks = _link_extras(ix, fields)
    del fields
    _add_chunk_entries(ix, chunks, ents, chunk_refs)
    ix.no_prefetch = NO_PREFETCH_LANDMARK in landmark_offsets
    if PREFETCH_LANDMARK in landmark_offsets:
        ix.prefetch_end = landmark_offsets[PREFETCH_LANDMARK]
    _resolve_hardlinks(ix, hardlinks, by_path)
    _build_chunks(ix, chunks, toc_offset)
    _compact(ix)
    return ix


def _col(entries: list, key: str) -> list:
    return list(map(attrgetter(key), entries))


class _Columns:
    """The per-entry attribute columns of ``ix`` (sizes, modes, owners,
    times, file digests) from each id's defining entry."""

    def __init__(self, ix: LayerIndex, fields: list, checked: bool):
        self.ix, self.fields = ix, fields
        # Bounds the decoder checked (-1: none).
        self.u32, self.i62 = (_U32, _I62) if checked else (-1, -1)

    def int_col(self, key: str, typecode: str, hi: int, bound: int, nulls=None) -> array:
        return _int_column(typecode, _col(self.fields, key), key, 0, hi, self.ix.path_of,
                           nulls=nulls, checked=bound)

    def build(self) -> None:
        ix = self.ix
        ix._sizes = self.int_col("size", "q", _I62, self.i62)
        # A mode left out, or null, is the type's default.
        default_modes = list(map(_DEFAULT_MODE.__getitem__, ix._types))
        modes = self.int_col("mode", "I", _U32, self.u32, nulls=default_modes)
        if modes and max(modes) > 0o7777:
            modes = array("I", [m & 0o7777 for m in modes])
        ix._modes = modes
        ix._uids = self.int_col("uid", "I", _U32, self.u32)
        ix._gids = self.int_col("gid", "I", _U32, self.u32)
        self.times()
        self.owners()
        self.digests()

    def times(self) -> None:
        times = _TimeCache()
        modtimes = _col(self.fields, "modtime")
        try:
            self.ix._mtimes = array("d", map(times.__getitem__, modtimes))
        except TypeError:  # an unhashable modtime: parse one by one
            self.ix._mtimes = array("d", map(_parse_time, modtimes))

    def owners(self) -> None:
        ix, fields = self.ix, self.fields
        owners = _OwnerTable(ix._owner_names)
        try:
            ix._unames = array("H", map(owners.__getitem__, _col(fields, "userName")))
            ix._gnames = array("H", map(owners.__getitem__, _col(fields, "groupName")))
        except TypeError:  # an unhashable owner name: not a name
            ix._unames = array("H", [owners[v] if isinstance(v, str) else 0
                                     for v in _col(fields, "userName")])
            ix._gnames = array("H", [owners[v] if isinstance(v, str) else 0
                                     for v in _col(fields, "groupName")])

    def digests(self) -> None:
        """File digests (regular files only) as a column; other digest forms
        are kept as they are, in the extras."""
        ix = self.ix
        n = len(ix._names)
        digests = _col(self.fields, "digest")
        for k in compress(range(n), ix._types.translate(_IS_NOT_REG)):
            digests[k] = _NO_DIGEST
        good, blob = _sha256_column(digests, self.u32 >= 0)
        ix._f_digests = bytearray(blob)
        ix._f_has_digest = bytearray(good)
        if not all(good):
            for k in compress(range(n), map(not_, good)):
                d = digests[k]
                if type(d) is str and d and d is not _NO_DIGEST:
                    ix._extras[k] = {"digest": d}


def _first_chunks(ix: LayerIndex, fields: list, checked: bool) -> _ChunkColumns:
    """Each non-empty regular file's first chunk, which the file's own entry
    describes."""
    n = len(ix._names)
    sizes, path_of = ix._sizes, ix.path_of
    reg_ids = list(compress(range(n), ix._types.translate(_IS_REG)))
    cands = list(compress(reg_ids, map(sizes.__getitem__, reg_ids)))
    first = list(map(fields.__getitem__, cands))
    chunks = _ChunkColumns()
    if (any(map(attrgetter("chunkOffset"), first)) or any(map(attrgetter("innerOffset"), first))
            or any(map(is_not, map(attrgetter("endOffset"), first), repeat(msgspec.UNSET)))):
        for k, e in zip(cands, first, strict=True):
            chunks.add(_chunk_record(k, e, path_of(k), blob_size=ix.blob_size))
        return chunks
    i62 = _I62 if checked else -1

    def cand_path(j: int) -> str:
        return path_of(cands[j])

    chunks.owners = cands
    chunks.file_offs = [0] * len(cands)
    chunks.sizes = _int_column("q", _col(first, "chunkSize"), "chunkSize", 0, _I62, cand_path,
                               checked=i62)
    chunks.offs = _int_column("q", _col(first, "offset"), "offset", 0, ix.blob_size, cand_path,
                              checked=i62)
    chunks.inners = [0] * len(cands)
    chunks.hints = [None] * len(cands)
    chunk_digests = _col(first, "chunkDigest")
    if chunk_digests == _col(first, "digest"):
        # Single-chunk files stating the file's digest as the chunk's: the
        # chunks' digests are read from the file digest column.
        chunks.has_digest = chunks.digests = None
    else:
        chunks.set_digests(chunk_digests, checked)
    return chunks


def _link_extras(ix: LayerIndex, fields: list) -> list[tuple[int, str]]:
    """Link names, device numbers and xattrs into the extras; the hardlinks
    (id, link name) to resolve."""
    n = len(ix._names)
    types, extras, path_of = ix._types, ix._extras, ix.path_of
    hardlinks: list[tuple[int, str]] = []
    for id in compress(range(n), types.translate(_IS_OTHER)):  # neither dir nor reg
        e = fields[id]
        code = types[id]
        path = path_of(id)
        ex = {}
        if code in (SYMLINK, HARDLINK):
            ln = e.linkName
            if not isinstance(ln, str) or not ln:
                raise FormatError(f"TOC {TYPES[code]} {path!r} has no linkName")
            if "\x00" in ln:
                raise FormatError(f"TOC {TYPES[code]} {path!r} has a NUL byte in its linkName")
            ex["linkName"] = ln
            if code == HARDLINK:
                hardlinks.append((id, ln))
        if code in (CHAR, BLOCK):
            ex["devMajor"] = _int(e.devMajor, "devMajor", path, 0, _U32)
            ex["devMinor"] = _int(e.devMinor, "devMinor", path, 0, _U32)
        if ex:
            extras[id] = ex
    for id in compress(range(n), _col(fields, "xattrs")):
        decoded = _decode_xattrs(fields[id].xattrs, path_of(id), ix.warnings)
        if decoded:
            extras.setdefault(id, {})["xattrs"] = decoded
    return hardlinks


def _add_chunk_entries(ix: LayerIndex, chunks: _ChunkColumns, ents: list, chunk_refs) -> None:
    """The "chunk" continuation entries of multi-chunk files."""
    if not chunk_refs:
        return
    if chunks.digests is None:  # no longer one chunk per file
        f_digests, f_has = ix._f_digests, ix._f_has_digest
        chunks.has_digest = bytearray(map(f_has.__getitem__, chunks.owners))
        chunks.digests = bytearray(b"".join([f_digests[k * 32 : k * 32 + 32]
                                             for k in chunks.owners]))
    for owner, i in chunk_refs:
        chunks.add(_chunk_record(owner, ents[i], ix.path_of(owner), ix.blob_size))
    _move_end_hints(chunks, {owner for owner, _ in chunk_refs})


def _tree_loop(ents: list, blob_size: int, warnings: list[str]):
    """Names, types and the tree, one entry at a time (any TOC)."""
    names: list[str] = [""]
    types = bytearray([DIR])
    parents = array("i", [0])
    # src[id]: the index in ``ents`` of the entry that defines id (-1: implicit dir).
    src: list[int] = [-1]
    by_path: dict[str, int] = {"": 0}
    # Share equal names (``__init__.py``, ``LICENSE``...) through a local table
    # rather than sys.intern, whose global dict would keep ~40 bytes per
    # unique name alive after the build.
    shared_names: dict[str, str] = {}
    max_plain_len = min(MAX_NAME_BYTES // 4, MAX_PATH_DEPTH) - 1

    def add_dir(path: str, parent: int) -> int:
        id = len(names)
        base = path.rpartition("/")[2]
        names.append(shared_names.setdefault(base, base))
        types.append(DIR)
        parents.append(parent)
        src.append(-1)
        by_path[path] = id
        return id

    def ensure_dir(path: str) -> int:
        # Iterative, not recursive: a 1000-deep implicit path must not hit
        # Python's recursion limit.
        missing = []
        id = by_path.get(path)
        while id is None:
            missing.append(path)
            path = path.rpartition("/")[0]
            id = by_path.get(path)
        if types[id] != DIR:
            raise FormatError(f"TOC entry {path!r} is used as a directory but is a {TYPES[types[id]]}")
        for p in reversed(missing):
            id = add_dir(p, id)
        return id

    chunk_refs: list[tuple[int, int]] = []  # (owner id, index in ents) of "chunk" entries
    landmark_offsets: dict[str, int] = {}
    type_code = _TYPE_CODE_WITH_CHUNK.get
    # The last parent looked up: consecutive entries mostly share theirs.
    last_dir, last_parent = None, 0
    for i, raw in enumerate(ents):
        name_raw = raw.name
        if type(name_raw) is not str:
            raise FormatError("TOC entry has no name")
        try:
            code = type_code(raw.type)
        except TypeError:  # unhashable
            code = None
        # Fast path for ordinary relative names (short enough that neither
        # the byte-length nor the depth limit can be exceeded); anything
        # unusual, landmarks included, is checked and normalised by _norm_name.
        if (name_raw and len(name_raw) <= max_plain_len and name_raw[0] not in "/."
                and "//" not in name_raw and "/." not in name_raw and "\x00" not in name_raw):
            path = name_raw[:-1] if name_raw[-1] == "/" else name_raw
        else:
            if len(name_raw.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
                raise FormatError(f"TOC entry name longer than {MAX_NAME_BYTES} bytes")
            path = _norm_name(name_raw)
            if path in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK) and code != _CHUNK:
                landmark_offsets[path] = _int(raw.offset, "offset", path, 0, blob_size)
                continue
        if code is None:
            raise FormatError(f"TOC entry {path!r} has unknown type {raw.type!r}")
        if code == _CHUNK:
            owner = by_path.get(path)
            if owner is None or types[owner] != REG:
                raise FormatError(f"TOC chunk entry for {path!r} has no preceding regular file")
            chunk_refs.append((owner, i))
            continue
        if not path:
            if code != DIR:
                raise FormatError("TOC root entry is not a directory")
            src[0] = i
            continue
        slash = path.rfind("/")
        if slash < 0:
            parent = 0
        else:
            dir_path = path[:slash]
            if dir_path == last_dir:
                parent = last_parent
            else:
                parent = by_path.get(dir_path)
                if parent is None or types[parent] != DIR:
                    parent = ensure_dir(dir_path)
                last_dir, last_parent = dir_path, parent
        new_id = len(names)
        id = by_path.setdefault(path, new_id)
        if id == new_id:
            base = path[slash + 1:]
            names.append(shared_names.setdefault(base, base))
            types.append(code)
            parents.append(parent)
            src.append(i)
        else:
            # Duplicate entry: the later one wins, as tar extraction would.
            if not (code == DIR and types[id] == DIR):
                if types[id] == DIR:
                    raise FormatError(f"TOC entry {path!r} appears both as a directory and a "
                                      f"{TYPES[code]}")
                warnings.append(f"{path}: duplicate entry; the later one is used")
                types[id] = code
                last_dir = None  # it may have been a directory
                chunk_refs = [c for c in chunk_refs if c[0] != id]
            src[id] = i
    return names, types, parents, src, by_path, chunk_refs, landmark_offsets


def _compact(ix: LayerIndex) -> None:
    """Drop the growth slack of the columns (arrays over-allocate ~12%)."""
    for name, value in list(vars(ix).items()):
        if isinstance(value, array):
            setattr(ix, name, array(value.typecode, value))
        elif isinstance(value, bytearray):
            setattr(ix, name, bytearray(value))
    ix._names = list(ix._names)


def _chunk_record(owner: int, raw: _TocEntry, path: str, blob_size: int) -> tuple:
    off = _int(raw.offset, "offset", path, 0, blob_size)
    end_hint = raw.endOffset
    end_hint = (_int(end_hint, "endOffset", path, 0, blob_size)
                if end_hint is not None and end_hint is not msgspec.UNSET else None)
    return (
        owner,
        _int(raw.chunkOffset, "chunkOffset", path),
        _int(raw.chunkSize, "chunkSize", path),
        off,
        end_hint,
        _int(raw.innerOffset, "innerOffset", path),
        None if raw.chunkDigest is _NO_DIGEST else _digest_bytes(raw.chunkDigest),
    )


def _move_end_hints(cc: _ChunkColumns, multi: set[int]) -> None:
    """zstd:chunked's ``endOffset`` (on a file's first entry) ends the file's
    *last* chunk: for files of several chunks, move it there, or the first
    chunk's extent would run over all the others (and a read of it fetch
    them, holes included)."""
    last: dict[int, int] = {}
    hint_of: dict[int, int] = {}
    for k, owner in enumerate(cc.owners):
        if owner not in multi:
            continue
        if cc.hints[k] is not None:
            hint_of[owner] = cc.hints[k]
            cc.hints[k] = None
        j = last.get(owner)
        if j is None or cc.file_offs[k] > cc.file_offs[j]:
            last[owner] = k
    for owner, hint in hint_of.items():
        cc.hints[last[owner]] = hint


def _resolve_hardlinks(ix: LayerIndex, hardlinks, by_path) -> None:
    for id, link in hardlinks:
        try:
            target_path = _norm_name(link)
        except FormatError:
            raise FormatError(f"hardlink {ix.path_of(id)!r} points outside the layer: {link!r}") from None
        tid = by_path.get(target_path)
        # Follow chains of hardlinks to the real file, refusing cycles.
        seen = {id}
        while tid is not None and ix._types[tid] == HARDLINK:
            if tid in seen:
                raise FormatError(f"hardlink cycle at {ix.path_of(id)!r}")
            seen.add(tid)
            nxt = ix._extras.get(tid, {}).get("target")
            if nxt is None:
                nxt_link = ix._extras.get(tid, {}).get("linkName", "")
                nxt = by_path.get(_norm_name(nxt_link))
            tid = nxt
        if tid is None:
            # Its target is a file of an earlier layer (overlayfs links it
            # there): the merged view resolves it; the layer alone cannot.
            ix.outside_hardlinks.append(id)
            ix.warnings.append(f"hardlink {ix.path_of(id)!r} points to {link!r}, which is not "
                               "in this layer (a file of an earlier layer)")
            continue
        if ix._types[tid] == DIR:
            raise FormatError(f"hardlink {ix.path_of(id)!r} points to a directory")
        ix._extras.setdefault(id, {})["target"] = tid
        ix._nlinks[tid] = ix._nlinks.get(tid, 1) + 1
        # A hardlink is its target's inode: same size, mode, owner and time.
        for col in (ix._sizes, ix._modes, ix._uids, ix._gids, ix._mtimes):
            col[id] = col[tid]


def _build_children(names: list[str], parents: array) -> tuple[array, array, array]:
    """Entry ids ordered by (parent, name), and each entry's start and count
    of children in that order."""
    n = len(names)
    # Ids by parent (a stable sort: id order within a parent; fast on tar
    # order, where parents come in runs). Writers list a directory's entries
    # in name order, so that is usually the order wanted; otherwise a name
    # sort first, then the stable parent sort, gives (parent, name) without
    # a tuple per entry.
    order = sorted(range(1, n), key=parents.__getitem__)
    by_parent = list(map(parents.__getitem__, order))
    in_order = list(map(names.__getitem__, order))
    if any(map(and_, map(eq, by_parent, islice(by_parent, 1, None)),
               map(gt, in_order, islice(in_order, 1, None)))):
        order = sorted(range(1, n), key=names.__getitem__)
        order.sort(key=parents.__getitem__)
    del in_order
    start = array("i", bytes(4 * n))
    count = array("i", bytes(4 * n))
    # Where each parent's run begins (C-level maps, not a loop per entry).
    firsts = list(compress(range(len(by_parent)),
                           map(ne, by_parent, chain((-1,), by_parent))))
    dirs = list(map(by_parent.__getitem__, firsts))
    deque(map(start.__setitem__, dirs, firsts), maxlen=0)
    deque(map(count.__setitem__, dirs, map(sub, chain(islice(firsts, 1, None), (len(order),)),
                                           firsts)), maxlen=0)
    return array("i", order), start, count


def _build_chunks(ix: LayerIndex, cc: _ChunkColumns, toc_offset: int) -> None:
    n = len(ix._names)
    m = len(cc.owners)
    if not m:
        ix._first_chunk = array("i", [-1]) * n
        ix._chunk_count = array("i", bytes(4 * n))
        return
    # Blob order: by compressed offset, then by offset inside the member.
    offs0, inners0 = cc.offs, cc.inners
    has_inner = any(inners0)
    if not has_inner and all(map(lt, offs0, islice(offs0, 1, None))):
        perm = None  # already in blob order, as writers lay TOCs out
    elif has_inner:
        perm = sorted(range(m), key=lambda k: (offs0[k], inners0[k]))
    else:
        perm = sorted(range(m), key=offs0.__getitem__)
    if perm is None:
        owners = array("i", cc.owners)
        foffs = array("q", cc.file_offs)
        csizes = array("q", cc.sizes)
        offs = array("q", offs0)
        inners = array("q", inners0)
        hints = cc.hints
        has_digest, digests = cc.has_digest, cc.digests
        # Offsets strictly increase: each chunk runs to the next one.
        ends = offs[1:]
        ends.append(toc_offset)
    else:
        owners = array("i", map(cc.owners.__getitem__, perm))
        foffs = array("q", map(cc.file_offs.__getitem__, perm))
        csizes = array("q", map(cc.sizes.__getitem__, perm))
        offs = array("q", map(offs0.__getitem__, perm))
        inners = array("q", map(inners0.__getitem__, perm))
        hints = list(map(cc.hints.__getitem__, perm))
        has_digest = digests = None
        if cc.digests is not None:
            has_digest = bytearray(map(cc.has_digest.__getitem__, perm))
            dg = cc.digests
            digests = bytearray(b"".join([dg[k * 32 : k * 32 + 32] for k in perm]))
        # The compressed extent of a chunk runs to the next chunk that starts
        # later in the blob (or the TOC), unless the TOC states its end.
        starts = sorted(set(offs))
        next_start = dict(zip(starts, starts[1:] + [toc_offset], strict=True))
        ends = array("q", map(next_start.__getitem__, offs))
    if offs[m - 1] >= toc_offset:
        raise FormatError(f"chunk of {ix.path_of(owners[m - 1])!r} starts at {offs[m - 1]}, "
                          "inside the TOC region")
    if hints.count(None) != m:
        for k, hint in enumerate(hints):
            if hint is not None and hint > offs[k]:
                ends[k] = min(hint, toc_offset)
    sizes = ix._sizes
    # Files in blob order (each file's chunk after the previous file's) have
    # one chunk each, without a set to tell.
    owners_rising = all(map(lt, owners, islice(owners, 1, None)))
    if owners_rising or len(set(owners)) == m:
        # One chunk per file (the common case): it must start at 0 and cover
        # the file; a size of 0 (or past the end) means the whole file.
        fsizes = array("q", map(sizes.__getitem__, owners))
        # Some chunk with 0 < chunk size < file size (min(True, size) is truthy)?
        # Writers state no size, or the file's, for a single chunk.
        if any(foffs) or (any(csizes) and csizes != fsizes
                          and any(map(min, map(lt, csizes, fsizes), csizes))):
            for k in range(m):
                if foffs[k] != 0 or (csizes[k] and csizes[k] < fsizes[k]):
                    at = 0 if foffs[k] else csizes[k]
                    raise FormatError(f"chunks of {ix.path_of(owners[k])!r} leave a gap or "
                                      f"overlap at offset {at}")
        csizes = fsizes
        if owners_rising:
            by_file = range(m)  # files in blob order too
            file_owners = owners
        else:
            by_file = sorted(range(m), key=owners.__getitem__)
            file_owners = array("i", map(owners.__getitem__, by_file))
        # Scatter (in C: map over the arrays' __setitem__): entry -> position
        # of its chunk in file order (-1: none), and a count of 1.
        first = array("i", [-1]) * n
        count = array("i", bytes(4 * n))
        deque(map(first.__setitem__, file_owners, range(m)), maxlen=0)
        deque(map(count.__setitem__, file_owners, repeat(1)), maxlen=0)
    else:
        first = array("i", [-1]) * n
        count = array("i", bytes(4 * n))
        # File order: chunk ids grouped by file, by offset within the file.
        by_file = sorted(range(m), key=foffs.__getitem__)
        by_file.sort(key=owners.__getitem__)
        for p, k in enumerate(by_file):
            owner = owners[k]
            last = p + 1 == m or owners[by_file[p + 1]] != owner
            fsize = sizes[owner]
            start = foffs[k]
            if first[owner] < 0:
                first[owner] = p
                if start != 0:
                    raise FormatError(f"chunks of {ix.path_of(owner)!r} leave a gap or overlap at offset 0")
            count[owner] += 1
            nxt = fsize if last else foffs[by_file[p + 1]]
            # A size of 0 (or one past the file's end) means "up to the next chunk".
            if csizes[k] == 0 or start + csizes[k] > fsize:
                csizes[k] = max(0, nxt - start)
            # Chunks must tile the file without gaps or overlaps.
            if start + csizes[k] != nxt:
                at = start + csizes[k]
                raise FormatError(f"chunks of {ix.path_of(owner)!r} leave a gap or overlap at offset {at}")
            if last and nxt != fsize:
                raise FormatError(f"chunks of {ix.path_of(owner)!r} cover {nxt} of {fsize} bytes")
    if ix.format in Format.LAZY:
        _bound_chunks(ix, owners, foffs, csizes, offs, ends, inners)
    ix._first_chunk, ix._chunk_count = first, count
    ix._c_entry, ix._c_file_off, ix._c_size = owners, foffs, csizes
    ix._c_off, ix._c_end, ix._c_inner = offs, ends, inners
    ix._c_has_digest, ix._c_digests = has_digest, digests
    ix._file_chunk_ids = array("i", by_file)


def _bound_chunks(ix: LayerIndex, owners, foffs, csizes, offs, ends, inners) -> None:
    """Refuse chunks declaring more than ``MAX_CHUNK_BYTES``; cut each
    chunk's compressed extent (which runs to the next chunk, or the TOC) to
    what its bytes can take, so junk before the TOC or between chunks is
    never fetched for a read (``ends`` is changed in place)."""
    m = len(offs)
    want = list(map(add, inners, csizes)) if any(inners) else csizes
    if max(want) > MAX_CHUNK_BYTES:
        k = next(k for k in range(m) if want[k] > MAX_CHUNK_BYTES)
        raise FormatError(
            f"chunk of {ix.path_of(owners[k])!r} at file offset {foffs[k]} declares "
            f"{want[k]} bytes, more than the {MAX_CHUNK_BYTES >> 20} MiB a chunk may hold; refused")
    # only extents longer than the slack can be too long (C-speed filter)
    for k in compress(range(m), map(gt, map(sub, ends, offs), repeat(CHUNK_SLACK))):
        cap = offs[k] + max_compressed(want[k])
        if ends[k] > cap:
            ends[k] = cap
