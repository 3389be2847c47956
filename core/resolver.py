"""Resolving layers: footer + TOC, verified against the manifest annotation.

:class:`Resolver` keeps resolved layers (their :class:`LayerIndex` and blob
source) in an LRU with reference counts: a layer in use is never dropped, an
unused one is dropped when more than ``max_layers`` are kept. When one layer
of an image is mounted the others can be pre-resolved in the background
(:meth:`Resolver.pre_resolve`), so mounting them later is instant. Each
resolve is bounded by a timeout (default 30 s) and fails with a clear error.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import anyio
import anyio.to_thread

from .errors import CoreError, DigestMismatchError, FormatError, MountError
from .estargz import Format, LayerIndex, read_footer
from .records import Records, load_index
from .source import BlobSource

log = logging.getLogger("core.resolver")

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_LAYERS = 16


@dataclass
class ResolvedLayer:
    digest: str
    index: LayerIndex
    source: BlobSource
    descriptor: object = None
    verified: bool = True
    refs: int = 0
    warnings: list[str] = field(default_factory=list)


class Resolver:
    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT, max_layers: int = DEFAULT_MAX_LAYERS,
                 records: Records | None = None):
        self.timeout = timeout
        self.records = records
        self.max_layers = max_layers
        self._layers: OrderedDict[str, ResolvedLayer] = OrderedDict()
        self._resolving: dict[str, anyio.Event] = {}
        self.pre_resolved = 0
        self.pre_resolve_errors: list[str] = []

    def __contains__(self, digest: str) -> bool:
        return digest in self._layers

    def cached(self) -> list[ResolvedLayer]:
        return list(self._layers.values())

    async def resolve(self, store, desc, *, allow_unverified: bool = False,
                      acquire: bool = True) -> ResolvedLayer:
        """Resolve the layer described by ``desc`` (a LayerDescriptor) from
        ``store``; with ``acquire`` its reference count goes up (pair it
        with :meth:`release`)."""
        digest = desc.digest
        for _ in range(3):
            have = self._layers.get(digest)
            if have is not None:
                self._layers.move_to_end(digest)
                if acquire:
                    have.refs += 1
                return have
            ev = self._resolving.get(digest)
            if ev is None:
                break
            await ev.wait()  # someone else resolves it; use their result
        ev = anyio.Event()
        self._resolving[digest] = ev
        try:
            layer = await self._resolve(store, desc, allow_unverified)
            self._layers[digest] = layer
            if acquire:
                layer.refs += 1
            self._trim()
            return layer
        finally:
            self._resolving.pop(digest, None)
            ev.set()

    async def _resolve(self, store, desc, allow_unverified: bool) -> ResolvedLayer:
        if getattr(desc, "foreign", False):
            raise MountError(desc.foreign_reason() + ": not mounted")
        expected = desc.toc_digest_annotation
        # zstd:chunked layers are anchored by their manifest checksum instead.
        manifest_checksum = getattr(desc, "zstd_manifest_checksum", None)
        warnings = []
        if not (expected or manifest_checksum):
            if not allow_unverified:
                # say "plain gzip" rather than "no annotation" when that is the real story
                probe = store.blob_source(desc.digest, desc.size)
                try:
                    with anyio.fail_after(self.timeout):
                        footer = await read_footer(probe, getattr(desc, "annotations", None))
                except (CoreError, TimeoutError):
                    footer = None
                finally:
                    await _close(probe)
                if footer is not None and footer.format not in Format.LAZY:
                    raise FormatError(
                        f"layer {desc.digest[:19]} is plain {footer.format}: it has no TOC and "
                        "cannot be read lazily (convert it to eStargz)")
                raise DigestMismatchError(
                    f"layer {desc.digest[:19]} has no TOC digest annotation "
                    "(containerd.io/snapshot/stargz/toc.digest, or a zstd:chunked "
                    "manifest-checksum); refusing to mount it "
                    "(--allow-unverified mounts it anyway)")
            warnings.append(f"layer {desc.digest[:19]} has no TOC digest annotation: "
                            "its TOC is not verified")
            log.warning(warnings[-1])
        source = store.blob_source(desc.digest, desc.size)
        try:
            with anyio.fail_after(self.timeout):
                index = await load_index(
                    self.records, desc, source, expected_toc_digest=expected,
                    expected_manifest_checksum=manifest_checksum)
                # the children index, off the daemon's FUSE loop
                await anyio.to_thread.run_sync(index.prepare)
        except TimeoutError:
            await _close(source)
            raise MountError(
                f"resolving layer {desc.digest[:19]} timed out after {self.timeout:g} s "
                f"(footer and TOC from {source.description})") from None
        except BaseException:
            await _close(source)
            raise
        if index.outside_hardlinks:
            await _close(source)
            e = index.entry(index.outside_hardlinks[0])
            raise MountError(
                f"layer {desc.digest[:19]} has a hardlink {e.path} to {e.link_name}, a file of "
                "an earlier layer: a layer mount cannot serve it (ls and cat read it)")
        return ResolvedLayer(digest=desc.digest, index=index, source=source, descriptor=desc,
                             verified=bool(expected or manifest_checksum), warnings=warnings)

    def release(self, digest: str) -> None:
        layer = self._layers.get(digest)
        if layer is not None and layer.refs > 0:
            layer.refs -= 1
        self._trim()

    def _trim(self) -> None:
        if len(self._layers) <= self.max_layers:
            return
        for digest in list(self._layers):
            if len(self._layers) <= self.max_layers:
                break
            if self._layers[digest].refs == 0:
                del self._layers[digest]  # its source is closed by aclose() users

    async def pre_resolve(self, store, descriptors, tasks=None, *,
                          allow_unverified: bool = False) -> None:
        """Resolve ``descriptors`` one by one as background work."""
        for desc in descriptors:
            if desc.digest in self._layers:
                continue
            try:
                if tasks is not None:
                    async with tasks.background():
                        await self.resolve(store, desc, allow_unverified=allow_unverified,
                                           acquire=False)
                else:
                    await self.resolve(store, desc, allow_unverified=allow_unverified,
                                       acquire=False)
                self.pre_resolved += 1
            except CoreError as e:
                self.pre_resolve_errors.append(f"{desc.digest[:19]}: {e}")
                log.info("pre-resolving layer %s: %s", desc.digest[:19], e)

    async def aclose(self) -> None:
        for layer in self._layers.values():
            await _close(layer.source)
        self._layers.clear()


async def _close(source) -> None:
    try:
        await source.aclose()
    except Exception:  # noqa: BLE001 - closing is best effort
        pass
