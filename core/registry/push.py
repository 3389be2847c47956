"""Writing to a registry: monolithic blob upload, manifest PUT, and copying an
image from an OCI layout (used by ``convert`` and by the tests to load fixtures).
"""

from __future__ import annotations

import json
import os
from urllib.parse import urlencode, urljoin, urlsplit

import anyio.to_thread

from ..errors import FormatError, NotFoundError, RegistryError
from ..layout import OCILayoutStore, blob_path
from ..oci import INDEX_TYPES, sha256_digest
from ..reference import Reference, parse_reference
from .auth import repository_scope
from .client import RegistryClient, raise_for_reply

# Blobs up to this size are uploaded from memory; larger ones are streamed from disk.
_IN_MEMORY = 64 << 20


async def blob_exists(client: RegistryClient, repo: str, digest: str) -> bool:
    reply = await client.request("HEAD", f"/v2/{repo}/blobs/{digest}",
                                 scope=repository_scope(repo, "pull,push"))
    if reply.status == 404:
        return False
    raise_for_reply(reply, f"HEAD blob {digest[:19]} in {repo}")
    return True


def _file_chunks(path: str, chunk: int = 1 << 20):
    def factory():
        async def gen():
            with open(path, "rb") as f:
                while True:
                    b = await anyio.to_thread.run_sync(f.read, chunk)
                    if not b:
                        return
                    yield b
        return gen()
    return factory


async def push_blob(client: RegistryClient, repo: str, digest: str, *, data: bytes | None = None,
                    path: str | None = None, size: int | None = None) -> bool:
    """Upload one blob (POST then PUT ``?digest=``); False when it was already there."""
    if await blob_exists(client, repo, digest):
        return False
    scope = repository_scope(repo, "pull,push")
    reply = await client.request("POST", f"/v2/{repo}/blobs/uploads/", scope=scope,
                                 headers={"Content-Length": "0"})
    raise_for_reply(reply, f"starting an upload to {repo}")
    location = reply.headers.get("location")
    if not location:
        raise RegistryError(f"registry {client.api_host} started an upload without a Location")
    url = urljoin(client.origin + "/", location)
    if urlsplit(url).netloc != urlsplit(client.origin).netloc:
        raise RegistryError(f"registry {client.api_host} sent an upload location on another host")
    url += ("&" if urlsplit(url).query else "?") + urlencode({"digest": digest})
    if data is not None:
        body, length = data, len(data)
    else:
        length = size if size is not None else os.path.getsize(path)
        if length > _IN_MEMORY:
            body = _file_chunks(path)
        else:
            with open(path, "rb") as f:
                body = f.read()
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
    reply = await client.request("PUT", "", url=url, scope=scope, headers=headers, content=body)
    raise_for_reply(reply, f"uploading blob {digest[:19]} to {repo}")
    got = reply.headers.get("docker-content-digest")
    if got and got != digest:
        raise RegistryError(f"registry {client.api_host} stored blob {digest[:19]} as {got}")
    return True


async def push_manifest(client: RegistryClient, repo: str, reference: str, data: bytes,
                        media_type: str) -> str:
    """PUT a manifest under a tag or digest; returns its digest."""
    digest = sha256_digest(data)
    reply = await client.request("PUT", f"/v2/{repo}/manifests/{reference}",
                                 scope=repository_scope(repo, "pull,push"),
                                 headers={"Content-Type": media_type}, content=data)
    raise_for_reply(reply, f"pushing manifest {repo}:{reference}")
    got = reply.headers.get("docker-content-digest")
    if got and got != digest:
        raise RegistryError(f"registry {client.api_host} stored manifest as {got}, "
                            f"expected {digest}")
    return digest


async def _push_manifest_tree(client, layout: OCILayoutStore, repo: str, digest: str,
                              media_type: str, reference: str) -> str:
    data = layout.read_blob(digest, 4 << 20)
    doc = json.loads(data)
    mt = doc.get("mediaType") or media_type
    if mt in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
        for m in doc.get("manifests", []):
            await _push_manifest_tree(client, layout, repo, m["digest"],
                                      m.get("mediaType", ""), m["digest"])
    else:
        blobs = [doc["config"], *doc.get("layers", [])]
        for desc in blobs:
            path = blob_path(layout.root, desc["digest"])
            if not os.path.exists(path):
                raise NotFoundError(f"blob {desc['digest']} is missing from {layout.root}")
            await push_blob(client, repo, desc["digest"], path=path, size=desc.get("size"))
    if not mt:
        raise FormatError(f"manifest {digest[:19]} in {layout.root} has no media type")
    return await push_manifest(client, repo, reference, data, mt)


async def push_oci_layout(layout_dir: str, tag: str | None, dest_ref: Reference | str, *,
                          client: RegistryClient | None = None, **client_opts) -> str:
    """Copy one image (index or manifest, config, layers) from an OCI layout to a registry.

    ``tag`` selects the image in the layout (``org.opencontainers.image.ref.name``;
    None when the layout holds one image); ``dest_ref`` names where it goes
    (its tag, else ``tag``). Returns the pushed manifest's digest."""
    if isinstance(dest_ref, str):
        dest_ref = parse_reference(dest_ref)
    if dest_ref.transport != "docker":
        raise RegistryError(f"{dest_ref} is not a registry reference")
    layout = OCILayoutStore(layout_dir)
    src = Reference("oci", tag=tag, layout_dir=layout_dir)
    _, media_type, digest = await layout.get_manifest(src)
    own = client is None
    client = client or RegistryClient(dest_ref.registry, **client_opts)
    try:
        reference = dest_ref.tag or tag or digest
        if dest_ref.digest and dest_ref.digest != digest:
            raise RegistryError(f"{dest_ref} does not match the layout's manifest {digest}")
        return await _push_manifest_tree(client, layout, dest_ref.repository, digest, media_type,
                                         reference)
    finally:
        if own:
            await client.aclose()
