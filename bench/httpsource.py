"""Blob sources over the loopback registry for in-process measurements.

``open_source(registry_url, repo, digest, size)`` returns the project's
``RegistryBlobSource`` when ``core.registry`` provides one, else
:class:`HttpRangeSource`, a minimal Range-GET source on one
``httpx.AsyncClient`` (plain HTTP to loopback, no auth).
"""

from __future__ import annotations

import httpx

from core.errors import BlobReadError


class HttpRangeSource:
    def __init__(self, url: str, digest: str, size: int):
        self.url = url
        self.digest = digest
        self.size = size
        self.client = httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=16))
        self.requests = 0
        self.bytes_read = 0

    @property
    def description(self) -> str:
        return self.url

    async def read_range(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        r = await self.client.get(self.url, headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        if r.status_code not in (200, 206):
            raise BlobReadError(f"GET {self.url}: HTTP {r.status_code}")
        data = r.content
        if r.status_code == 200:
            data = data[offset : offset + length]
        if len(data) != length:
            raise BlobReadError(f"short read {len(data)} != {length}")
        self.requests += 1
        self.bytes_read += length
        return data

    async def aclose(self) -> None:
        await self.client.aclose()


async def open_source(registry_url: str, repo: str, digest: str, size: int):
    """(source, description) for the blob."""
    host = registry_url.split("://", 1)[1]
    try:
        from core.image import open_image  # noqa: F401
        from core.reference import parse_reference
        from core.registry import RegistryStore  # type: ignore[attr-defined]

        ref = parse_reference(f"{host}/{repo}@{digest}")
        store = RegistryStore(ref)
        return store.blob_source(digest, size), "core.registry.RegistryBlobSource"
    except Exception:  # noqa: BLE001 - not there yet, or a different shape
        pass
    url = f"{registry_url}/v2/{repo}/blobs/{digest}"
    return HttpRangeSource(url, digest, size), "bench.httpsource.HttpRangeSource (core.registry not available)"
