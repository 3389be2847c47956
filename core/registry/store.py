"""The registry as an :class:`core.oci.ImageStore`, and blobs as :class:`core.source.BlobSource`.

:class:`RegistryStore` fetches manifests (verified against the digest they were
asked by and against ``Docker-Content-Digest``), small blobs (verified) and
hands out :class:`RegistryBlobSource` objects for lazy Range reads. Content
is read from the configured mirrors first, falling back to the registry.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

import anyio

from ..errors import (
    AuthError,
    BlobReadError,
    CoreError,
    CredentialsRejectedError,
    DigestMismatchError,
    FormatError,
    InsecureRedirectError,
    NotFoundError,
    RegistryError,
    RequestTimeoutError,
)
from ..oci import (
    ACCEPTED_MANIFEST_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_CONFIG_BYTES,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    sha256_digest,
)
from ..reference import Reference
from .auth import repository_scope
from .bulk import BulkUnavailable
from .client import RegistryClient, Reply, raise_for_reply, same_origin
from .config import RegistryConfig
from .credentials import Credentials

log = logging.getLogger(__name__)

ACCEPT = ", ".join(ACCEPTED_MANIFEST_TYPES)
SCHEMA1_TYPES = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
# A server ignoring Range sends the whole blob; accept that only for blobs this small.
MAX_UNRANGED_BLOB = 64 << 20
# Errors that a fresh token and a fresh redirect cannot cure: never retried.
FINAL_ERRORS = (CredentialsRejectedError, RequestTimeoutError, InsecureRedirectError)
# Wrong answers that they may cure (a short body or another range from a stale
# redirect, a 401/403 a renewed token answers), retried by the policy. What
# the client already retried (no answer, 429/5xx) is passed up as it is.
REFRESHABLE_ERRORS = (BlobReadError, AuthError)
# Ranges at least this long are first tried on the client's bulk reader (a
# blocking receive in a worker thread, see core.registry.bulk), once a regular
# read has shown which URL and credentials serve the blob.
BULK_MIN = 1 << 20


def _media_type(reply: Reply) -> str:
    return reply.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _sniff(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    if isinstance(doc.get("mediaType"), str):
        return doc["mediaType"]
    if doc.get("schemaVersion") == 1:
        return SCHEMA1_TYPES[0]
    if "manifests" in doc:
        return OCI_INDEX
    if "layers" in doc:
        return OCI_MANIFEST
    return None


def check_manifest_media_type(media_type: str, body: bytes, where: str) -> str:
    """The manifest's media type, or :class:`FormatError` when we cannot use it."""
    mt = media_type
    if mt not in ACCEPTED_MANIFEST_TYPES:
        if mt in ("", "application/json", "text/plain", "application/octet-stream"):
            mt = _sniff(body) or mt
    if mt in SCHEMA1_TYPES:
        raise FormatError(f"{where} is a Docker schema 1 manifest ({mt}), which is not supported; "
                          "re-push the image with a current tool")
    if mt not in ACCEPTED_MANIFEST_TYPES:
        raise FormatError(f"{where} has unsupported media type {mt or 'none'!r} (expected an OCI "
                          "or Docker v2 manifest or index)")
    return mt


class RegistryStore:
    """Manifests and blobs of one registry (see ``ImageStore`` in docs/CONTRACTS.md).

    Options: ``insecure_registries`` (hosts allowed plain HTTP), ``config``
    (:class:`RegistryConfig`; default: the configuration file), ``credentials``
    (skip the lookup), ``use_keyring``, ``client`` (share a :class:`RegistryClient`),
    plus ``RegistryClient`` tuning (``deadline``, ``timeout``, ``max_attempts``, ...).
    """

    def __init__(self, ref: Reference, *, client: RegistryClient | None = None,
                 insecure_registries=(), config: RegistryConfig | None = None,
                 credentials: Credentials | None = None, use_keyring: bool = True, **client_opts):
        if ref.transport != "docker":
            raise RegistryError(f"{ref} is not a registry reference")
        self.ref = ref
        self.registry = ref.registry
        self._own_client = client is None
        self.client = client or RegistryClient(
            ref.registry, insecure_registries=insecure_registries, config=config,
            credentials=credentials, use_keyring=use_keyring, **client_opts)
        self._good_base: str | None = None

    @property
    def host(self) -> str:
        return self.client.api_host

    def _repo(self, ref: Reference | None) -> str:
        ref = ref or self.ref
        if ref.transport != "docker" or ref.registry != self.registry:
            raise RegistryError(f"{ref} is not on registry {self.registry}")
        return ref.repository

    def _bases(self) -> list[str]:
        bases = self.client.pull_bases()
        if self._good_base in bases:
            bases.remove(self._good_base)
            bases.insert(0, self._good_base)
        return bases

    async def _pull(self, method: str, path: str, repo: str, *, headers: dict,
                    limit: int) -> Reply:
        """GET/HEAD from mirrors in order, then the registry (whose answer is final)."""
        bases = self._bases()
        for base in bases:
            final = base == self.client.origin or base == bases[-1]
            try:
                reply = await self.client.request(method, path, base=base, headers=headers,
                                                  scope=repository_scope(repo), limit=limit)
            except (RegistryError, FormatError) as e:
                if final:
                    raise
                log.info("mirror %s failed (%s); trying the next", base, e)
                continue
            if reply.ok or final:
                if reply.ok:
                    self._good_base = base
                return reply
            log.info("mirror %s answered %s for %s; trying the next", base, reply.status, path)
        raise RegistryError(f"registry {self.host}: no source answered {path}")

    # -- ImageStore ------------------------------------------------------------------

    async def _repository_unknown(self, repo: str, reply: Reply) -> bool:
        """After a manifest 404: is the repository itself unknown? Distribution
        answers MANIFEST_UNKNOWN for a tag of a missing repository too, so the
        tags list (one small page) is asked; only NAME_UNKNOWN there says so."""
        if "NAME_UNKNOWN" in reply.error_codes():
            return True
        try:
            tags = await self._pull("GET", f"/v2/{repo}/tags/list?n=1", repo,
                                    headers={"Accept": "application/json"}, limit=65536)
        except (RegistryError, FormatError):
            return False
        return tags.status == 404 and "NAME_UNKNOWN" in tags.error_codes()

    async def get_manifest(self, ref: Reference) -> tuple[bytes, str, str]:
        repo = self._repo(ref)
        sel = ref.selector
        reply = await self._pull("GET", f"/v2/{repo}/manifests/{sel}", repo,
                                 headers={"Accept": ACCEPT}, limit=MAX_MANIFEST_BYTES)
        name = f"{self.registry}/{repo}"
        if reply.status == 404 and await self._repository_unknown(repo, reply):
            raise NotFoundError(f"repository {name} not found (NAME_UNKNOWN)")
        raise_for_reply(reply, f"manifest {name}:{sel}" if not ref.digest else
                        f"manifest {name}@{sel}",
                        not_found=(f"manifest {ref.digest} not found in {name}" if ref.digest
                                   else f"tag '{sel}' not found in {name}"))
        body = reply.body
        digest = sha256_digest(body)
        where = f"manifest of {ref}"
        if ref.digest and ref.digest != digest:
            raise DigestMismatchError(
                f"manifest fetched by digest from {self.host} does not match: expected "
                f"{ref.digest}, got {digest}")
        header = reply.headers.get("docker-content-digest")
        if header and header.startswith("sha256:") and header != digest:
            raise DigestMismatchError(
                f"manifest {name}:{sel} from {self.host} does not match its Docker-Content-Digest: "
                f"header says {header}, content is {digest}")
        mt = check_manifest_media_type(_media_type(reply), body, where)
        return body, mt, digest

    async def head_manifest(self, ref: Reference) -> tuple[str, str | None, int | None]:
        """(media type, digest from Docker-Content-Digest or None, size or None)."""
        repo = self._repo(ref)
        reply = await self._pull("HEAD", f"/v2/{repo}/manifests/{ref.selector}", repo,
                                 headers={"Accept": ACCEPT}, limit=1 << 20)
        raise_for_reply(reply, f"manifest {ref}", not_found=f"{ref}: not found")
        size = reply.headers.get("content-length")
        return (_media_type(reply), reply.headers.get("docker-content-digest"),
                int(size) if size and size.isdigit() else None)

    async def get_blob_bytes(self, digest: str, size: int | None = None, *,
                             limit: int = MAX_CONFIG_BYTES) -> bytes:
        repo = self._repo(None)
        if size is not None and size > limit:
            raise FormatError(f"blob {digest} is {size} bytes, more than {limit}; refused")
        reply = await self._pull("GET", f"/v2/{repo}/blobs/{digest}", repo, headers={},
                                 limit=limit)
        raise_for_reply(reply, f"blob {digest[:19]}",
                        not_found=f"blob {digest} not found in {self.registry}/{repo}")
        got = sha256_digest(reply.body)
        if got != digest:
            raise DigestMismatchError(f"blob {digest} from {self.host} does not match its "
                                      f"digest (got {got})")
        return reply.body

    def blob_source(self, digest: str, size: int) -> RegistryBlobSource:
        return RegistryBlobSource(self, self._repo(None), digest, size)

    async def aclose(self) -> None:
        if self._own_client:
            await self.client.aclose()

    # -- listing ---------------------------------------------------------------------

    def iter_tags(self, page_size: int | None = None) -> AsyncIterator[str]:
        return self.client.iter_tags(self._repo(None), page_size)

    async def resolve(self, ref: Reference) -> tuple[bytes, str, str, bool]:
        """(manifest, media type, digest, is_index) of ``ref``."""
        body, mt, digest = await self.get_manifest(ref)
        return body, mt, digest, mt in INDEX_TYPES


class RegistryBlobSource:
    """A blob read lazily with HTTP Range GETs (``core.source.BlobSource``).

    Redirects to blob storage are cached and reused without credentials; when
    the cached (signed) URL stops working the registry is asked again. A wrong
    answer (short, another range, 401/403) is asked again after a refresh
    (new token, new redirect) by the client's ``RequestPolicy``; a read the
    client has already retried (no answer, 429/5xx, the deadline) fails at
    once with its typed error: nothing above retries it again.

    Reads of at least ``bulk_min`` bytes go through the client's bulk reader
    to the URL the last regular read was served from (with the credentials
    the client would send there); any answer but the exact range makes the
    read repeat on the regular path, which owns retries, renewal and errors.
    """

    bulk_min = BULK_MIN

    def __init__(self, store: RegistryStore, repository: str, digest: str, size: int):
        self.store = store
        self.client = store.client
        self.repository = repository
        self.digest = digest
        self.size = size
        self.requests = 0
        self.bytes_read = 0
        self.refreshes = 0
        self.retries = 0  # range reads asked again after a wrong answer
        self.bulk_reads = 0
        self._redirect_url: str | None = None
        # (url, base whose credentials it takes or None) of the last good read
        self._bulk_target: tuple[str, str | None] | None = None

    @property
    def description(self) -> str:
        return f"{self.store.registry}/{self.repository}@{self.digest}"

    async def refresh(self) -> None:
        """Forget the cached redirect and the repository's tokens (async, as
        the callers that refresh a ``BlobSource`` await it)."""
        self._redirect_url = None
        self._bulk_target = None
        self.client.invalidate_tokens(repository_scope(self.repository))
        self.refreshes += 1

    async def read_range(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise BlobReadError(f"invalid range {offset}+{length} of blob {self.digest}")
        length = max(0, min(length, self.size - offset))
        if length == 0:
            return b""
        try:
            with self.client.policy.bounded(f"registry {self.store.host}: bytes "
                                            f"{offset}-{offset + length - 1} of the blob"):
                return await self._read(offset, length)
        except BlobReadError:
            raise
        except CoreError as e:
            raise BlobReadError(f"cannot read blob {self.digest[:19]} from {self.store.host}: "
                                f"{e}") from None

    async def _read(self, offset: int, length: int) -> bytes:
        data = await self._bulk(offset, length) if length >= self.bulk_min else None
        if data is not None:
            self.requests += 1
            self.bulk_reads += 1
            self.bytes_read += len(data)
            return data
        policy = self.client.policy  # core.registry.policy: the one retry policy
        started = time.monotonic()
        attempt = 1
        while True:
            try:
                data = await self._fetch(offset, length)
                break
            except FINAL_ERRORS:
                raise
            except REFRESHABLE_ERRORS as e:
                delay = policy.retry_delay(attempt, None)
                if not policy.may_retry(attempt, started, delay):
                    raise
                log.info("range read of %s: %s; refreshing the URL and tokens, attempt %d",
                         self.digest[:19], e, attempt + 1)
                self.retries += 1
                await self.refresh()
                await anyio.sleep(delay)
                attempt += 1
        self.requests += 1
        self.bytes_read += len(data)
        return data

    async def _bulk(self, offset: int, length: int) -> bytes | None:
        """The range from the bulk reader, or None (then the regular path reads it)."""
        target = self._bulk_target
        if target is None:
            return None
        reader = self.client.bulk_reader()
        if reader is None:
            return None
        url, auth_base = target
        headers = {}
        try:
            if auth_base is not None:
                auth = await self.client.auth.header(auth_base, repository_scope(self.repository))
                if auth:
                    headers["Authorization"] = auth
            return await reader.read(url, headers, offset, length)
        except (BulkUnavailable, CoreError) as e:
            log.debug("bulk read of %s %d+%d: %s; reading it the regular way",
                      self.digest[:19], offset, length, e)
            return None

    def _slice(self, reply: Reply, offset: int, length: int) -> bytes | None:
        if reply.status == 206:
            cr = reply.headers.get("content-range", "")
            if cr.startswith("bytes "):
                try:
                    start = int(cr[6:].split("-", 1)[0])
                except ValueError:
                    start = offset
                if start != offset:
                    raise BlobReadError(f"registry {reply.host} answered range {cr!r} for "
                                        f"bytes {offset}-{offset + length - 1} of {self.digest[:19]}")
            data = reply.body
        elif reply.status == 200:
            data = reply.body[offset:offset + length]
        else:
            return None
        if len(data) != length:
            raise BlobReadError(f"short read of blob {self.digest[:19]} from {reply.host}: wanted "
                                f"{length} bytes at {offset}, got {len(data)}")
        return data

    async def _fetch(self, offset: int, length: int) -> bytes:
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        limit = self.size if self.size <= MAX_UNRANGED_BLOB else length
        limit = max(limit, length) + 1024
        url = self._redirect_url
        if url:
            try:
                reply = await self.client.get_url(url, headers=headers, limit=limit)
                data = self._slice(reply, offset, length)
                if data is not None:
                    if reply.status == 206:
                        self._bulk_target = (url, None)
                    return data
                log.info("cached blob URL answered %s; asking the registry again", reply.status)
            except RegistryError as e:
                log.info("cached blob URL failed (%s); asking the registry again", e)
            self._redirect_url = None
        repo = self.repository
        reply = await self.store._pull("GET", f"/v2/{repo}/blobs/{self.digest}", repo,
                                       headers=headers, limit=limit)
        raise_for_reply(reply, f"blob {self.digest[:19]}",
                        not_found=f"blob {self.digest} not found in {self.description}")
        data = self._slice(reply, offset, length)
        if data is None:
            raise BlobReadError(f"registry {reply.host} answered HTTP {reply.status} for a range "
                                f"of blob {self.digest[:19]}")
        if reply.redirected:
            self._redirect_url = reply.url
        if reply.status == 206:
            base = self.store._good_base
            self._bulk_target = (reply.url, base if base and not reply.redirected
                                 and same_origin(reply.url, base) else None)
        return data

    async def aclose(self) -> None:
        return None


__all__ = ["RegistryStore", "RegistryBlobSource", "ACCEPT", "check_manifest_media_type",
           "MANIFEST_TYPES", "NotFoundError"]
