"""A registry as the destination of ``convert``: the ``ImageWriter`` of
core/convert.py over the monolithic upload and manifest PUT in push.py."""

from __future__ import annotations

from ..errors import RegistryError
from ..reference import Reference, parse_reference
from .client import RegistryClient
from .push import blob_exists, push_blob, push_manifest


class RegistryImageWriter:
    """Writes blobs and manifests into one repository of a registry."""

    def __init__(self, ref: Reference | str, *, client: RegistryClient | None = None,
                 **client_opts):
        if isinstance(ref, str):
            ref = parse_reference(ref)
        if ref.transport != "docker":
            raise RegistryError(f"{ref} is not a registry reference")
        self.ref = ref
        self.repo = ref.repository
        self._own_client = client is None
        self.client = client or RegistryClient(ref.registry, **client_opts)

    async def has_blob(self, digest: str) -> bool:
        return await blob_exists(self.client, self.repo, digest)

    async def put_blob_file(self, path: str, digest: str, size: int, media_type: str) -> None:
        await push_blob(self.client, self.repo, digest, path=path, size=size)

    async def put_blob_bytes(self, data: bytes, digest: str, media_type: str) -> None:
        await push_blob(self.client, self.repo, digest, data=data)

    async def put_manifest(self, data: bytes, digest: str, media_type: str,
                           tag: str | None) -> None:
        # Pushed by digest first (so an untagged result still lands), then
        # under the tag when there is one.
        await push_manifest(self.client, self.repo, digest, data, media_type)
        if tag:
            await push_manifest(self.client, self.repo, tag, data, media_type)

    async def aclose(self) -> None:
        if self._own_client:
            await self.client.aclose()
