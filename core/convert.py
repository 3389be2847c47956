"""Converting an image to eStargz (core.estargz.writer) or to zstd:chunked,
containers/storage's current generation (core.estargz.zstdwriter): every
layer through the writer, a new config (diffIDs) and manifest (layer
annotations), written through an :class:`ImageWriter`. A zstd:chunked layer
decompresses to its source tar unchanged, so its diffID is the source's.

The seam for destinations: :func:`open_writer` returns an
:class:`OCILayoutWriter` for ``oci:DIR[:TAG]`` and asks
``core.registry.writer.RegistryImageWriter`` (when present) for registry
references. Any object with the :class:`ImageWriter` methods will do.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import anyio.from_thread
import anyio.to_thread

from .errors import CoreError, FormatError
from .estargz.plain import stream_blob
from .estargz.writer import DEFAULT_CHUNK_SIZE, WriteResult, build_estargz
from .estargz.zstdwriter import build_zstdchunked
from .image import (
    OCI_CONFIG,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    Image,
    LayerDescriptor,
)
from .reference import Reference, parse_reference

ESTARGZ_LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD_LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+zstd"
FORMATS = ("estargz", "zstd:chunked")
OCI_LAYOUT_VERSION = b'{"imageLayoutVersion":"1.0.0"}'


class ImageWriter(Protocol):
    """Where a converted image goes."""

    async def has_blob(self, digest: str) -> bool: ...

    async def put_blob_file(self, path: str, digest: str, size: int, media_type: str) -> None: ...

    async def put_blob_bytes(self, data: bytes, digest: str, media_type: str) -> None: ...

    async def put_manifest(self, data: bytes, digest: str, media_type: str,
                           tag: str | None) -> None: ...

    async def aclose(self) -> None: ...


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class OCILayoutWriter:
    """Writes into an OCI image layout, creating it when needed; a manifest
    written with a tag replaces an earlier entry with that tag."""

    def __init__(self, layout_dir: str):
        self.root = layout_dir
        self.blobs = os.path.join(layout_dir, "blobs", "sha256")
        try:
            os.makedirs(self.blobs, exist_ok=True)
            lp = os.path.join(layout_dir, "oci-layout")
            if not os.path.exists(lp):
                _atomic_write(lp, OCI_LAYOUT_VERSION)
            ip = os.path.join(layout_dir, "index.json")
            if not os.path.exists(ip):
                _atomic_write(ip, json.dumps({"schemaVersion": 2, "manifests": []}).encode())
        except OSError as e:
            raise CoreError(f"cannot create an OCI layout at {layout_dir}: {e.strerror}") from None

    def _path(self, digest: str) -> str:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64:
            raise FormatError(f"invalid digest {digest!r}")
        return os.path.join(self.blobs, hexd)

    async def has_blob(self, digest: str) -> bool:
        return os.path.exists(self._path(digest))

    async def put_blob_file(self, path: str, digest: str, size: int, media_type: str) -> None:
        dst = self._path(digest)
        if os.path.exists(dst):
            return
        try:
            os.replace(path, dst)
        except OSError:
            await anyio.to_thread.run_sync(_copy_file, path, dst)

    async def put_blob_bytes(self, data: bytes, digest: str, media_type: str) -> None:
        dst = self._path(digest)
        if not os.path.exists(dst):
            _atomic_write(dst, data)

    async def put_manifest(self, data: bytes, digest: str, media_type: str,
                           tag: str | None) -> None:
        await self.put_blob_bytes(data, digest, media_type)
        ip = os.path.join(self.root, "index.json")
        try:
            with open(ip, "rb") as f:
                index = json.loads(f.read())
        except (OSError, ValueError) as e:
            raise FormatError(f"cannot read {ip}: {e}") from None
        manifests = [m for m in index.get("manifests", [])
                     if not (tag and (m.get("annotations") or {}).get(REF_NAME_ANNOTATION) == tag)]
        desc = {"mediaType": media_type, "digest": digest, "size": len(data)}
        if tag:
            desc["annotations"] = {REF_NAME_ANNOTATION: tag}
        manifests.append(desc)
        index["manifests"] = manifests
        index.setdefault("schemaVersion", 2)
        _atomic_write(ip, json.dumps(index, indent=2).encode())

    async def aclose(self) -> None:
        return None


def _copy_file(src: str, dst: str) -> None:
    tmp = f"{dst}.tmp{os.getpid()}"
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        while True:
            b = fi.read(1 << 20)
            if not b:
                break
            fo.write(b)
    os.replace(tmp, dst)


def open_writer(ref: Reference | str, **registry_options) -> ImageWriter:
    """The writer for a destination reference (``oci:`` layouts here; the
    registry part of core provides registry destinations)."""
    if isinstance(ref, str):
        ref = parse_reference(ref)
    if ref.is_oci_layout:
        return OCILayoutWriter(ref.layout_dir)
    try:
        from .registry.writer import RegistryImageWriter  # type: ignore[import-not-found]
    except ModuleNotFoundError:
        raise CoreError(f"cannot write to {ref}: only oci:DIR[:TAG] destinations are "
                        "supported so far") from None
    return RegistryImageWriter(ref, **registry_options)


@dataclass
class LayerConversion:
    index: int
    source_digest: str
    digest: str
    size: int
    diff_id: str
    toc_digest: str
    uncompressed_size: int
    missed_prioritized: list[str] = field(default_factory=list)


@dataclass
class ConvertResult:
    manifest_digest: str
    manifest_size: int
    config_digest: str
    layers: list[LayerConversion]

    def to_dict(self) -> dict:
        return {
            "manifestDigest": self.manifest_digest,
            "configDigest": self.config_digest,
            "layers": [{
                "index": c.index, "sourceDigest": c.source_digest, "digest": c.digest,
                "size": c.size, "diffID": c.diff_id, "tocDigest": c.toc_digest,
                "uncompressedSize": c.uncompressed_size,
                "missedPrioritizedFiles": c.missed_prioritized,
            } for c in self.layers],
        }


@dataclass
class ConvertProgress:
    """``stage``: ``download`` or ``convert`` of ``layer``; bytes ``done``/``total``."""

    layer: int
    stage: str
    done: int
    total: int


def _estargz_annotations(res: WriteResult) -> dict[str, str]:
    return {TOC_DIGEST_ANNOTATION: res.toc_digest,
            UNCOMPRESSED_SIZE_ANNOTATION: str(res.uncompressed_size)}


async def convert_image(image: Image, writer: ImageWriter, *, tag: str | None = None,
                        chunk_size: int = DEFAULT_CHUNK_SIZE,
                        prioritized_files: list[str] | tuple[str, ...] = (),
                        progress: Callable[[ConvertProgress], None] | None = None,
                        tmpdir: str | None = None, format: str = "estargz",
                        plan: Callable[[LayerDescriptor], list[str] | None] | None = None,
                        ) -> ConvertResult:
    """Convert every layer of ``image`` to eStargz and write the new image
    (layers, config, manifest tagged ``tag``) through ``writer``.

    Prioritised files apply to every layer (missing ones are allowed, as
    ``ctr-remote image convert`` does); layers already in eStargz are
    rebuilt from their tar. Cancellable; temporary files are removed.
    ``format`` is ``estargz`` or ``zstd:chunked`` (which has no prefetch
    landmark, so no prioritised files).

    ``plan(desc)``, when given, decides per layer instead: the files to
    prioritise in it, or None to copy the layer byte-identical (descriptor
    and diffID kept) — what ``optimize`` does with a layer nothing was
    recorded from."""
    if format not in FORMATS:
        raise FormatError(f"unknown format {format!r} (estargz or zstd:chunked)")
    zstd = format == "zstd:chunked"
    if zstd and (prioritized_files or plan is not None):
        raise FormatError("prioritised files are an eStargz feature; zstd:chunked has no "
                          "prefetch landmark")
    converted: list[LayerConversion] = []
    new_layers: list[dict] = []
    for desc in image.layers:
        if desc.foreign:
            # Not ours to fetch or redistribute: the descriptor goes over as it is.
            converted.append(LayerConversion(desc.index, desc.digest, desc.digest, desc.size,
                                             desc.diff_id or "", "", 0))
            new_layers.append(dict(image.manifest["layers"][desc.index]))
            continue
        files = plan(desc) if plan is not None else list(prioritized_files)
        source = image.store.blob_source(desc.digest, desc.size)
        with tempfile.TemporaryDirectory(dir=tmpdir, prefix="stargz-tui-convert-") as tmp:
            src_path = os.path.join(tmp, "in")
            out_path = os.path.join(tmp, "out")
            done = 0
            h = hashlib.sha256()
            with open(src_path, "wb") as f:
                async for piece in stream_blob(source):
                    h.update(piece)
                    await anyio.to_thread.run_sync(f.write, piece)
                    done += len(piece)
                    if progress:
                        progress(ConvertProgress(desc.index, "download", done, desc.size))
            if "sha256:" + h.hexdigest() != desc.digest:
                raise FormatError(f"layer {desc.index} ({desc.digest[:19]}) does not match its "
                                  "digest; refusing to convert it")
            if files is None:
                if not desc.diff_id:
                    raise FormatError(f"layer {desc.index} has no diffID in the image config; "
                                      "cannot keep it as it is")
                await writer.put_blob_file(src_path, desc.digest, desc.size, desc.media_type)
                converted.append(LayerConversion(
                    desc.index, desc.digest, desc.digest, desc.size, desc.diff_id,
                    desc.toc_digest_annotation or "", desc.uncompressed_size_annotation or 0))
                new_layers.append(dict(image.manifest["layers"][desc.index]))
                continue
            cancel = threading.Event()

            def report(d: int, t: int, n=desc.index) -> None:
                if progress:
                    anyio.from_thread.run_sync(progress, ConvertProgress(n, "convert", d, t))

            if zstd:
                build = functools.partial(build_zstdchunked, src_path, out_path,
                                          chunk_size=chunk_size, progress=report,
                                          cancel=cancel, tmpdir=tmp)
            else:
                build = functools.partial(build_estargz, src_path, out_path,
                                          chunk_size=chunk_size,
                                          prioritized_files=files,
                                          progress=report, cancel=cancel, tmpdir=tmp)
            try:
                res = await anyio.to_thread.run_sync(build, abandon_on_cancel=True)
            finally:
                cancel.set()
            media_type = ZSTD_LAYER_TYPE if zstd else ESTARGZ_LAYER_TYPE
            await writer.put_blob_file(out_path, res.blob_digest, res.blob_size, media_type)
        converted.append(LayerConversion(desc.index, desc.digest, res.blob_digest, res.blob_size,
                                         res.diff_id, res.toc_digest, res.uncompressed_size,
                                         res.missed_prioritized))
        ann = {k: v for k, v in desc.annotations.items()
               if not k.startswith(("containerd.io/snapshot/stargz/", "io.containers.estargz.",
                                    "io.containers.zstd-chunked.",
                                    "io.github.containers.zstd-chunked."))}
        if zstd:
            ann.update(res.annotations)
        else:
            ann.update(_estargz_annotations(res))
        new_layers.append({"mediaType": media_type, "digest": res.blob_digest,
                           "size": res.blob_size, "annotations": ann})
    config = json.loads(json.dumps(image.config))
    config.setdefault("rootfs", {"type": "layers"})
    config["rootfs"]["diff_ids"] = [c.diff_id for c in converted]
    cfg_bytes = json.dumps(config, separators=(",", ":")).encode()
    cfg_digest = "sha256:" + hashlib.sha256(cfg_bytes).hexdigest()
    await writer.put_blob_bytes(cfg_bytes, cfg_digest, OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest, "size": len(cfg_bytes)},
        "layers": new_layers,
    }
    if image.manifest.get("annotations"):
        manifest["annotations"] = image.manifest["annotations"]
    man_bytes = json.dumps(manifest, separators=(",", ":")).encode()
    man_digest = "sha256:" + hashlib.sha256(man_bytes).hexdigest()
    await writer.put_manifest(man_bytes, man_digest, OCI_MANIFEST, tag)
    return ConvertResult(man_digest, len(man_bytes), cfg_digest, converted)
