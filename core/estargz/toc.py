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
import posixpath
import sys
from array import array
from collections.abc import Iterator
from datetime import datetime
from typing import NamedTuple

from ..errors import FormatError

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
MAX_ENTRIES = 5_000_000
MAX_PATH_DEPTH = 1024
MAX_NAME_BYTES = 4096


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
        return self._extra("userName", "")

    @property
    def gname(self) -> str:
        return self._extra("groupName", "")

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
    """Column-stored index of one layer's TOC (see docs/CONTRACTS.md)."""

    def __init__(self, *, format: str, blob_digest: str, blob_size: int, toc_digest: str,
                 toc_offset: int):
        self.format = format
        self.blob_digest = blob_digest
        self.blob_size = blob_size
        self.toc_digest = toc_digest
        self.toc_offset = toc_offset
        self.prefetch_end: int | None = None
        self.no_prefetch = False
        self.toc_size = 0  # compressed bytes of the TOC region
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
        # File digests (sha256) as a column: 32 bytes per entry, flag per entry;
        # other digest forms stay in _extras.
        self._f_digests = bytearray()
        self._f_has_digest = bytearray()
        self._nlinks: dict[int, int] = {}
        # Children: ids ordered by (parent, name); per-entry start and count.
        self._child_ids = array("i")
        self._child_start = array("i")
        self._child_count = array("i")
        # Per-chunk columns, ordered by blob offset.
        self._c_entry = array("i")
        self._c_file_off = array("q")
        self._c_size = array("q")
        self._c_off = array("q")
        self._c_end = array("q")
        self._c_inner = array("q")
        self._c_digests = bytearray()  # 32 bytes each; all-zero means none
        self._c_has_digest = bytearray()
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

    def children(self, entry: Entry) -> list[Entry]:
        s, n = self._child_start[entry.id], self._child_count[entry.id]
        return [Entry(self, i) for i in self._child_ids[s : s + n]]

    def child_ids(self, id: int) -> array:
        s = self._child_start[id]
        return self._child_ids[s : s + self._child_count[id]]

    def child(self, entry: Entry | int, name: str) -> Entry | None:
        id = entry if isinstance(entry, int) else entry.id
        s, n = self._child_start[id], self._child_count[id]
        ids, names = self._child_ids, self._names
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
        if self._c_has_digest[index]:
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
                    self._mtimes, self._first_chunk, self._chunk_count, self._child_ids,
                    self._child_start, self._child_count, self._c_entry, self._c_file_off,
                    self._c_size, self._c_off, self._c_end, self._c_inner, self._c_digests,
                    self._c_has_digest, self._file_chunk_ids, self._f_digests,
                    self._f_has_digest):
            total += sys.getsizeof(col)
        total += sys.getsizeof(self._extras) + sum(
            sys.getsizeof(v) + sum(sys.getsizeof(x) for x in v.values()) for v in self._extras.values()
        )
        return total


_XATTR_LIMIT = 64 * 1024
_ZERO32 = bytes(32)


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
            return bytes.fromhex(d[7:])
        except ValueError:
            return None
    return None


def build_index(toc_json: bytes | dict, *, format: str, blob_digest: str, blob_size: int,
                toc_digest: str, toc_offset: int) -> LayerIndex:
    """Parse TOC JSON bytes into a :class:`LayerIndex`. CPU-heavy: run it in a
    worker thread from async code. Raises :class:`FormatError` on a TOC that
    is not valid or makes claims outside the blob."""
    # Every entry is one JSON object (two with xattrs): far more braces than
    # that is a TOC built to exhaust memory in the parser; refuse it unparsed.
    if not isinstance(toc_json, dict) and toc_json.count(b"{") > 2 * MAX_ENTRIES + 16:
        raise FormatError(f"TOC holds more objects than {MAX_ENTRIES} entries could; refused")
    if isinstance(toc_json, dict):
        doc = toc_json  # already parsed (plain layers index their tar this way)
    else:
        try:
            doc = json.loads(toc_json)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise FormatError(f"TOC is not valid JSON: {str(e)[:120]}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise FormatError("TOC has no 'entries' list")
    raw_entries = doc["entries"]
    if len(raw_entries) > MAX_ENTRIES:
        raise FormatError(f"TOC has {len(raw_entries)} entries; the limit is {MAX_ENTRIES}")
    ix = LayerIndex(format=format, blob_digest=blob_digest, blob_size=blob_size,
                    toc_digest=toc_digest, toc_offset=toc_offset)
    warnings = ix.warnings
    names = ix._names
    types, parents, sizes, modes = ix._types, ix._parents, ix._sizes, ix._modes
    uids, gids, mtimes, extras = ix._uids, ix._gids, ix._mtimes, ix._extras
    f_digests, f_has_digest = ix._f_digests, ix._f_has_digest
    by_path: dict[str, int] = {"": 0}
    # Share equal names (``__init__.py``, ``LICENSE``...) through a local table
    # rather than sys.intern, whose global dict would keep ~40 bytes per
    # unique name alive after the build.
    _shared: dict[str, str] = {}

    def intern(name: str) -> str:
        return _shared.setdefault(name, name)

    def add(path: str, type_code: int, parent: int) -> int:
        id = len(names)
        names.append(intern(posixpath.basename(path)) if id else "")
        types.append(type_code)
        parents.append(parent)
        sizes.append(0)
        modes.append(0o755 if type_code == DIR else 0o644)
        uids.append(0)
        gids.append(0)
        mtimes.append(0.0)
        f_digests.extend(_ZERO32)
        f_has_digest.append(0)
        by_path[path] = id
        return id

    add("", DIR, 0)

    def ensure_dir(path: str) -> int:
        # Iterative, not recursive: a 1000-deep implicit path must not hit
        # Python's recursion limit.
        missing = []
        id = by_path.get(path)
        while id is None:
            missing.append(path)
            path = posixpath.dirname(path) if "/" in path else ""
            id = by_path.get(path)
        if types[id] != DIR:
            raise FormatError(f"TOC entry {path!r} is used as a directory but is a {TYPES[types[id]]}")
        for p in reversed(missing):
            id = add(p, DIR, id)
        return id

    # Raw chunk records: (entry_id, file_off, size, offset, end_hint, inner, digest-bytes|None)
    raw_chunks: list[tuple] = []
    hardlinks: list[tuple[int, str]] = []
    last_reg: dict[str, int] = {}
    landmark_offsets: dict[str, int] = {}
    for raw in raw_entries:
        if not isinstance(raw, dict):
            raise FormatError("TOC entry is not an object")
        name_raw = raw.get("name")
        if not isinstance(name_raw, str):
            raise FormatError("TOC entry has no name")
        if len(name_raw.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise FormatError(f"TOC entry name longer than {MAX_NAME_BYTES} bytes")
        path = _norm_name(name_raw)
        typ = raw.get("type")
        if typ == "chunk":
            owner = last_reg.get(path)
            if owner is None:
                raise FormatError(f"TOC chunk entry for {path!r} has no preceding regular file")
            raw_chunks.append(_chunk_record(owner, raw, path, blob_size))
            continue
        if path in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK):
            landmark_offsets[path] = _int(raw.get("offset"), "offset", path, 0, blob_size)
            continue
        code = _TYPE_CODE.get(typ)
        if code is None:
            raise FormatError(f"TOC entry {path!r} has unknown type {typ!r}")
        if path == "":
            if code != DIR:
                raise FormatError("TOC root entry is not a directory")
            id = 0
        else:
            parent = ensure_dir(posixpath.dirname(path)) if "/" in path else 0
            id = by_path.get(path)
            if id is not None:
                # Duplicate entry: the later one wins, as tar extraction would.
                if code == DIR and types[id] == DIR:
                    pass
                else:
                    if types[id] == DIR and code != DIR:
                        raise FormatError(f"TOC entry {path!r} appears both as a directory and a {typ}")
                    warnings.append(f"{path}: duplicate entry; the later one is used")
                    types[id] = code
                    extras.pop(id, None)
                    f_has_digest[id] = 0
                    last_reg.pop(path, None)
                    raw_chunks = [c for c in raw_chunks if c[0] != id]
            else:
                id = add(path, code, parent)
        sizes[id] = _int(raw.get("size"), "size", path)
        mode = raw.get("mode")
        if mode is not None:
            modes[id] = _int(mode, "mode", path, 0, 0xFFFFFFFF) & 0o7777
        uids[id] = _int(raw.get("uid"), "uid", path, 0, 0xFFFFFFFF)
        gids[id] = _int(raw.get("gid"), "gid", path, 0, 0xFFFFFFFF)
        mtimes[id] = _parse_time(raw.get("modtime"))
        ex = {}
        for key in ("userName", "groupName"):
            v = raw.get(key)
            if isinstance(v, str) and v:
                ex[key] = intern(v)
        if code in (SYMLINK, HARDLINK):
            ln = raw.get("linkName")
            if not isinstance(ln, str) or not ln:
                raise FormatError(f"TOC {typ} {path!r} has no linkName")
            if "\x00" in ln:
                raise FormatError(f"TOC {typ} {path!r} has a NUL byte in its linkName")
            ex["linkName"] = ln
            if code == HARDLINK:
                hardlinks.append((id, ln))
        if code in (CHAR, BLOCK):
            ex["devMajor"] = _int(raw.get("devMajor"), "devMajor", path, 0, 0xFFFFFFFF)
            ex["devMinor"] = _int(raw.get("devMinor"), "devMinor", path, 0, 0xFFFFFFFF)
        xa = raw.get("xattrs")
        if xa:
            decoded = _decode_xattrs(xa, path, warnings)
            if decoded:
                ex["xattrs"] = decoded
        if code == REG:
            d = raw.get("digest")
            if isinstance(d, str) and d:
                db = _digest_bytes(d)
                if db is not None:
                    f_digests[id * 32 : id * 32 + 32] = db
                    f_has_digest[id] = 1
                else:
                    ex["digest"] = d
            last_reg[path] = id
            if sizes[id] > 0:
                raw_chunks.append(_chunk_record(id, raw, path, blob_size))
        if ex:
            extras[id] = ex
    ix.no_prefetch = NO_PREFETCH_LANDMARK in landmark_offsets
    if PREFETCH_LANDMARK in landmark_offsets:
        ix.prefetch_end = landmark_offsets[PREFETCH_LANDMARK]
    _resolve_hardlinks(ix, hardlinks, by_path)
    _build_children(ix)
    _build_chunks(ix, raw_chunks, toc_offset)
    _compact(ix)
    return ix


def _compact(ix: LayerIndex) -> None:
    """Drop the growth slack of the columns (arrays over-allocate ~12%)."""
    for name, value in list(vars(ix).items()):
        if isinstance(value, array):
            setattr(ix, name, array(value.typecode, value))
        elif isinstance(value, bytearray):
            setattr(ix, name, bytearray(value))
    ix._names = list(ix._names)


def _chunk_record(owner: int, raw: dict, path: str, blob_size: int) -> tuple:
    off = _int(raw.get("offset"), "offset", path, 0, blob_size)
    end_hint = raw.get("endOffset")
    end_hint = _int(end_hint, "endOffset", path, 0, blob_size) if end_hint is not None else None
    return (
        owner,
        _int(raw.get("chunkOffset"), "chunkOffset", path),
        _int(raw.get("chunkSize"), "chunkSize", path),
        off,
        end_hint,
        _int(raw.get("innerOffset"), "innerOffset", path),
        _digest_bytes(raw.get("chunkDigest")),
    )


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
            raise FormatError(f"hardlink {ix.path_of(id)!r} points to a missing entry {link!r}")
        if ix._types[tid] == DIR:
            raise FormatError(f"hardlink {ix.path_of(id)!r} points to a directory")
        ix._extras.setdefault(id, {})["target"] = tid
        ix._nlinks[tid] = ix._nlinks.get(tid, 1) + 1
        # A hardlink is its target's inode: same size, mode, owner and time.
        for col in (ix._sizes, ix._modes, ix._uids, ix._gids, ix._mtimes):
            col[id] = col[tid]


def _build_children(ix: LayerIndex) -> None:
    n = len(ix._names)
    names, parents = ix._names, ix._parents
    order = sorted(range(1, n), key=lambda i: (parents[i], names[i]))
    ix._child_ids = array("i", order)
    ix._child_start = array("i", bytes(4 * n))
    ix._child_count = array("i", bytes(4 * n))
    for pos, i in enumerate(order):
        p = parents[i]
        if ix._child_count[p] == 0:
            ix._child_start[p] = pos
        ix._child_count[p] += 1


def _build_chunks(ix: LayerIndex, raw_chunks: list[tuple], toc_offset: int) -> None:
    n = len(ix._names)
    ix._first_chunk = array("i", [-1]) * n
    ix._chunk_count = array("i", bytes(4 * n))
    if not raw_chunks:
        return
    by_offset = sorted(range(len(raw_chunks)), key=lambda i: (raw_chunks[i][3], raw_chunks[i][5]))
    distinct = sorted({c[3] for c in raw_chunks})
    pos_of = [0] * len(raw_chunks)
    for new, old in enumerate(by_offset):
        owner, foff, size, off, end_hint, inner, dig = raw_chunks[old]
        pos_of[old] = new
        if off >= toc_offset:
            raise FormatError(f"chunk of {ix.path_of(owner)!r} starts at {off}, inside the TOC region")
        if end_hint is not None and end_hint > off:
            end = min(end_hint, toc_offset)
        else:
            # The compressed extent runs to the next chunk that starts later.
            j = bisect.bisect_right(distinct, off)
            end = distinct[j] if j < len(distinct) else toc_offset
        ix._c_entry.append(owner)
        ix._c_file_off.append(foff)
        ix._c_size.append(size)
        ix._c_off.append(off)
        ix._c_end.append(end)
        ix._c_inner.append(inner)
        ix._c_has_digest.append(1 if dig else 0)
        ix._c_digests += dig or bytes(32)
    # Group chunks by file, in file order, and fill implicit sizes.
    per_file: dict[int, list[int]] = {}
    for old, c in enumerate(raw_chunks):
        per_file.setdefault(c[0], []).append(pos_of[old])
    fids = array("i")
    for owner, cids in per_file.items():
        cids.sort(key=lambda c: ix._c_file_off[c])
        fsize = ix._sizes[owner]
        for k, c in enumerate(cids):
            start = ix._c_file_off[c]
            nxt = ix._c_file_off[cids[k + 1]] if k + 1 < len(cids) else fsize
            if ix._c_size[c] == 0 or start + ix._c_size[c] > fsize:
                ix._c_size[c] = max(0, nxt - start)
            if start + ix._c_size[c] > fsize:
                raise FormatError(f"chunk of {ix.path_of(owner)!r} runs past the file's size")
        # Chunks must tile the file without gaps or overlaps.
        pos = 0
        for c in cids:
            if ix._c_file_off[c] != pos:
                raise FormatError(
                    f"chunks of {ix.path_of(owner)!r} leave a gap or overlap at offset {pos}"
                )
            pos += ix._c_size[c]
        if pos != fsize:
            raise FormatError(f"chunks of {ix.path_of(owner)!r} cover {pos} of {fsize} bytes")
        ix._first_chunk[owner] = len(fids)
        ix._chunk_count[owner] = len(cids)
        fids.extend(cids)
    ix._file_chunk_ids = fids
