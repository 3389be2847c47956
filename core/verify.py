"""Verification of an image's layers: TOC digests, chunk and file digests,
blob digests, diffIDs against the config, chain IDs.

Every function is async, reports progress through an optional callback and
can be cancelled (anyio cancel scopes; blocking work runs in worker threads in
small pieces). A failed check is a :class:`Check` with ``ok=False`` in the
result, never an exception; :class:`~core.errors.CoreError` is raised only
when verification cannot even start (the image cannot be opened).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import anyio.to_thread

from .errors import ChunkDigestError, CoreError, FormatError
from .estargz import load_layer_index, read_footer
from .estargz.chunks import decode_chunk
from .estargz.footer import Format
from .estargz.plain import Inflater, stream_blob
from .estargz.toc import REG, LayerIndex
from .estargz.zstdchunked import iter_tar_split, read_tar_split
from .image import Image, LayerDescriptor

# Lines of chunk/file failures reported per layer before summarising.
MAX_FAILURE_LINES = 20


@dataclass
class Check:
    """One verification: ``name`` (``toc-digest``, ``manifest-checksum``,
    ``chunk``, ``chunks``, ``file``, ``files``, ``blob-digest``, ``diff-id``,
    ``uncompressed-size``, ``chain-id``, ``config``, ``layer``), whether it
    held, and a one-line message. ``skipped`` checks hold (``ok``) but could
    not be carried out (e.g. no annotation to compare with)."""

    name: str
    ok: bool
    message: str
    layer: int | None = None
    skipped: bool = False

    def line(self) -> str:
        where = f"layer {self.layer}: " if self.layer is not None else ""
        return f"{where}{self.name}: {self.message}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VerifyProgress:
    """Where a verification is: ``stage`` is ``toc`` or ``blob``; ``done`` and
    ``total`` count bytes of layer ``layer``'s blob."""

    layer: int
    stage: str
    done: int
    total: int


ProgressFn = Callable[[VerifyProgress], None]


@dataclass
class LayerVerification:
    """The checks of one layer and what was computed on the way."""

    layer: int
    format: str
    checks: list[Check] = field(default_factory=list)
    toc_digest: str | None = None
    diff_id: str | None = None
    blob_digest: str | None = None
    uncompressed_size: int | None = None
    # Layer-wide indexes (Chunk.index) of the chunks that failed, for chunk maps.
    failed_chunks: set[int] = field(default_factory=set)
    chunks_checked: int = 0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and not c.skipped]


@dataclass
class VerifyResult:
    checks: list[Check] = field(default_factory=list)
    full: bool = False
    layers: list[LayerVerification] = field(default_factory=list)
    # What was computed (for display): layer index -> values.
    diff_ids: dict[int, str] = field(default_factory=dict)
    toc_digests: dict[int, str] = field(default_factory=dict)
    chain_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        return {
            "ok": self.ok, "full": self.full,
            "checks": [c.to_dict() for c in self.checks],
            "diffIDs": {str(k): v for k, v in self.diff_ids.items()},
            "tocDigests": {str(k): v for k, v in self.toc_digests.items()},
            "chainIDs": self.chain_ids,
        }


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(Ln) =
    sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for d in diff_ids:
        if not out:
            out.append(d)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def _short(d: str | None) -> str:
    return (d[:19] + "...") if d else "none"


# ---------------------------------------------------------------- TOC
async def verify_toc(image: Image, desc: LayerDescriptor, *,
                     progress: ProgressFn | None = None) -> tuple[list[Check], LayerIndex | None, str]:
    """Check a layer's TOC digest (and zstd:chunked manifest checksum)
    against its annotations. Returns the checks, the index (None when the
    layer has no TOC or it could not be read) and the detected format."""
    n = desc.index
    checks: list[Check] = []
    if desc.foreign:
        return [Check("layer", True, desc.foreign_reason(), n, skipped=True)], None, "?"
    try:
        source = image.store.blob_source(desc.digest, desc.size)
        if progress:
            progress(VerifyProgress(n, "toc", 0, desc.size))
        footer = await read_footer(source, desc.annotations)
    except CoreError as e:
        return [Check("layer", False, f"cannot read the blob: {e}", n)], None, "?"
    fmt = footer.format
    if fmt not in Format.LAZY:
        return [Check("toc-digest", True, f"plain {fmt} layer: no TOC to verify", n,
                      skipped=True)], None, fmt
    try:
        ix = await load_layer_index(source, annotations=desc.annotations)
    except CoreError as e:
        return [Check("toc-digest", False, f"cannot read the TOC: {e}", n)], None, fmt
    want = desc.toc_digest_annotation
    if want is None:
        anchored = (" (anchored by the manifest checksum instead)"
                    if fmt == Format.ZSTDCHUNKED and desc.zstd_manifest_checksum else
                    " (no toc.digest annotation to compare with)")
        checks.append(Check("toc-digest", True, f"{ix.toc_digest}{anchored}", n, skipped=True))
    elif want == ix.toc_digest:
        checks.append(Check("toc-digest", True, f"{ix.toc_digest} matches the annotation", n))
    else:
        checks.append(Check("toc-digest", False,
                            f"TOC digest mismatch: annotated {want}, computed {ix.toc_digest}", n))
    if fmt == Format.ZSTDCHUNKED and desc.zstd_manifest_checksum:
        got = ix.manifest_checksum  # the sha256 of the compressed TOC the index came from
        ok = got == desc.zstd_manifest_checksum
        key = desc.zstd_manifest_checksum_key
        checks.append(Check(
            "manifest-checksum", ok,
            f"{got} matches the {key} annotation" if ok else
            f"zstd:chunked manifest checksum mismatch: {key} annotation says "
            f"{desc.zstd_manifest_checksum}, computed {got}", n))
    if progress:
        progress(VerifyProgress(n, "toc", desc.size, desc.size))
    return checks, ix, fmt


# ---------------------------------------------------------------- full
class TarRebuild:
    """The sha256 of the tar a zstd:chunked tar-split describes, its file
    contents fed in tar order (chunks in blob order): raw segments are hashed
    as they come, each file record takes the next ``size`` bytes, which must
    be the chunks of that very file."""

    def __init__(self, items):
        self._items = items
        self._hash = hashlib.sha256()
        self._file: list | None = None  # [path, bytes left]
        self.error: str | None = None

    def fail(self, why: str) -> None:
        if self.error is None:
            self.error = why

    def _next_file(self) -> None:
        while self._file is None:
            item = next(self._items, None)
            if item is None:
                return
            if item.segment is not None:
                self._hash.update(item.segment)
            elif item.size:
                self._file = [posixpath.normpath("/" + item.name).lstrip("/"), item.size]

    def feed(self, path: str, data: bytes) -> None:
        if self.error is not None or not data:
            return
        try:
            self._next_file()
        except FormatError as e:
            self.fail(str(e))
            return
        if self._file is None:
            self.fail(f"{path} has content the tar-split does not list")
        elif self._file[0] != path:
            self.fail(f"the tar-split lists {self._file[0]} where the blob has {path}")
        elif len(data) > self._file[1]:
            self.fail(f"{path} is longer than the tar-split says")
        else:
            self._hash.update(data)
            self._file[1] -= len(data)
            if not self._file[1]:
                self._file = None

    def finish(self) -> tuple[str | None, str]:
        """(digest, "") or (None, why not)."""
        if self.error is None:
            try:
                self._next_file()
            except FormatError as e:
                self.fail(str(e))
            else:
                if self._file is not None:
                    self.fail(f"{self._file[0]} is shorter than the tar-split says")
        if self.error is not None:
            return None, self.error
        return "sha256:" + self._hash.hexdigest(), ""


class _FullState:
    """Blocking part of a full verification: fed the blob piece by piece."""

    def __init__(self, n: int, fmt: str, ix: LayerIndex | None):
        self.n = n
        self.fmt = fmt
        self.ix = ix
        self.on_chunk = None  # see verify_layer
        self.blob_hash = hashlib.sha256()
        self.diff_hash = hashlib.sha256()
        self.usize = 0
        self.inflater = Inflater(fmt)
        self.inflate_error: str | None = None
        self.failures: list[Check] = []
        self.chunk_failures = 0
        self.failed_chunks: set[int] = set()
        self.chunks_ok = 0
        self.files_ok = 0
        self.file_failures = 0
        self.files_no_digest = 0
        # Chunks in blob order and a sliding window of the blob over them.
        self.chunks = list(ix.all_chunks()) if ix is not None else []
        self.ci = 0
        self.buf = bytearray()
        self.buf_start = 0
        # Per-file running digests: entry id -> [next_offset, hasher, pending, failed]
        self.files: dict[int, list] = {}
        # zstd:chunked's current generation: the tar rebuilt from the
        # tar-split and the chunks (in blob order = tar order) as they pass.
        self.rebuild: TarRebuild | None = None

    def feed(self, piece: bytes) -> None:
        self.blob_hash.update(piece)
        if self.inflate_error is None:
            try:
                self.inflater.feed(piece, self._inflated)
            except FormatError as e:
                self.inflate_error = str(e)
        if self.ix is None:
            return
        self.buf += piece
        self._drain(final=False)

    def _inflated(self, out: bytes) -> None:
        """A piece of the decompressed stream (bounded: core.estargz.plain)."""
        self.diff_hash.update(out)
        self.usize += len(out)

    def finish(self) -> None:
        if self.inflate_error is None:
            try:
                self.inflater.finish()
            except FormatError as e:
                self.inflate_error = str(e)
        if self.ix is not None:
            self._drain(final=True)
            self._check_empty_files()

    def _fail(self, check: Check, kind: str) -> None:
        if kind == "chunk":
            self.chunk_failures += 1
            count = self.chunk_failures
        else:
            self.file_failures += 1
            count = self.file_failures
        if count <= MAX_FAILURE_LINES:
            self.failures.append(check)

    def _drain(self, final: bool) -> None:
        ix = self.ix
        buf_end = self.buf_start + len(self.buf)
        while self.ci < len(self.chunks):
            c = self.chunks[self.ci]
            if c.end > buf_end and not final:
                break
            lo = c.offset - self.buf_start
            piece = bytes(self.buf[lo : lo + (c.end - c.offset)])
            path = ix.path_of(c.entry_id)
            try:
                data = decode_chunk(ix.format, piece, c, path)
            except ChunkDigestError as e:
                self.failed_chunks.add(c.index)
                self._fail(Check("chunk", False, str(e), self.n), "chunk")
                self._file_piece(c.entry_id, c.chunk_offset, None)
                if self.rebuild is not None:
                    self.rebuild.fail(f"a chunk of {path} fails verification")
            else:
                self.chunks_ok += 1
                if self.on_chunk is not None:
                    self.on_chunk(c, data)
                self._file_piece(c.entry_id, c.chunk_offset, data)
                if self.rebuild is not None:
                    self.rebuild.feed(path, data)
            self.ci += 1
        # Drop what no remaining chunk needs.
        keep_from = self.chunks[self.ci].offset if self.ci < len(self.chunks) else buf_end
        drop = min(keep_from, buf_end) - self.buf_start
        if drop > 0:
            del self.buf[:drop]
            self.buf_start += drop

    def _file_piece(self, eid: int, off: int, data: bytes | None) -> None:
        """Feed a file's chunk (None: it failed) into its running digest."""
        st = self.files.get(eid)
        if st is None:
            e = self.ix.entry(eid)
            # [next offset, hasher, pending pieces, failed, chunks left]
            st = self.files[eid] = [0, hashlib.sha256(), {}, False, len(self.ix.chunks(e))]
        st[4] -= 1
        if data is None:
            st[3] = True
        elif not st[3]:
            st[2][off] = data
            while st[0] in st[2]:
                d = st[2].pop(st[0])
                st[1].update(d)
                st[0] += len(d)
                if not d:
                    break
        if st[4] <= 0:
            self._file_done(self.ix.entry(eid), st)

    def _file_done(self, e, st) -> None:
        if e.id not in self.files:
            return
        del self.files[e.id]
        if st[3]:
            return  # its chunk failure was reported
        if st[0] != e.size:
            self._fail(Check("file", False, f"{e.path}: chunks cover only {st[0]} of {e.size} bytes",
                             self.n), "file")
            return
        want = e.digest
        if not want:
            self.files_no_digest += 1
            return
        got = "sha256:" + st[1].hexdigest()
        if got == want:
            self.files_ok += 1
        else:
            self._fail(Check("file", False,
                             f"{e.path}: file digest mismatch (TOC {_short(want)}, "
                             f"content {_short(got)})", self.n), "file")

    def _check_empty_files(self) -> None:
        empty = "sha256:" + hashlib.sha256(b"").hexdigest()
        for e in self.ix.iter_entries():
            if e.type_code == REG and e.size == 0:
                if not e.digest:
                    self.files_no_digest += 1
                elif e.digest == empty:
                    self.files_ok += 1
                else:
                    self._fail(Check("file", False,
                                     f"{e.path}: empty file with digest {_short(e.digest)}",
                                     self.n), "file")
        for eid, st in list(self.files.items()):
            self._file_done(self.ix.entry(eid), st)


async def verify_layer(image: Image, desc: LayerDescriptor, *, full: bool = False,
                       progress: ProgressFn | None = None,
                       on_chunk=None) -> LayerVerification:
    """Verify one layer (see the module doc). With ``full``: every chunk and
    file digest, the blob digest and the diffID (and the uncompressed size
    annotation when present); ``on_chunk(chunk, data)`` (in a worker thread)
    gets each chunk that verified, e.g. to keep it in a cache."""
    checks, ix, fmt = await verify_toc(image, desc, progress=progress)
    res = LayerVerification(desc.index, fmt, checks, ix.toc_digest if ix is not None else None)
    if full and fmt != "?":
        await _verify_blob(image, desc, fmt, ix, res, progress, on_chunk)
    return res


async def _verify_blob(image: Image, desc: LayerDescriptor, fmt: str, ix: LayerIndex | None,
                       res: LayerVerification, progress: ProgressFn | None,
                       on_chunk=None) -> None:
    checks = res.checks
    n = desc.index
    source = image.store.blob_source(desc.digest, desc.size)
    state = _FullState(n, fmt, ix)
    state.on_chunk = on_chunk
    tar_split_check = None
    if ix is not None and ix.tar_split is not None:
        try:
            split = await read_tar_split(ix, source)
        except CoreError as e:
            tar_split_check = Check("tar-split", False, str(e), n)
        else:
            state.rebuild = TarRebuild(iter_tar_split(split))
    done = 0
    try:
        async for piece in stream_blob(source):
            await anyio.to_thread.run_sync(state.feed, piece)
            done += len(piece)
            if progress:
                progress(VerifyProgress(n, "blob", done, desc.size))
        await anyio.to_thread.run_sync(state.finish)
    except CoreError as e:
        checks.append(Check("blob-digest", False, f"cannot read the blob: {e}", n))
        return
    if ix is not None:
        res.failed_chunks = state.failed_chunks
        res.chunks_checked = state.chunks_ok + state.chunk_failures
        checks.extend(state.failures)
        extra = state.chunk_failures + state.file_failures - len(state.failures)
        if extra > 0:
            checks.append(Check("chunks", False, f"... and {extra} more chunk/file failures", n))
        if not state.chunk_failures:
            checks.append(Check("chunks", True, f"{state.chunks_ok} chunk digests verified", n))
        if not state.file_failures:
            note = f" ({state.files_no_digest} without a digest)" if state.files_no_digest else ""
            checks.append(Check("files", True, f"{state.files_ok} file digests verified{note}", n))
    blob = res.blob_digest = "sha256:" + state.blob_hash.hexdigest()
    if blob == desc.digest:
        checks.append(Check("blob-digest", True, f"{blob} ({desc.size} bytes)", n))
    else:
        checks.append(Check("blob-digest", False,
                            f"blob digest mismatch: manifest says {desc.digest}, content hashes to {blob}",
                            n))
    if state.inflate_error is not None:
        checks.append(Check("diff-id", False, f"cannot decompress the blob: {state.inflate_error}", n))
        return
    diff = res.diff_id = "sha256:" + state.diff_hash.hexdigest()
    res.uncompressed_size = state.usize
    if desc.diff_id is None:
        checks.append(Check("diff-id", False,
                            f"the image config lists no diffID for this layer (computed {diff})", n))
    elif diff == desc.diff_id:
        checks.append(Check("diff-id", True, f"{diff} matches the config", n))
    else:
        rewritten = ""
        if (fmt == Format.ZSTDCHUNKED and ix is not None and ix.tar_split is None
                and state.chunks_ok and not state.chunk_failures and not state.file_failures
                and not res.problems):
            # containers/storage's older writer re-emits the tar headers, so
            # the blob is not the tar the config hashed: say so, but it fails.
            rewritten = ("; the layer was rewritten by its producer (an older zstd:chunked "
                         "writer, e.g. podman 4), its files themselves verify")
        checks.append(Check("diff-id", False,
                            f"diffID mismatch: config says {desc.diff_id}, decompressed content "
                            f"hashes to {diff}{rewritten}", n))
    if tar_split_check is not None:
        checks.append(tar_split_check)
    elif state.rebuild is not None:
        checks.append(_tar_split_check(n, ix, state.rebuild.finish(), desc.diff_id))
    want_size = desc.uncompressed_size_annotation
    if want_size is not None:
        ok = want_size == state.usize
        checks.append(Check("uncompressed-size", ok,
                            f"{state.usize} bytes" + ("" if ok else f", annotation says {want_size}"),
                            n))


def _tar_split_check(n: int, ix: LayerIndex, rebuilt: tuple[str | None, str],
                     want: str | None) -> Check:
    digest, why = rebuilt
    head = f"{ix.tar_split.digest} matches the TOC's tarSplitDigest"
    if digest is None:
        return Check("tar-split", False, f"{head}, but the tar does not rebuild: {why}", n)
    if want is None or digest != want:
        return Check("tar-split", False,
                     f"{head}, but the tar it rebuilds from the chunks hashes to {digest}, "
                     f"not the config's diffID {want}", n)
    return Check("tar-split", True,
                 f"{head}; the tar rebuilt from it and the chunks has the config's diffID "
                 f"{digest}", n)


async def verify_image(image: Image, *, layers: list | None = None, full: bool = False,
                       progress: ProgressFn | None = None) -> VerifyResult:
    """Verify the image's layers (all, or those named by ``layers``:
    indexes, digests or :class:`LayerDescriptor`\\ s). With every layer and
    ``full``, also the chain of diffIDs (chain IDs) against the config."""
    if layers is None:
        descs = list(image.layers)
    else:
        descs = [d if isinstance(d, LayerDescriptor) else image.layer(d) for d in layers]
    result = VerifyResult(full=full)
    diff_ids = (image.config.get("rootfs") or {}).get("diff_ids") or []
    if layers is None and len(diff_ids) != len(image.layers):
        result.checks.append(Check(
            "config", False, f"the config lists {len(diff_ids)} diffIDs for "
            f"{len(image.layers)} layers"))
    for desc in descs:
        lv = await verify_layer(image, desc, full=full, progress=progress)
        result.layers.append(lv)
        result.checks.extend(lv.checks)
        if lv.diff_id:
            result.diff_ids[desc.index] = lv.diff_id
        if lv.toc_digest:
            result.toc_digests[desc.index] = lv.toc_digest
    foreign = [d.index for d in image.layers if d.foreign]
    if full and layers is None and image.layers and foreign:
        result.checks.append(Check(
            "chain-id", True, f"not computed: layer(s) {', '.join(map(str, foreign))} are "
            "foreign and not fetched", skipped=True))
    elif full and layers is None and image.layers:
        computed = [result.diff_ids.get(d.index) for d in image.layers]
        if all(computed) and computed == list(diff_ids):
            result.chain_ids = chain_ids(computed)
            result.checks.append(Check("chain-id", True, f"{result.chain_ids[-1]} (top layer)"))
        else:
            bad = [i for i, d in enumerate(computed) if d is None or i >= len(diff_ids)
                   or d != diff_ids[i]]
            result.checks.append(Check(
                "chain-id", False,
                f"chain IDs do not hold: diffIDs of layers {', '.join(map(str, bad)) or '-'} "
                "differ from the config"))
    return result
