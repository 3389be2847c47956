"""On-disk image records: manifests, configs and layer TOCs kept in the cache dir.

A mount keeps what it needs to start again without the registry (after a
crash or a reboot, with the registry down): the image manifest (and index),
the config, and each layer's TOC. Layout under ``<cache dir>/records``::

    manifests/<hex>        exact manifest or index bytes; <hex> is their sha256
    configs/<hex>          exact config bytes; <hex> is their sha256
    tocs/<kind>-<hex>      a layer's TOC: the blob ranges the loader read (tail,
                           footer, TOC region) as msgpack; kind ``toc`` is keyed by
                           the eStargz toc.digest annotation, ``zstd`` by the
                           zstd:chunked manifest checksum, ``blob`` (a layer with
                           no anchor, mounted with --allow-unverified) by the blob digest
    refs/<hex>             the manifest digest a tag last resolved to (JSON);
                           <hex> is the sha256 of the reference text

Contract:

* Written only after the content verified (a manifest or config against the
  digest it was fetched by, a TOC by the loader against its annotation),
  atomically (temp file in the same dir, then rename; not fsynced: a record
  a crash tears fails its verification), 0600 files in 0700 directories that
  are ours (``core.paths.private_dir``). TOC records are read and written in a
  worker thread (they can be megabytes; an event loop may be serving FUSE).
* Read back only after verifying again, within the same limits as fetched
  content (``core.oci`` for manifests and configs, the loader's TOC limits):
  a manifest or config must hash to its name; a TOC record carries a sha256
  of its ranges and is re-parsed by :func:`core.estargz.load_layer_index`
  against the layer's annotation. A record that fails is never used: one
  log line, the file is removed, and the caller fetches it again.
* Writing a record is best effort: a failure is logged once and the fetched
  content is used as it is.
* :class:`RecordedStore` wraps an :class:`ImageStore`: manifests by digest and
  configs come from the records without a request; a tag is asked of the
  registry (authoritative when it answers) and falls back to the recorded
  digest only when the registry cannot be reached.
* :meth:`Records.prune` keeps the given manifest digests and everything they
  name (index children, config, layer TOCs): live mounts' records survive.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import anyio.to_thread
import msgspec

from .errors import (
    BlobReadError,
    CoreError,
    RegistryUnreachableError,
    RequestTimeoutError,
)
from .estargz import load_layer_index
from .estargz.loader import MAX_TOC_BYTES, TAIL_READ
from .estargz.toc import LayerIndex
from .oci import (
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    ZSTD_MANIFEST_CHECKSUM_ANNOTATIONS,
    sha256_digest,
    sniff_media_type,
)
from .paths import private_dir
from .reference import Reference

log = logging.getLogger("core.records")

RECORDS_SUBDIR = "records"
TOC_RECORD_VERSION = 1
# A TOC record holds the tail read, at most one more range before it and a
# head probe: bounded by the loader's own limits plus their framing.
MAX_TOC_RECORD_BYTES = MAX_TOC_BYTES + TAIL_READ + (64 << 10)
MAX_REF_BYTES = 64 << 10
_KINDS = ("manifests", "configs", "tocs", "refs")
_TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"


class TocRecord(msgspec.Struct, frozen=True):
    """The blob ranges a verified TOC load read (enough to load it again)."""

    version: int
    blob_digest: str
    blob_size: int
    ranges: list[tuple[int, bytes]]
    checksum: str  # sha256 over each range's offset and bytes, see _ranges_checksum


class RefRecord(msgspec.Struct, frozen=True):
    reference: str
    digest: str


@dataclass(frozen=True)
class RecordInfo:
    kind: str   # manifests, configs, tocs, refs
    name: str   # the file name (hex digest, or kind-hex for TOCs)
    size: int


def _ranges_checksum(ranges: list[tuple[int, bytes]]) -> str:
    h = hashlib.sha256()
    for offset, data in ranges:
        h.update(b"%d:%d:" % (offset, len(data)))
        h.update(data)
    return "sha256:" + h.hexdigest()


def _hex(digest: str) -> str | None:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
        return None
    return hexd


def toc_key(desc) -> str | None:
    """The record name of a layer's TOC (``desc``: a ``core.image.LayerDescriptor``):
    by its trust anchor when it has one, else by its blob digest."""
    annotations = getattr(desc, "annotations", None) or {}
    for kind, value in [("toc", annotations.get(_TOC_DIGEST_ANNOTATION))] + [
            ("zstd", annotations.get(k)) for k in ZSTD_MANIFEST_CHECKSUM_ANNOTATIONS]:
        if isinstance(value, str) and value:
            hexd = _hex(value)
            return f"{kind}-{hexd}" if hexd else None
    hexd = _hex(desc.digest)
    return f"blob-{hexd}" if hexd else None


class Records:
    """The records under ``root`` (created 0700 on first write).

    Not split: a put/get pair per kind of record (manifest, config, ref,
    TOC) over one private write / read-and-verify path, plus the listing
    and pruning that must see every kind at once."""

    def __init__(self, root: str):
        self.root = root
        self.hits = 0
        self.writes = 0
        self.damaged = 0
        self._write_warned = False

    @classmethod
    def for_cache_dir(cls, cache_dir: str | None = None) -> Records:
        """The records of the chunk cache at ``cache_dir`` (default: the user's)."""
        if not cache_dir:
            from .cache import default_cache_dir

            cache_dir = default_cache_dir()
        return cls(os.path.join(os.path.abspath(cache_dir), RECORDS_SUBDIR))

    # -- files -----------------------------------------------------------------------
    def _path(self, kind: str, name: str) -> str:
        return os.path.join(self.root, kind, name)

    def _write(self, kind: str, name: str, data: bytes) -> None:
        try:
            private_dir(self.root)
            d = private_dir(os.path.join(self.root, kind))
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)  # 0600
            try:
                # no fsync: it would cost every mount a disk flush, and a record
                # torn by a power loss fails its verification and is fetched again
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, os.path.join(d, name))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self.writes += 1
        except (OSError, CoreError) as e:
            if not self._write_warned:
                self._write_warned = True
                log.warning("cannot write the image record %s/%s under %s: %s", kind, name,
                            self.root, e)

    def _read(self, kind: str, name: str, limit: int) -> bytes | None:
        """The file's bytes, or None when it is missing; a file that is not a
        regular file of ours or is over ``limit`` is discarded."""
        path = self._path(kind, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            self._discard(kind, name, f"cannot open it: {e.strerror}")
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                self._discard(kind, name, "not a regular file of ours")
                return None
            if st.st_size > limit:
                self._discard(kind, name, f"{st.st_size} bytes, over the {limit} allowed")
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                self._discard(kind, name, f"over the {limit} bytes allowed")
                return None
            return data
        finally:
            os.close(fd)

    def _discard(self, kind: str, name: str, why: str) -> None:
        self.damaged += 1
        log.warning("image record %s/%s is damaged (%s): ignored and removed; "
                    "fetching it again", kind, name, why)
        with contextlib.suppress(OSError):
            os.unlink(self._path(kind, name))

    # -- manifests and configs ---------------------------------------------------------
    def _put_blob(self, kind: str, data: bytes, digest: str, limit: int) -> None:
        hexd = _hex(digest)
        if hexd is None or len(data) > limit or sha256_digest(data) != digest:
            return  # only verified content is recorded
        try:
            with open(self._path(kind, hexd), "rb") as f:
                if f.read(limit + 1) == data:
                    return  # already recorded (a damaged one is replaced)
        except OSError:
            pass
        self._write(kind, hexd, data)

    def _get_blob(self, kind: str, digest: str, limit: int) -> bytes | None:
        hexd = _hex(digest)
        if hexd is None:
            return None
        data = self._read(kind, hexd, limit)
        if data is None:
            return None
        got = sha256_digest(data)
        if got != digest:
            self._discard(kind, hexd, f"its content hashes to {got}")
            return None
        self.hits += 1
        return data

    def put_manifest(self, data: bytes, digest: str) -> None:
        self._put_blob("manifests", data, digest, MAX_MANIFEST_BYTES)

    def get_manifest(self, digest: str) -> bytes | None:
        return self._get_blob("manifests", digest, MAX_MANIFEST_BYTES)

    def put_config(self, data: bytes, digest: str) -> None:
        self._put_blob("configs", data, digest, MAX_CONFIG_BYTES)

    def get_config(self, digest: str) -> bytes | None:
        return self._get_blob("configs", digest, MAX_CONFIG_BYTES)

    # -- tags ------------------------------------------------------------------------
    @staticmethod
    def _ref_name(reference: str) -> str:
        return hashlib.sha256(reference.encode()).hexdigest()

    def put_ref(self, reference: str, digest: str) -> None:
        if _hex(digest) is None:
            return
        rec = RefRecord(reference=reference, digest=digest)
        if self.get_ref(reference) == digest:
            return
        self._write("refs", self._ref_name(reference), msgspec.json.encode(rec))

    def get_ref(self, reference: str) -> str | None:
        name = self._ref_name(reference)
        data = self._read("refs", name, MAX_REF_BYTES)
        if data is None:
            return None
        try:
            rec = msgspec.json.decode(data, type=RefRecord)
        except msgspec.ValidationError as e:
            self._discard("refs", name, f"not a tag record: {e}")
            return None
        if rec.reference != reference or _hex(rec.digest) is None:
            self._discard("refs", name, "it names another reference or no digest")
            return None
        return rec.digest

    # -- TOCs ------------------------------------------------------------------------
    def put_toc(self, key: str, blob_digest: str, blob_size: int,
                ranges: list[tuple[int, bytes]]) -> None:
        ranges = sorted(((int(o), d if isinstance(d, bytes) else bytes(d)) for o, d in ranges),
                        key=lambda r: r[0])
        rec = TocRecord(version=TOC_RECORD_VERSION, blob_digest=blob_digest,
                        blob_size=blob_size, ranges=ranges, checksum=_ranges_checksum(ranges))
        data = msgspec.msgpack.encode(rec)
        if len(data) <= MAX_TOC_RECORD_BYTES:
            self._write("tocs", key, data)

    def get_toc(self, key: str) -> TocRecord | None:
        """The TOC record, its checksum verified (the TOC itself is verified
        when it is loaded from it: :func:`load_index`)."""
        data = self._read("tocs", key, MAX_TOC_RECORD_BYTES)
        if data is None:
            return None
        try:
            rec = msgspec.msgpack.decode(data, type=TocRecord)
        except msgspec.DecodeError as e:
            self._discard("tocs", key, f"not a TOC record: {e}")
            return None
        if rec.version != TOC_RECORD_VERSION:
            self._discard("tocs", key, f"record version {rec.version}")
            return None
        if _ranges_checksum(rec.ranges) != rec.checksum:
            self._discard("tocs", key, "its ranges do not match their checksum")
            return None
        return rec

    def discard_toc(self, key: str, why: str) -> None:
        self._discard("tocs", key, why)

    # -- listing and pruning -------------------------------------------------------------
    def list(self) -> list[RecordInfo]:
        out = []
        for kind in _KINDS:
            d = os.path.join(self.root, kind)
            try:
                names = sorted(os.listdir(d))
            except OSError:
                continue
            for name in names:
                if name.startswith(".tmp-"):
                    continue
                try:
                    st = os.lstat(os.path.join(d, name))
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    out.append(RecordInfo(kind, name, st.st_size))
        return out

    def usage(self) -> dict:
        items = self.list()
        out = {"dir": self.root, "records": len(items), "bytes": sum(i.size for i in items)}
        for kind in _KINDS:
            out[kind] = sum(1 for i in items if i.kind == kind)
        return out

    def referenced(self, manifest_digests: Iterable[str]) -> set[tuple[str, str]]:
        """``(kind, name)`` of the records the manifests (or indexes) name:
        themselves, their index children, configs and layer TOCs."""
        keep: set[tuple[str, str]] = set()
        todo = [d for d in manifest_digests if d]
        for _ in range(10000):  # an index names manifests; bounded however they nest
            if not todo:
                break
            digest = todo.pop()
            hexd = _hex(digest)
            if hexd is None or ("manifests", hexd) in keep:
                continue
            keep.add(("manifests", hexd))
            data = self.get_manifest(digest)
            if data is None:
                continue
            try:
                doc = json.loads(data)
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            for m in doc.get("manifests") or []:
                if isinstance(m, dict) and isinstance(m.get("digest"), str):
                    todo.append(m["digest"])
            cfg = doc.get("config")
            if isinstance(cfg, dict) and isinstance(cfg.get("digest"), str):
                h = _hex(cfg["digest"])
                if h:
                    keep.add(("configs", h))
            for ld in doc.get("layers") or []:
                if isinstance(ld, dict) and isinstance(ld.get("digest"), str):
                    key = toc_key(_Desc(ld["digest"], ld.get("annotations") or {}))
                    if key:
                        keep.add(("tocs", key))
        return keep

    def missing(self, manifest_digest: str) -> list[str]:
        """What a mount of ``manifest_digest`` would still need the registry for
        (``kind/name`` of each absent record; empty: it mounts from the records
        alone). Present records are not verified here: reading them does that."""
        if self.get_manifest(manifest_digest) is None:
            return [f"manifests/{_hex(manifest_digest) or manifest_digest}"]
        return sorted(f"{kind}/{name}" for kind, name in self.referenced([manifest_digest])
                      if not os.path.isfile(self._path(kind, name)))

    def prune(self, keep: Iterable[str] = ()) -> dict:
        """Remove every record but those of the ``keep`` manifest digests (see
        :meth:`referenced`) and the tags pointing at them."""
        kept = self.referenced(keep)
        kept_manifests = {name for kind, name in kept if kind == "manifests"}
        removed = removed_bytes = 0
        for item in self.list():
            if item.kind == "refs":
                data = self._read("refs", item.name, MAX_REF_BYTES)
                try:
                    digest = msgspec.json.decode(data or b"", type=RefRecord).digest
                except msgspec.DecodeError:
                    digest = ""
                if _hex(digest) in kept_manifests:
                    continue
            elif (item.kind, item.name) in kept:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(item.kind, item.name))
                removed += 1
                removed_bytes += item.size
        self._remove_stale_temps()
        return {"dir": self.root, "removedRecords": removed, "removedRecordBytes": removed_bytes,
                "keptRecords": len(self.list())}


    def _remove_stale_temps(self, age: float = 3600.0) -> None:
        """Temp files a crashed writer left (a live writer renames its own within
        a moment)."""
        import time

        for kind in _KINDS:
            d = os.path.join(self.root, kind)
            try:
                names = [n for n in os.listdir(d) if n.startswith(".tmp-")]
            except OSError:
                continue
            for n in names:
                with contextlib.suppress(OSError):
                    if time.time() - os.lstat(os.path.join(d, n)).st_mtime > age:
                        os.unlink(os.path.join(d, n))


@dataclass
class _Desc:
    digest: str
    annotations: dict


# -- TOCs: recorded while loading, loaded again from the record ------------------------
class _CapturingSource:
    """A blob source that remembers the ranges read through it."""

    def __init__(self, source):
        self._source = source
        self.digest = source.digest
        self.size = source.size
        self.ranges: list[tuple[int, bytes]] = []

    @property
    def description(self) -> str:
        return self._source.description

    async def read_range(self, offset: int, length: int) -> bytes:
        data = await self._source.read_range(offset, length)
        self.ranges.append((offset, data))
        return data

    async def aclose(self) -> None:
        return None  # the wrapped source stays the caller's


class _ReplaySource:
    """The ranges of a :class:`TocRecord` as a blob source; any other range
    is not in the record (:class:`BlobReadError`)."""

    def __init__(self, rec: TocRecord, digest: str, size: int):
        self._ranges = rec.ranges
        self.digest = digest
        self.size = size

    @property
    def description(self) -> str:
        return f"the image record of {self.digest}"

    async def read_range(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        for start, data in self._ranges:
            if start <= offset and offset + length <= start + len(data):
                return data[offset - start:offset - start + length]
        raise BlobReadError(f"bytes {offset}+{length} of {self.digest[:19]} are not recorded")

    async def aclose(self) -> None:
        return None


async def load_index(records: Records | None, desc, source, *,
                     expected_toc_digest: str | None = None,
                     expected_manifest_checksum: str | None = None) -> LayerIndex:
    """:func:`core.estargz.load_layer_index` for the layer ``desc`` through
    ``records``: from its TOC record when one verifies (no request), else from
    ``source``, recording what was read once it verified."""
    annotations = getattr(desc, "annotations", None)
    key = toc_key(desc) if records is not None else None
    if key is not None:
        rec = await anyio.to_thread.run_sync(records.get_toc, key)
        if rec is not None and rec.blob_size != source.size:
            records.discard_toc(key, f"it is of a blob of {rec.blob_size} bytes, "
                                     f"not {source.size}")
            rec = None
        if rec is not None:
            try:
                index = await load_layer_index(
                    _ReplaySource(rec, source.digest, source.size),
                    expected_toc_digest=expected_toc_digest,
                    expected_manifest_checksum=expected_manifest_checksum,
                    annotations=annotations)
            except CoreError as e:
                records.discard_toc(key, str(e))
            else:
                records.hits += 1
                return index
    capture = _CapturingSource(source) if key is not None else source
    index = await load_layer_index(capture, expected_toc_digest=expected_toc_digest,
                                   expected_manifest_checksum=expected_manifest_checksum,
                                   annotations=annotations)
    if key is not None:
        await anyio.to_thread.run_sync(records.put_toc, key, source.digest, source.size,
                                       capture.ranges)
    return index


# -- the store ---------------------------------------------------------------------------
def _unreachable(e: BaseException) -> bool:
    """Did the registry not answer at all (connection refused, timeouts), as
    opposed to answering no (404, 401, 403, 5xx) or failing TLS (a
    misconfiguration or someone in between: shown, never papered over)?"""
    return isinstance(e, RegistryUnreachableError | RequestTimeoutError)


def _media_type(data: bytes) -> str:
    try:
        return sniff_media_type(data)
    except CoreError:
        return ""


class RecordedStore:
    """An ``ImageStore`` that keeps manifests and configs in ``records``.

    Blob sources come from the wrapped store (the registry is asked only when
    a chunk is needed); everything else is the wrapped store's.
    """

    def __init__(self, inner, records: Records):
        self.inner = inner
        self.records = records
        self.fallbacks = 0

    def __getattr__(self, name: str):
        # host, client, iter_tags ... are the wrapped store's (only called for
        # attributes this class does not define)
        return getattr(self.inner, name)

    async def get_manifest(self, ref: Reference) -> tuple[bytes, str, str]:
        if ref.digest:
            data = self.records.get_manifest(ref.digest)
            if data is not None:
                return data, _media_type(data), ref.digest
            data, media_type, digest = await self.inner.get_manifest(ref)
            self.records.put_manifest(data, digest)
            return data, media_type, digest
        try:
            data, media_type, digest = await self.inner.get_manifest(ref)
        except CoreError as e:
            if not _unreachable(e):
                raise
            digest = self.records.get_ref(str(ref))
            data = self.records.get_manifest(digest) if digest else None
            if data is None:
                raise
            self.fallbacks += 1
            log.warning("registry unreachable (%s): using the manifest %s recorded for %s",
                        e, digest, ref)
            return data, _media_type(data), digest
        self.records.put_manifest(data, digest)
        self.records.put_ref(str(ref), digest)
        return data, media_type, digest

    async def get_blob_bytes(self, digest: str, size: int | None = None, *,
                             limit: int = MAX_CONFIG_BYTES) -> bytes:
        data = self.records.get_config(digest) if limit <= MAX_CONFIG_BYTES else None
        if data is not None and (size is None or len(data) == size):
            return data
        data = await self.inner.get_blob_bytes(digest, size, limit=limit)
        self.records.put_config(data, digest)
        return data

    def blob_source(self, digest: str, size: int):
        return self.inner.blob_source(digest, size)

    async def aclose(self) -> None:
        await self.inner.aclose()


def recorded_store(store, records: Records | None):
    """``store`` wrapped in a :class:`RecordedStore` when it is a registry's
    (an OCI layout is already on disk) and ``records`` are given."""
    if records is None or getattr(store, "registry", None) is None:
        return store
    return RecordedStore(store, records)


def pinned_reference(image: str, manifest_digest: str | None) -> str:
    """``image`` pinned to ``manifest_digest`` (``repo:tag@sha256:...``): what
    a remount from records passes, so neither the manifest nor the config
    needs the registry."""
    from .reference import parse_reference

    if not manifest_digest:
        return image
    ref = parse_reference(image)
    if ref.is_oci_layout or ref.digest:
        return image
    return str(ref.with_digest(manifest_digest))


__all__ = ["Records", "RecordedStore", "TocRecord", "RecordInfo", "load_index", "toc_key",
           "recorded_store", "pinned_reference"]
