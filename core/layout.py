"""An OCI image layout directory (``index.json`` + ``blobs/``) as an
:class:`core.oci.ImageStore`."""

from __future__ import annotations

import json
import os

from .errors import FormatError, NotFoundError
from .oci import (
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    REF_NAME_ANNOTATION,
    check_digest,
    sniff_media_type,
)
from .reference import Reference
from .source import BlobSource, LocalBlobSource


def blob_path(root: str, digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    if not algo.isalnum() or not hexpart or not all(c in "0123456789abcdef" for c in hexpart):
        raise FormatError(f"invalid digest {digest!r}")
    return os.path.join(root, "blobs", algo, hexpart)


class OCILayoutStore:
    """An OCI image layout directory (``index.json`` + ``blobs/``)."""

    def __init__(self, layout_dir: str):
        self.root = layout_dir
        index_path = os.path.join(layout_dir, "index.json")
        try:
            with open(index_path, "rb") as f:
                self.index = json.loads(f.read(MAX_MANIFEST_BYTES))
        except FileNotFoundError:
            raise NotFoundError(f"no OCI layout at {layout_dir} (index.json not found)") from None
        except (OSError, ValueError) as e:
            raise FormatError(f"cannot read {index_path}: {e}") from None
        if not isinstance(self.index, dict) or not isinstance(self.index.get("manifests"), list):
            raise FormatError(f"{index_path} is not an OCI image index")
        # Entries that are not descriptors (objects) are ignored, not crashed on.
        self.index["manifests"] = [m for m in self.index["manifests"] if isinstance(m, dict)]

    def tags(self) -> list[str]:
        out = []
        for m in self.index["manifests"]:
            name = (m.get("annotations") or {}).get(REF_NAME_ANNOTATION)
            if name:
                out.append(name)
        return out

    def read_blob(self, digest: str, limit: int) -> bytes:
        path = blob_path(self.root, digest)
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is missing from {self.root}") from None
        except OSError as e:
            raise FormatError(f"cannot read blob {digest}: {e.strerror}") from None
        if len(data) > limit:
            raise FormatError(f"blob {digest} is larger than {limit} bytes; refused")
        check_digest(data, digest, f"blob {digest[:19]}")
        return data

    async def get_manifest(self, ref: Reference) -> tuple[bytes, str, str]:
        desc = None
        if ref.digest:
            desc = {"digest": ref.digest}
            for m in self.index["manifests"]:
                if m.get("digest") == ref.digest:
                    desc = m
        else:
            manifests = self.index["manifests"]
            if ref.tag:
                matches = [m for m in manifests
                           if (m.get("annotations") or {}).get(REF_NAME_ANNOTATION) == ref.tag]
                if not matches:
                    tags = ", ".join(self.tags()[:12]) or "none"
                    raise NotFoundError(f"tag '{ref.tag}' not found in {self.root} (tags: {tags})")
                desc = matches[0]
            elif len(manifests) == 1:
                desc = manifests[0]
            else:
                raise NotFoundError(
                    f"{self.root} holds {len(manifests)} images; name one as oci:{self.root}:TAG"
                )
        digest = desc.get("digest")
        if not isinstance(digest, str):
            raise FormatError(f"{self.root}/index.json has a manifest without a digest")
        data = self.read_blob(digest, MAX_MANIFEST_BYTES)
        media_type = desc.get("mediaType") or sniff_media_type(data)
        return data, media_type, digest

    async def get_blob_bytes(self, digest: str, size: int | None = None, *,
                             limit: int = MAX_CONFIG_BYTES) -> bytes:
        return self.read_blob(digest, limit)

    def blob_source(self, digest: str, size: int) -> BlobSource:
        path = blob_path(self.root, digest)
        if not os.path.exists(path):
            raise NotFoundError(f"blob {digest} is missing from {self.root}")
        return LocalBlobSource(path, digest, size)

    async def aclose(self) -> None:
        return None
