"""View models for browsing an image: what the app (and any other front end)
shows about layers, entries and chunks, computed from the core's models.

Pure core: no Textual here. Everything that knows formats (chunks, prefetch
regions, TOC digests, whiteouts) lives here or below; the screens only render
what these functions return.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field
from itertools import compress

import anyio
import anyio.to_thread

from .cache import ChunkCache, chunk_key
from .errors import CoreError, DigestMismatchError, FormatError
from .estargz import LayerIndex, load_layer_index, read_file_range
from .estargz.toc import DIR, REG, Chunk, Entry
from .extract import extract
from .image import Image, LayerDescriptor
from .overlay import MergedTree
from .units import human_size

# Chunks whose cache state layer_chunk_states asks at a time.
STATES_SLICE = 1 << 15

# TOC digest states of a layer.
TOC_VERIFIED = "verified"
TOC_MISMATCH = "mismatch"
TOC_ABSENT = "absent"      # no toc.digest annotation: the TOC cannot be trusted
TOC_NONE = "-"             # the layer has no TOC at all (plain gzip/zstd/tar)

# Chunk states, in order of precedence when several share one map cell.
CHUNK_FAILED = "failed"
CHUNK_CACHED = "cached"
CHUNK_PREFETCH = "prefetch"
CHUNK_MISSING = "missing"
_PRECEDENCE = {CHUNK_FAILED: 3, CHUNK_CACHED: 2, CHUNK_PREFETCH: 1, CHUNK_MISSING: 0}

FORMAT_LABELS = {
    "estargz": "eStargz", "zstdchunked": "zstd:chunked", "stargz": "stargz",
    "gzip": "gzip", "zstd": "zstd", "tar": "tar",
}

# Change markers (dive-style) against the layers below.
ADDED, MODIFIED, REMOVED = "added", "modified", "removed"


def short_digest(d: str | None, n: int = 12) -> str:
    if not d:
        return "-"
    algo, _, hexd = d.partition(":")
    return f"{algo}:{hexd[:n]}" if hexd else d[:n]


def format_from_media_type(media_type: str) -> str:
    if media_type.endswith("+zstd"):
        return "zstd"
    if media_type.endswith("gzip"):
        return "gzip"
    return "tar"


# ---------------------------------------------------------------- layers
@dataclass
class LayerView:
    """One row of the image's layers table, plus the loaded index (if any)."""

    desc: LayerDescriptor
    index: LayerIndex | None = None
    format: str = "-"
    toc_state: str = TOC_NONE
    error: str | None = None
    cached_chunks: int = 0
    failed_chunks: set[int] = field(default_factory=set)
    verified: str | None = None  # None, "toc", "full"

    @property
    def entries(self) -> int | None:
        """Entries below the root (as ``inspect`` counts them)."""
        return len(self.index) - 1 if self.index is not None else None

    @property
    def chunks(self) -> int | None:
        return self.index.num_chunks if self.index is not None else None

    @property
    def prefetch_bytes(self) -> int | None:
        ix = self.index
        if ix is None:
            return None
        return ix.prefetch_end if ix.prefetch_end is not None else 0

    @property
    def cached_percent(self) -> float | None:
        if self.index is None or not self.index.num_chunks:
            return None
        return 100.0 * self.cached_chunks / self.index.num_chunks

    @property
    def format_label(self) -> str:
        return FORMAT_LABELS.get(self.format, self.format)


async def open_layer(image: Image, desc: LayerDescriptor, cache=None) -> LayerView:
    """Load a layer's TOC and classify it. Never raises for a bad layer: the
    problem is recorded in ``error`` (one sentence) so a table can show it."""
    view = LayerView(desc=desc)
    try:
        source = image.store.blob_source(desc.digest, desc.size)
        index = await load_layer_index(source)
        # the children index, off the app's event loop (its first paint lists them)
        await anyio.to_thread.run_sync(index.prepare)
    except FormatError as e:
        view.format = format_from_media_type(desc.media_type)
        view.error = str(e)
        return view
    except CoreError as e:
        view.error = str(e)
        return view
    view.index = index
    view.format = index.format
    ann = desc.toc_digest_annotation
    computed = index.toc_digest
    if not ann and desc.zstd_manifest_checksum:
        # zstd:chunked: the manifest checksum (of the compressed TOC) anchors it.
        ann, computed = desc.zstd_manifest_checksum, index.manifest_checksum
    if not ann:
        view.toc_state = TOC_ABSENT
    elif ann == computed:
        view.toc_state = TOC_VERIFIED
    else:
        view.toc_state = TOC_MISMATCH
        view.error = (f"the TOC digest {short_digest(computed)} does not match the "
                      f"annotation {short_digest(ann)}")
    if cache is not None:
        view.cached_chunks = await anyio.to_thread.run_sync(count_cached, index, cache)
    return view


def default_cache(memory_bytes: int | None = None, direct: bool = True) -> ChunkCache | None:
    """The chunk cache the mounts share (None when it cannot be opened);
    ``memory_bytes``/``direct``: the caller's ``core.options.Tuning``."""
    try:
        return ChunkCache(memory_bytes=memory_bytes, direct=direct)
    except OSError:
        return None


def _cache_key(index: LayerIndex, chunk: Chunk) -> str:
    return chunk_key(index.blob_digest, chunk)


def _cached_flags(index: LayerIndex, chunks, cache) -> list[bool]:
    """For each chunk: does the cache hold it (blocking: one look at the cache)?"""
    if cache is None:
        return [False] * len(chunks)
    return cache.cached([_cache_key(index, c) for c in chunks])


def cache_filler(index: LayerIndex, cache):
    """An ``on_chunk`` for :func:`read_text` and :func:`extract` that keeps
    each verified chunk with a digest in ``cache``, under the key the mounts
    use, so the chunk map shows what viewing or extracting fetched. Chunks
    without a digest are not kept: their keys belong to the mount that
    verified the TOC vouching for them (core.chunkstore.digestless_scope)."""
    if cache is None:
        return None

    def keep(chunk: Chunk, data: bytes) -> None:
        if chunk.digest:
            cache.put(_cache_key(index, chunk), bytes(data))

    return keep


def _cache_empty(cache) -> bool:
    """Does the cache hold no chunk at all? Then a layer's states need no
    per-chunk work: not even its cache keys."""
    return cache is None or cache.is_empty()


def count_cached(index: LayerIndex, cache) -> int:
    """How many of the layer's chunks the cache holds (blocking: disk lookups)."""
    if _cache_empty(cache):
        return 0
    return sum(cache.cached(_layer_keys(index)))


def _layer_keys(index: LayerIndex, start: int = 0, stop: int | None = None) -> list[str]:
    """The cache key of chunks ``start:stop`` of the layer, in blob order,
    from the index's digest columns (a :class:`Chunk` only for a chunk
    without a digest): what :func:`_cache_key` gives each, ~3x faster on a
    layer of a million chunks, which the app's screens look at every few
    seconds."""
    hexes = index.chunk_digest_hexes(start, stop)
    if None not in hexes:
        return list(map("sha256-".__add__, hexes))
    return [("sha256-" + h) if h is not None else _cache_key(index, index.chunk(i))
            for i, h in enumerate(hexes, start)]


def chunk_states(index: LayerIndex, chunks: list[Chunk], *, cache=None,
                 failed: set[int] | frozenset = frozenset()) -> list[str]:
    """The state of each chunk: failed verification, cached, in the prefetch
    region (not yet cached) or missing."""
    pf = index.prefetch_end
    out = []
    chunks = list(chunks)
    cached = _cached_flags(index, chunks, cache)
    for c, hit in zip(chunks, cached, strict=True):
        if c.index in failed:
            out.append(CHUNK_FAILED)
        elif hit:
            out.append(CHUNK_CACHED)
        elif pf is not None and c.offset < pf:
            out.append(CHUNK_PREFETCH)
        else:
            out.append(CHUNK_MISSING)
    return out


def layer_chunk_states(index: LayerIndex, *, cache=None,
                       failed: set[int] | frozenset = frozenset(),
                       pause: float = 0.0) -> list[str]:
    """:func:`chunk_states` of every chunk of the layer, in blob order (without
    a :class:`Chunk` each: the chunks are in blob order, so the prefetch
    region is the first ``prefetch_chunk_count`` of them). The cache is
    asked ``STATES_SLICE`` chunks at a time, sleeping ``pause`` seconds
    between slices: a worker thread beside an event loop (the app's) then
    leaves it the GIL often, rather than holding it for the whole layer
    (~0.3-0.8 s at a million chunks on this 2-core VM)."""
    n = index.num_chunks
    pf = min(n, index.prefetch_chunk_count)
    states = [CHUNK_PREFETCH] * pf + [CHUNK_MISSING] * (n - pf)
    if not _cache_empty(cache):  # (empty: not even the cache keys are needed)
        for lo in range(0, n, STATES_SLICE):
            if lo and pause:
                time.sleep(pause)
            hi = min(n, lo + STATES_SLICE)
            for i in compress(range(lo, hi), cache.cached(_layer_keys(index, lo, hi))):
                states[i] = CHUNK_CACHED
    for i in failed:
        if 0 <= i < n:
            states[i] = CHUNK_FAILED
    return states


def chunk_map(states: list[str], width: int) -> list[str]:
    """Bucket chunk states into ``width`` cells (or fewer for few chunks); each
    cell shows its most important state (failed > cached > prefetch > missing)."""
    n = len(states)
    if n == 0 or width <= 0:
        return []
    if n <= width:
        return list(states)
    cells = []
    for i in range(width):
        lo = i * n // width
        hi = max(lo + 1, (i + 1) * n // width)
        cells.append(max(states[lo:hi], key=_PRECEDENCE.__getitem__))
    return cells


def prefetch_progress(index: LayerIndex, states: list[str]) -> tuple[int, int]:
    """(cached, total) chunks of the prefetch region; ``states`` in blob order."""
    total = index.prefetch_chunk_count
    done = sum(1 for s in states[:total] if s == CHUNK_CACHED)
    return done, total


# ---------------------------------------------------------------- entries
TYPE_SYMBOLS = {"dir": "d", "reg": "-", "symlink": "l", "hardlink": "h",
                "char": "c", "block": "b", "fifo": "p"}


def mode_string(entry: Entry) -> str:
    m = entry.mode
    bits = stat.filemode(m & 0o7777)[1:]
    return TYPE_SYMBOLS.get(entry.type, "?") + bits


def entry_details(index: LayerIndex, entry: Entry) -> list[tuple[str, str]]:
    """Label/value pairs for an entry's detail pane."""
    import datetime

    rows = [("path", "/" + entry.path), ("type", entry.type), ("mode", mode_string(entry)),
            ("owner", f"{entry.uname or entry.uid}:{entry.gname or entry.gid}"
                      f" ({entry.uid}:{entry.gid})")]
    if entry.type in ("reg", "hardlink"):
        rows.append(("size", f"{human_size(entry.size)} ({entry.size} bytes)"))
    if entry.mtime:
        ts = datetime.datetime.fromtimestamp(entry.mtime, datetime.UTC)
        rows.append(("mtime", ts.strftime("%Y-%m-%d %H:%M:%S UTC")))
    if entry.link_name:
        rows.append(("link", entry.link_name))
    if entry.type in ("char", "block"):
        rows.append(("device", f"{entry.dev_major}:{entry.dev_minor}"))
    if entry.num_link > 1:
        rows.append(("links", str(entry.num_link)))
    if entry.digest:
        rows.append(("digest", entry.digest))
    for k, v in sorted(entry.xattrs.items()):
        try:
            text = v.decode()
        except UnicodeDecodeError:
            text = v.hex()
        rows.append((f"xattr {k}", text))
    if entry.is_whiteout:
        rows.append(("whiteout", f"hides {entry.whiteout_target} in lower layers"))
    if entry.is_opaque_marker:
        rows.append(("opaque", "hides everything lower layers have in this directory"))
    chunks = index.chunks(entry)
    if chunks:
        rows.append(("chunks", str(len(chunks))))
    return rows


@dataclass(frozen=True)
class Node:
    """A tree node: an entry of layer ``layer_no`` shown at ``path``."""

    path: str
    name: str
    layer_no: int
    entry_id: int
    is_dir: bool
    marker: str | None = None  # added / modified / removed


class LayerBrowser:
    """The tree model of one layer: raw (this layer's TOC) or merged (the
    image as it looks with this layer on top), with dive-style markers."""

    def __init__(self, indexes: list[LayerIndex | None], n: int):
        self.indexes = indexes
        self.n = n
        self.index = indexes[n]
        lower = [ix for ix in indexes[:n] if ix is not None]
        self._all_loaded = len(lower) == n
        # Everything is computed per directory on demand: opening a layer of
        # 100k entries costs nothing up front.
        self._lower = MergedTree(lower)
        self._merged = MergedTree(lower + [self.index]) if self._all_loaded else None

    @property
    def can_merge(self) -> bool:
        return self._merged is not None

    def marker(self, path: str, entry: Entry) -> str | None:
        """added / modified against the layers below (None for markers)."""
        if entry.is_opaque_marker:
            return None
        if entry.is_whiteout:
            return REMOVED
        if self.n == 0:
            return ADDED
        return MODIFIED if self._lower.lookup(path) is not None else ADDED

    def _whiteouts(self, path: str) -> list[str]:
        """Names this layer removes from the layers below at ``path``: its
        whiteouts, and with an opaque marker everything they had there."""
        d = self.index.lookup(path) if path else self.index.root
        if d is None or d.type_code != DIR:
            return []
        kids = self.index.children(d)
        names = [e.whiteout_target for e in kids if e.is_whiteout]
        if any(e.is_opaque_marker for e in kids):
            names += [name for name, _li, _e in self._lower.children(path)]
        return list(dict.fromkeys(names))

    def children(self, path: str, *, merged: bool = False) -> list[Node]:
        if merged and self._merged is not None:
            out = []
            for name, li, e in self._merged.children(path):
                p = f"{path}/{name}" if path else name
                mk = self.marker(p, e) if li == self.n else None
                out.append(Node(p, name, li, e.id, e.type_code == DIR, mk))
            # dive shows what this layer removes, struck through, where it was
            names = {nd.name for nd in out}
            removed = [nm for nm in self._whiteouts(path) if nm not in names]
            for name in removed:
                p = f"{path}/{name}" if path else name
                hit = self._lower.lookup(p)
                if hit is not None:
                    li, e = hit
                    out.append(Node(p, name, li, e.id, e.type_code == DIR, REMOVED))
            if removed:
                out.sort(key=lambda nd: nd.name)
            return out
        ix = self.index
        d = ix.lookup(path) if path else ix.root
        if d is None or d.type_code != DIR:
            return []
        out = []
        for e in ix.children(d):
            p = f"{path}/{e.name}" if path else e.name
            out.append(Node(p, e.name, self.n, e.id, e.type_code == DIR, self.marker(p, e)))
        return out

    def entry(self, node: Node) -> Entry:
        ix = self.indexes[node.layer_no]
        return ix.entry(node.entry_id)

    def search(self, text: str = "", *, types: set[str] | None = None,
               min_size: int = 0, limit: int = 5000) -> list[str]:
        """Paths of raw entries whose name contains ``text`` (case-insensitive)
        and match the type and size filters; at most ``limit``."""
        ix = self.index
        needle = text.lower()
        out = []
        names, tcodes, sizes = ix.scan_columns()
        from .estargz.toc import TYPES

        want = {TYPES.index(t) for t in types} if types else None
        for i in range(1, len(names)):
            if needle and needle not in names[i].lower():
                continue
            if want is not None and tcodes[i] not in want:
                continue
            if min_size and sizes[i] < min_size:
                continue
            out.append(ix.path_of(i))
            if len(out) >= limit:
                break
        return out

    def wasted(self) -> tuple[int, list[tuple[str, int]]]:
        """Bytes of this layer's regular files that upper layers replace or
        remove (they are still downloaded), with the paths, biggest first."""
        uppers = self.indexes[self.n:]
        if any(ix is None for ix in uppers) or not self._all_loaded or len(uppers) <= 1:
            return 0, []
        lower = self.indexes[: self.n]
        top = MergedTree(list(lower) + list(uppers))
        ix = self.index
        items = []
        for e in ix.iter_entries():
            if e.type_code != REG or e.size == 0:
                continue
            hit = top.lookup(e.path)
            if hit is None or hit[0] != self.n:
                items.append((e.path, e.size))
        items.sort(key=lambda t: (-t[1], t[0]))
        return sum(s for _, s in items), items


def ancestors_of(paths: list[str]) -> set[str]:
    """Every directory path on the way to ``paths`` (for a filtered tree)."""
    out: set[str] = {""}
    for p in paths:
        parts = p.split("/")
        for k in range(1, len(parts)):
            out.add("/".join(parts[:k]))
    return out


# ---------------------------------------------------------------- actions
# extract (the app's ``x``) lives in core.extract and is re-exported here.
TEXT_VIEW_LIMIT = 256 << 10


async def read_text(index: LayerIndex, source, entry: Entry,
                    limit: int = TEXT_VIEW_LIMIT, *, on_chunk=None) -> tuple[str, bool]:
    """The start of a regular file as text (fetching only the chunks needed)
    and whether it was cut at ``limit``. Raises FormatError for binary data.
    ``on_chunk``: see :func:`cache_filler`."""
    target = index.entry(entry.target_id) if entry.target_id is not None else entry
    if target.type_code != REG:
        raise FormatError(f"/{entry.path} is a {entry.type}, not a regular file")
    data = await read_file_range(index, source, target, 0, min(limit, target.size),
                                 on_chunk=on_chunk)
    if b"\0" in data[:8192]:
        raise FormatError(f"/{entry.path} looks binary; extract it instead")
    return data.decode("utf-8", errors="replace"), target.size > limit


__all__ = [
    "ADDED", "CHUNK_CACHED", "CHUNK_FAILED", "CHUNK_MISSING", "CHUNK_PREFETCH",
    "DigestMismatchError", "LayerBrowser", "LayerView", "MODIFIED", "Node", "REMOVED",
    "TOC_ABSENT", "TOC_MISMATCH", "TOC_NONE", "TOC_VERIFIED", "ancestors_of", "chunk_map",
    "cache_filler", "chunk_states", "count_cached", "default_cache", "entry_details", "extract",
    "human_size", "layer_chunk_states", "mode_string", "open_layer", "prefetch_progress",
    "read_text", "short_digest",
]
