"""tar (or tar.gz / tar.zst) to eStargz (gzip), the way stargz-snapshotter's
``estargz.Build`` lays a blob out:

* entries are re-emitted as tar headers (PAX where needed) in the input's
  order, except that prioritised files (and their parent directories and
  hardlink targets) move to the front in the given order, followed by a
  ``.prefetch.landmark`` file; with no prioritised files a
  ``.no.prefetch.landmark`` comes first;
* every chunk of a regular file (``chunk_size`` bytes, the last one shorter)
  starts a new gzip member, so each TOC ``offset`` is a member boundary; tar
  headers and padding ride in the member that is open when they are written;
* the TOC (``stargz.index.json`` in a tar, JSON indented with tabs as Go's
  ``MarshalIndent`` does) is the last gzip member, then the 51-byte footer.

Everything streams: the input is read in pieces (a compressed input is first
inflated into a temporary file so entries can be reordered), the output is
written as it is produced. CPU-bound and blocking: call it from a worker
thread in async code (``core.convert`` does).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from isal import isal_zlib

from ..errors import FormatError, NotFoundError
from .footer import estargz_footer
from .tarwrite import (
    TAR_TYPES,
    buffered_output,
    cancel_check,
    open_tar_input,
    reader_at,
    require_utf8,
    toc_entry,
)
from .toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME

DEFAULT_CHUNK_SIZE = 4 << 20
# isal offers levels 0..3; 3 is its best ratio and still several times faster
# than zlib's level 9 (which upstream uses).
DEFAULT_LEVEL = 3
LANDMARK_CONTENTS = b"\x0f"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
_IO_PIECE = 1 << 20


@dataclass
class WriteResult:
    """What the writer produced (``annotations()`` gives the layer's two)."""

    blob_digest: str
    blob_size: int
    diff_id: str
    toc_digest: str
    uncompressed_size: int
    toc_offset: int
    entries: int
    chunks: int
    missed_prioritized: list[str] = field(default_factory=list)

    def annotations(self) -> dict[str, str]:
        return {
            TOC_DIGEST_ANNOTATION: self.toc_digest,
            UNCOMPRESSED_SIZE_ANNOTATION: str(self.uncompressed_size),
        }


def clean_entry_name(name: str) -> str:
    """Go's ``cleanEntryName``: ``path.Clean("/"+name)`` without the leading ``/``."""
    return posixpath.normpath("/" + name).lstrip("/")


# ---------------------------------------------------------------- input
def _scan(f) -> list[tarfile.TarInfo]:
    """Every member of the input tar, later duplicates replacing earlier ones
    (moved to the end, as upstream's importTar does); landmarks and an
    existing TOC are dropped."""
    members: dict[str, tarfile.TarInfo] = {}
    try:
        tf = tarfile.open(fileobj=f, mode="r:", encoding="utf-8", errors="surrogateescape")
        while True:
            ti = tf.next()
            if ti is None:
                break
            name = clean_entry_name(ti.name)
            if name in (PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME):
                continue
            if ti.issparse():
                raise FormatError(f"sparse tar member {ti.name!r} is not supported")
            members.pop(name, None)
            members[name] = ti
            tf.members = []  # don't let tarfile keep a second list
    except tarfile.TarError as e:
        raise FormatError(f"input is not a valid tar: {e}") from None
    return list(members.values())


class _Landmark(tarfile.TarInfo):
    """The landmark file the writer adds (its one byte is not in the input)."""


def _sort_entries(members: list[tarfile.TarInfo], prioritized: list[str],
                  missed: list[str] | None) -> list[tarfile.TarInfo]:
    """Upstream's sortEntries: prioritised files first (with their parents and
    hardlink targets), then the landmark, then everything else."""
    rest: dict[str, tarfile.TarInfo] = {clean_entry_name(m.name): m for m in members}
    out: dict[str, tarfile.TarInfo] = {}

    def move(name: str, depth: int = 0) -> None:
        if depth > 4096:
            raise FormatError(f"prioritised file {name!r}: link or path chain too deep")
        name = clean_entry_name(name)
        if name == "":
            if "" in rest:
                out[""] = rest.pop("")
            return
        if name not in rest and name not in out:
            raise NotFoundError(f"prioritised file {name!r} is not in the layer")
        move(posixpath.dirname(name), depth + 1)
        m = rest.get(name)
        if m is not None and m.type == tarfile.LNKTYPE:
            move(m.linkname, depth + 1)
        m = rest.pop(name, None)
        if m is not None:
            out[name] = m

    for p in prioritized:
        try:
            move(p)
        except NotFoundError:
            if missed is None:
                raise
            missed.append(p)
    landmark = _Landmark(PREFETCH_LANDMARK if prioritized else NO_PREFETCH_LANDMARK)
    landmark.size = len(LANDMARK_CONTENTS)
    landmark.mode = 0
    landmark.mtime = 0
    return list(out.values()) + [landmark] + list(rest.values())


# ---------------------------------------------------------------- output
class _Output:
    """Counts and hashes the compressed bytes; manages the open gzip member;
    hashes and counts the uncompressed stream (diffID)."""

    def __init__(self, dst, level: int):
        self.dst = dst
        self.level = level
        self.n = 0
        self.blob_hash = hashlib.sha256()
        self.diff_hash = hashlib.sha256()
        self.usize = 0
        self.gz = None

    def _emit(self, data: bytes) -> None:
        if data:
            self.dst.write(data)
            self.blob_hash.update(data)
            self.n += len(data)

    def open_gz(self) -> None:
        if self.gz is None:
            self.gz = isal_zlib.compressobj(self.level, isal_zlib.DEFLATED, 31)

    def close_gz(self) -> None:
        if self.gz is not None:
            self._emit(self.gz.flush())
            self.gz = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.diff_hash.update(data)
        self.usize += len(data)
        self.open_gz()
        self._emit(self.gz.compress(data))

    def raw(self, data: bytes) -> None:
        """Bytes written as they are (the footer: an empty gzip member)."""
        self._emit(data)


def _header(ti: tarfile.TarInfo) -> bytes:
    try:
        return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    except (ValueError, tarfile.TarError) as e:
        raise FormatError(f"cannot write a tar header for {ti.name!r}: {e}") from None


def build_estargz(src, dst, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  prioritized_files: list[str] | tuple[str, ...] = (),
                  allow_missing_prioritized: bool = True, level: int = DEFAULT_LEVEL,
                  progress: Callable[[int, int], None] | None = None,
                  cancel: threading.Event | None = None,
                  tmpdir: str | None = None) -> WriteResult:
    """Write an eStargz blob for the tar in ``src`` (a path or a binary file;
    plain, gzip or zstd) to ``dst`` (a path or a writable binary file).

    ``progress(done, total)`` is called with uncompressed input bytes;
    setting ``cancel`` stops the writer (:class:`ConversionCancelled`).
    ``missed_prioritized`` in the result lists prioritised paths the layer
    does not hold (an error instead when ``allow_missing_prioritized`` is
    False)."""
    if chunk_size <= 0:
        raise FormatError(f"chunk size must be positive, not {chunk_size}")
    if not 0 <= level <= 3:
        raise FormatError("compression level must be 0..3 (isal)")

    check = cancel_check(cancel)
    f, cleanup = open_tar_input(src, tmpdir, check)
    try:
        members = _scan(f)
        missed: list[str] = []
        ordered = _sort_entries(members, list(prioritized_files),
                                missed if allow_missing_prioritized else None)
        with buffered_output(dst) as out:
            result = _write(f, out, ordered, chunk_size, level, check, progress)
        result.missed_prioritized = missed
        return result
    finally:
        cleanup()


def _write(f, dst, ordered, chunk_size, level, check, progress) -> WriteResult:
    out = _Output(dst, level)
    toc_entries: list[dict] = []
    last_uname: dict[int, str] = {}
    last_gname: dict[int, str] = {}
    total_in = sum(m.size for m in ordered if m.isreg()) or 1
    done_in = 0
    nchunks = 0
    read_at = reader_at(f)

    def name_if_changed(mp: dict, id: int, name: str) -> str:
        if not name or mp.get(id) == name:
            return ""
        mp[id] = name
        return name

    for ti in ordered:
        check()
        typ = TAR_TYPES.get(ti.type)
        if typ is None:
            raise FormatError(f"unsupported tar entry type {ti.type!r} for {ti.name!r}")
        require_utf8(ti)
        landmark = isinstance(ti, _Landmark)
        ent = toc_entry(ti, typ)
        if typ == "dir" and not ti.name.endswith("/"):
            ent["name"] += "/"  # upstream names directories with a trailing slash
        # user and group names only where they change for an id (upstream's
        # TOC does the same to stay small)
        u = name_if_changed(last_uname, ti.uid, ti.uname)
        if u:
            ent["userName"] = u
        g = name_if_changed(last_gname, ti.gid, ti.gname)
        if g:
            ent["groupName"] = g
        out.open_gz()
        out.write(_header(ti))
        if typ != "reg":
            toc_entries.append(ent)
            continue
        file_hash = hashlib.sha256()
        written = 0
        first = ent
        while written < ti.size:
            out.close_gz()
            n = min(chunk_size, ti.size - written)
            if n == chunk_size:
                ent["chunkSize"] = n
            ent["offset"] = out.n
            if written:
                ent["chunkOffset"] = written
            out.open_gz()
            chunk_hash = hashlib.sha256()
            pos = 0
            while pos < n:
                check()
                k = min(_IO_PIECE, n - pos)
                data = LANDMARK_CONTENTS if landmark else read_at(ti.offset_data + written + pos, k)
                chunk_hash.update(data)
                file_hash.update(data)
                out.write(data)
                pos += k
                done_in += k
            ent["chunkDigest"] = "sha256:" + chunk_hash.hexdigest()
            # Go's json puts chunkDigest after digest/chunkOffset/chunkSize;
            # keep upstream's key order for readers that diff TOCs.
            toc_entries.append(ent)
            nchunks += 1
            written += n
            ent = {"name": ti.name, "type": "chunk"}
            if progress is not None:
                progress(min(done_in, total_in), total_in)
        first["digest"] = "sha256:" + file_hash.hexdigest()
        if not ti.size:
            toc_entries.append(first)
        pad = -ti.size % 512
        if pad:
            out.write(b"\0" * pad)
    out.close_gz()
    toc_offset = out.n
    toc = {"version": 1, "entries": [_ordered(e) for e in toc_entries]}
    toc_json = json.dumps(toc, indent="\t", ensure_ascii=False).encode("utf-8", "surrogateescape")
    toc_digest = "sha256:" + hashlib.sha256(toc_json).hexdigest()
    hdr = tarfile.TarInfo(TOC_TAR_NAME)
    hdr.size = len(toc_json)
    hdr.mode = 0
    hdr.mtime = 0
    out.open_gz()
    out.write(hdr.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
    out.write(toc_json)
    out.write(b"\0" * (-len(toc_json) % 512) + b"\0" * 1024)
    out.close_gz()
    out.raw(estargz_footer(toc_offset))
    if progress is not None:
        progress(total_in, total_in)
    return WriteResult(
        blob_digest="sha256:" + out.blob_hash.hexdigest(), blob_size=out.n,
        diff_id="sha256:" + out.diff_hash.hexdigest(), toc_digest=toc_digest,
        uncompressed_size=out.usize, toc_offset=toc_offset,
        entries=len(ordered), chunks=nchunks,
    )


_KEY_ORDER = ("name", "type", "size", "modtime", "linkName", "mode", "uid", "gid", "userName",
              "groupName", "offset", "devMajor", "devMinor", "xattrs", "digest", "chunkOffset",
              "chunkSize", "chunkDigest")


def _ordered(e: dict) -> dict:
    """Keys in the order of upstream's TOCEntry struct."""
    return {k: e[k] for k in _KEY_ORDER if k in e}
