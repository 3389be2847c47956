"""OCI vocabulary shared by every image store: media types, annotations,
size limits, digests, and the :class:`ImageStore` protocol.

The layout store (``core.layout``) and the registry store (``core.registry``)
both import this module and nothing above it; ``core.image`` builds images
on top of either.
"""

from __future__ import annotations

import hashlib
import json
from typing import Protocol

from .errors import DigestMismatchError, FormatError
from .reference import Reference
from .source import BlobSource

# Media types.
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPTED_MANIFEST_TYPES = INDEX_TYPES + MANIFEST_TYPES
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)

# Non-distributable ("foreign") layers: their blobs live at the descriptor's
# ``urls``, outside the registry, under their owner's terms; we never fetch them.
FOREIGN_LAYER_TYPES = (
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)

# Annotations.
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
# zstd:chunked, as containers/storage writes it: the older generation (podman
# 4.x) under ``io.containers.``, the current one under ``io.github.containers.``.
# The manifest checksum (sha256 of the compressed TOC) is that format's TOC
# trust anchor, as the toc.digest annotation is eStargz's.
ZSTD_MANIFEST_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
ZSTD_MANIFEST_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"
ZSTD2_PREFIX = "io.github.containers.zstd-chunked."
ZSTD2_MANIFEST_CHECKSUM_ANNOTATION = ZSTD2_PREFIX + "manifest-checksum"
ZSTD2_MANIFEST_POSITION_ANNOTATION = ZSTD2_PREFIX + "manifest-position"
ZSTD2_TARSPLIT_POSITION_ANNOTATION = ZSTD2_PREFIX + "tarsplit-position"
ZSTD_MANIFEST_CHECKSUM_ANNOTATIONS = (ZSTD2_MANIFEST_CHECKSUM_ANNOTATION,
                                      ZSTD_MANIFEST_CHECKSUM_ANNOTATION)
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

# Manifests and configs are small; refuse to buffer anything larger.
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 16 << 20


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(data: bytes, digest: str, what: str) -> None:
    algo, _, _ = digest.partition(":")
    if algo != "sha256":
        raise FormatError(f"unsupported digest algorithm in {digest!r}")
    got = sha256_digest(data)
    if got != digest:
        raise DigestMismatchError(f"{what} does not match its digest: expected {digest}, got {got}")


class ImageStore(Protocol):
    """Where manifests and blobs come from (see docs/CONTRACTS.md)."""

    async def get_manifest(self, ref: Reference) -> tuple[bytes, str, str]: ...

    async def get_blob_bytes(self, digest: str, size: int | None = None, *,
                             limit: int = MAX_CONFIG_BYTES) -> bytes: ...

    def blob_source(self, digest: str, size: int) -> BlobSource: ...

    async def aclose(self) -> None: ...


def sniff_media_type(data: bytes) -> str:
    try:
        doc = json.loads(data)
    except ValueError:
        raise FormatError("manifest is not valid JSON") from None
    mt = doc.get("mediaType") if isinstance(doc, dict) else None
    if mt:
        return mt
    if isinstance(doc, dict) and "manifests" in doc:
        return OCI_INDEX
    return OCI_MANIFEST
