"""Blob sources: where a layer's compressed bytes come from.

A source gives random access to one content-addressed blob. The lazy reader,
the resolver and the verifiers only use this interface, so a layer read from
an OCI layout on disk and one read from a registry behave the same.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

import anyio
import anyio.to_thread

from .errors import BlobReadError


@runtime_checkable
class BlobSource(Protocol):
    """Random access to one blob. ``read_range`` returns exactly ``length``
    bytes (clipped at the blob's end) or raises :class:`BlobReadError`."""

    digest: str
    size: int

    @property
    def description(self) -> str: ...

    async def read_range(self, offset: int, length: int) -> bytes: ...

    async def aclose(self) -> None: ...


class LocalBlobSource:
    """A blob in a local file (an OCI layout's ``blobs/sha256/...``)."""

    def __init__(self, path: str | os.PathLike, digest: str, size: int | None = None):
        self.path = os.fspath(path)
        self.digest = digest
        try:
            actual = os.stat(self.path).st_size
        except OSError as e:
            raise BlobReadError(f"cannot open blob {digest}: {e.strerror}") from None
        self.size = actual if size is None else size
        self.bytes_read = 0
        self.requests = 0

    @property
    def description(self) -> str:
        return self.path

    def _pread(self, offset: int, length: int) -> bytes:
        try:
            with open(self.path, "rb") as f:
                data = os.pread(f.fileno(), length, offset)
        except OSError as e:
            raise BlobReadError(f"cannot read blob {self.digest}: {e.strerror}") from None
        return data

    async def read_range(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise BlobReadError(f"invalid range {offset}+{length} of blob {self.digest}")
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        data = await anyio.to_thread.run_sync(self._pread, offset, length)
        if len(data) != length:
            raise BlobReadError(
                f"short read of blob {self.digest}: wanted {length} bytes at {offset}, got {len(data)}"
            )
        self.requests += 1
        self.bytes_read += len(data)
        return data

    async def aclose(self) -> None:
        return None
