"""Convenience entry points for the app: one page of a listing, login, logout."""

from __future__ import annotations

from ..reference import parse_reference, parse_registry
from .auth import CATALOG_SCOPE, repository_scope
from .client import RegistryClient
from .credentials import Credentials

PAGE_SIZE = 100


async def list_repositories(registry: str, last: str | None = None, *, n: int = PAGE_SIZE,
                            **client_opts) -> tuple[list[str], bool]:
    """``(names, more)``: one page of ``registry``'s catalog after ``last``."""
    client = RegistryClient(parse_registry(registry), **client_opts)
    try:
        return await client.list_page("/v2/_catalog", "repositories", CATALOG_SCOPE, n=n,
                                       last=last, what="listing repositories")
    finally:
        await client.aclose()


async def list_tags(repository: str, last: str | None = None, *, n: int = PAGE_SIZE,
                    **client_opts) -> tuple[list[str], bool]:
    """``(tags, more)``: one page of tags of ``repository`` (``host/name``, a tag is ignored)."""
    ref = parse_reference(repository)
    client = RegistryClient(ref.registry, **client_opts)
    try:
        return await client.list_page(f"/v2/{ref.repository}/tags/list", "tags",
                                      repository_scope(ref.repository), n=n, last=last,
                                      what=f"listing tags of {ref.repository}")
    finally:
        await client.aclose()


async def login(registry: str, username: str, password: str, **client_opts) -> str:
    """Check the credentials against the registry, then save them in the keyring.
    Returns the keyring backend's name."""
    from . import credentials

    reg = parse_registry(registry)
    credentials.secure_backend()
    creds = Credentials(username, password, "login")
    client = RegistryClient(reg, credentials=creds, use_keyring=False, **client_opts)
    try:
        await client.check_login()
    finally:
        await client.aclose()
    return credentials.store(reg, creds)


def logout(registry: str) -> bool:
    from . import credentials

    return credentials.delete(parse_registry(registry))
