"""Images: manifests, indexes, configs and layers, from any store.

An :class:`ImageStore` (``core.oci``) is where manifests and blobs come
from: an OCI layout on disk (``core.layout``) or a registry
(``core.registry``). Everything
above this module (CLI, app, mounts) works with :class:`Image`, whichever
store it came from.
"""

from __future__ import annotations

import json
import platform as _platform
import re
from dataclasses import dataclass, field

from .errors import FormatError, NotFoundError, ReferenceError_
from .layout import OCILayoutStore
from .oci import (  # noqa: F401 - the image vocabulary, as callers import it from here
    ACCEPTED_MANIFEST_TYPES,
    DOCKER_CONFIG,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    FOREIGN_LAYER_TYPES,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    REF_NAME_ANNOTATION,
    TOC_DIGEST_ANNOTATION,
    UNCOMPRESSED_SIZE_ANNOTATION,
    ZSTD2_MANIFEST_CHECKSUM_ANNOTATION,
    ZSTD2_MANIFEST_POSITION_ANNOTATION,
    ZSTD2_PREFIX,
    ZSTD2_TARSPLIT_POSITION_ANNOTATION,
    ZSTD_MANIFEST_CHECKSUM_ANNOTATION,
    ZSTD_MANIFEST_CHECKSUM_ANNOTATIONS,
    ZSTD_MANIFEST_POSITION_ANNOTATION,
    ImageStore,
    check_digest,
    sha256_digest,
    sniff_media_type,
)
from .reference import Reference, parse_reference


def open_store(ref: Reference, **registry_options) -> ImageStore:
    """The store that serves ``ref``: a layout for ``oci:``, a registry otherwise."""
    if ref.is_oci_layout:
        return OCILayoutStore(ref.layout_dir)
    from .registry.store import RegistryStore

    return RegistryStore(ref, **registry_options)


@dataclass
class LayerDescriptor:
    index: int
    digest: str
    media_type: str
    size: int
    annotations: dict = field(default_factory=dict)
    diff_id: str | None = None
    urls: list[str] = field(default_factory=list)

    @property
    def foreign(self) -> bool:
        """A non-distributable layer (see FOREIGN_LAYER_TYPES)."""
        return self.media_type in FOREIGN_LAYER_TYPES

    def foreign_reason(self) -> str:
        where = f" at {self.urls[0]}" if self.urls else ""
        return (f"layer {self.index} is a non-distributable (foreign) layer ({self.media_type}) "
                f"whose blob lives outside the registry{where}; stargz-tui does not fetch it")

    @property
    def toc_digest_annotation(self) -> str | None:
        return self.annotations.get(TOC_DIGEST_ANNOTATION)

    @property
    def uncompressed_size_annotation(self) -> int | None:
        v = self.annotations.get(UNCOMPRESSED_SIZE_ANNOTATION)
        try:
            return int(v) if v is not None else None
        except ValueError:
            return None

    @property
    def zstd_manifest_checksum_key(self) -> str | None:
        """Which manifest-checksum annotation the layer carries (the current
        generation's first), or None."""
        for key in ZSTD_MANIFEST_CHECKSUM_ANNOTATIONS:
            if self.annotations.get(key):
                return key
        return None

    @property
    def zstd_manifest_checksum(self) -> str | None:
        key = self.zstd_manifest_checksum_key
        return self.annotations[key] if key else None

    @property
    def toc_anchor(self) -> str | None:
        """The annotation that anchors trust in the layer's TOC: eStargz's
        toc.digest, else a zstd:chunked manifest checksum; None without one."""
        if self.toc_digest_annotation:
            return TOC_DIGEST_ANNOTATION
        return self.zstd_manifest_checksum_key


@dataclass
class Image:
    reference: Reference
    store: ImageStore
    manifest_digest: str
    manifest: dict
    config: dict
    config_digest: str
    layers: list[LayerDescriptor]
    manifest_media_type: str = OCI_MANIFEST
    index: dict | None = None
    index_digest: str | None = None
    platform: str | None = None
    platforms: list[str] = field(default_factory=list)
    manifest_bytes: bytes = b""

    def layer(self, selector) -> LayerDescriptor:
        """A layer by index (``0``, ``"1"``, ``"-1"``) or digest (full or unique prefix)."""
        s = str(selector).strip()
        try:
            i = int(s)
        except ValueError:
            pass
        else:
            n = len(self.layers)
            if -n <= i < n:
                return self.layers[i]
            raise NotFoundError(f"layer {i} out of range: the image has "
                                + (f"{n} layers (0..{n - 1})" if n != 1 else "1 layer (0)"))
        key = s if s.startswith("sha256:") else "sha256:" + s
        found = [layer for layer in self.layers if layer.digest.startswith(key)]
        if len(found) == 1:
            return found[0]
        if not found:
            raise NotFoundError(f"no layer with digest {s} in {self.reference}")
        raise NotFoundError(f"digest prefix {s} matches {len(found)} layers; give more of it")

    @property
    def os_arch(self) -> str:
        c = self.config
        p = f"{c.get('os', '?')}/{c.get('architecture', '?')}"
        if c.get("variant"):
            p += "/" + c["variant"]
        return p


def host_platform() -> str:
    machine = _platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
            "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}.get(
        machine, machine)
    return f"linux/{arch}"


def _platform_str(p: dict | None) -> str:
    if not isinstance(p, dict):
        return "unknown"
    s = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    if p.get("variant"):
        s += "/" + p["variant"]
    return s


_PLATFORM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*){1,2}$")


def check_platform(text: str) -> str:
    """``text`` if it is ``os/arch[/variant]``; a :class:`ReferenceError_` otherwise."""
    if not _PLATFORM_RE.match(text):
        raise ReferenceError_(f"invalid platform {text!r}: expected os/arch[/variant], "
                              "e.g. linux/amd64 or linux/arm64/v8")
    return text


def check_config_platform(config: dict, platform: str | None) -> None:
    """For an image without an index: ``platform``, when asked for, must be the
    config's (a NotFoundError otherwise, never silently ignored). A config
    that names no os/architecture is not held against it."""
    if platform is None or not isinstance(config, dict):
        return
    if config.get("os") and config.get("architecture") and \
            not _platform_matches(platform, _platform_str(config)):
        raise NotFoundError(f"no manifest for platform {platform}: the image has only "
                            f"{_platform_str(config)}")


def _platform_matches(want: str, have: str) -> bool:
    w, h = want.split("/"), have.split("/")
    if w[:2] != h[:2]:
        return False
    return len(w) < 3 or (len(h) >= 3 and w[2] == h[2])


def _load_json(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{what} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{what} is not a JSON object")
    return doc


def pick_manifest(index: dict, platform: str | None) -> dict:
    """Choose the index entry for ``platform`` (default: this machine's)."""
    raw = index.get("manifests")
    entries = [m for m in (raw if isinstance(raw, list) else []) if isinstance(m, dict)
               and isinstance(m.get("digest"), str)]

    def plat(m: dict) -> dict | None:
        # A platform that is not an object says nothing usable: treat as absent.
        p = m.get("platform")
        return p if isinstance(p, dict) and p else None

    # Attestation manifests (os "unknown") are not runnable images.
    images = [m for m in entries if plat(m) is None or plat(m).get("os") not in (None, "unknown")]
    if not images:
        raise NotFoundError("the image index lists no manifests")
    want = platform or host_platform()
    for m in images:
        if plat(m) and _platform_matches(want, _platform_str(plat(m))):
            return m
    if platform is None and len(images) == 1:
        return images[0]
    avail = ", ".join(_platform_str(plat(m)) for m in images)
    raise NotFoundError(f"no manifest for platform {want} in the index (available: {avail})")


async def fetch_config(store: ImageStore, manifest: dict, manifest_digest: str) -> dict:
    """The manifest's config, fetched and verified against its digest."""
    cfg_desc = manifest.get("config")
    if not isinstance(cfg_desc, dict) or not isinstance(cfg_desc.get("digest"), str):
        raise FormatError(f"manifest {manifest_digest[:19]} has no config descriptor")
    cfg_bytes = await store.get_blob_bytes(cfg_desc["digest"], cfg_desc.get("size"))
    return _load_json(cfg_bytes, "image config")


async def open_image(ref: Reference | str, *, store: ImageStore | None = None,
                     platform: str | None = None, with_config: bool = True,
                     **registry_options) -> Image:
    """Resolve ``ref`` to one image manifest, its config and layers.

    ``with_config=False`` leaves the config blob to the caller (a mount
    daemon checks it with :func:`fetch_config` while it resolves the layer,
    instead of before): ``config`` is then ``{}`` and the layers' ``diff_id``
    None."""
    if isinstance(ref, str):
        ref = parse_reference(ref)
    if platform is not None:
        check_platform(platform)
    if store is None:
        store = open_store(ref, **registry_options)
    data, media_type, digest = await store.get_manifest(ref)
    doc = _load_json(data, f"manifest {digest[:19]}")
    media_type = doc.get("mediaType") or media_type
    index = index_digest = None
    platforms: list[str] = []
    if media_type in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
        index, index_digest = doc, digest
        platforms = [_platform_str(m.get("platform")) for m in doc.get("manifests", [])
                     if isinstance(m, dict)]
        chosen = pick_manifest(doc, platform)
        child = ref.with_digest(chosen["digest"])
        data, media_type, digest = await store.get_manifest(child)
        doc = _load_json(data, f"manifest {digest[:19]}")
        media_type = doc.get("mediaType") or chosen.get("mediaType") or media_type
    if media_type not in MANIFEST_TYPES:
        raise FormatError(f"unsupported manifest media type {media_type!r}")
    config = await fetch_config(store, doc, digest) if with_config else {}
    if index is None:
        check_config_platform(config, platform)
    return _make_image(ref, store, doc, data, media_type, digest, config, index, index_digest,
                       platforms)


def _make_image(ref: Reference, store: ImageStore, doc: dict, data: bytes, media_type: str,
                digest: str, config: dict, index: dict | None, index_digest: str | None,
                platforms: list[str]) -> Image:
    cfg_desc = doc.get("config")
    if not isinstance(cfg_desc, dict) or not isinstance(cfg_desc.get("digest"), str):
        raise FormatError(f"manifest {digest[:19]} has no config descriptor")
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        diff_ids = []
    layers = []
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise FormatError(f"manifest {digest[:19]} has no layers list")
    for i, ld in enumerate(raw_layers):
        if not isinstance(ld, dict) or not isinstance(ld.get("digest"), str):
            raise FormatError(f"layer {i} of manifest {digest[:19]} has no digest")
        size = ld.get("size")
        if not isinstance(size, int) or size < 0:
            raise FormatError(f"layer {i} of manifest {digest[:19]} has no valid size")
        layers.append(LayerDescriptor(
            index=i, digest=ld["digest"], media_type=ld.get("mediaType", ""), size=size,
            annotations=dict(ld.get("annotations") or {}),
            diff_id=diff_ids[i] if i < len(diff_ids) else None,
            urls=[u for u in ld.get("urls") or [] if isinstance(u, str)],
        ))
    return Image(
        reference=ref, store=store, manifest_digest=digest, manifest=doc, config=config,
        config_digest=cfg_desc["digest"], layers=layers, manifest_media_type=media_type,
        index=index, index_digest=index_digest,
        platform=_platform_str(config),
        platforms=platforms, manifest_bytes=data,
    )


def dump_image(img: Image) -> dict:
    """A resolved image as JSON-able data (see :func:`image_from_dump`): what a
    mount daemon needs so it does not fetch the manifest and config again."""
    import base64

    return {"reference": str(img.reference), "manifest": base64.b64encode(
                img.manifest_bytes or json.dumps(img.manifest).encode()).decode(),
            "manifestDigest": img.manifest_digest, "mediaType": img.manifest_media_type,
            "config": img.config, "index": img.index, "indexDigest": img.index_digest,
            "platforms": img.platforms, "manifestExact": bool(img.manifest_bytes)}


def image_from_dump(d: dict, store: ImageStore, ref: Reference | str | None = None) -> Image:
    """The :class:`Image` that :func:`dump_image` wrote, on ``store``; the manifest
    is checked against its digest."""
    import base64

    if ref is None:
        ref = d["reference"]
    if isinstance(ref, str):
        ref = parse_reference(ref)
    data = base64.b64decode(d["manifest"])
    digest = d["manifestDigest"]
    if d.get("manifestExact") and digest.startswith("sha256:"):
        check_digest(data, digest, "manifest")
    doc = _load_json(data, f"manifest {digest[:19]}")
    return _make_image(ref, store, doc, data, d.get("mediaType") or OCI_MANIFEST, digest,
                       d.get("config") or {}, d.get("index"), d.get("indexDigest"),
                       list(d.get("platforms") or []))
