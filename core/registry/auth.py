"""Registry authentication: challenges, credentials and tokens for one registry.

Contract (:class:`Authenticator`):

* ``WWW-Authenticate`` challenges (Bearer with realm/service/scope, Basic) are
  parsed by :func:`parse_www_authenticate` and remembered per base URL
  (:meth:`Authenticator.remember`); before the first challenge of a base no
  ``Authorization`` is sent there.
* Credentials are looked up (keyring, then files; ``core.registry.credentials``)
  only when a challenge asks for them, once per (registry, repository), in a
  worker thread bounded by :data:`CREDENTIAL_LOOKUP_TIMEOUT`; they never appear
  in logs or error messages.
* Tokens (anonymous, Basic-authenticated, or by the OAuth2 refresh-token flow
  for identity tokens) are cached per (base, scope set) until shortly before
  they expire; a token the registry refused is replaced once, even with
  concurrent callers. Token realms on plain HTTP are refused unless loopback or
  configured insecure.
* Errors are typed: :class:`~core.errors.CredentialsRejectedError` when the
  registry or its token service refuses credentials we sent,
  :class:`~core.errors.AuthError` for everything else about auth.

The authenticator sends nothing itself: the client gives it a ``send``
callable (its own retrying, redirect-following, deadline-bound request), so
retries live in one place (core.registry.policy).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

from ..errors import AuthError, CredentialsRejectedError
from ..reference import is_loopback_host
from . import credentials as _creds
from .config import RegistryConfig
from .credentials import Credentials

log = logging.getLogger(__name__)

CREDENTIAL_LOOKUP_TIMEOUT = 30.0
CATALOG_SCOPE = "registry:catalog:*"
_REASONS = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 410: "Gone", 413: "Payload Too Large",
    416: "Range Not Satisfiable", 429: "Too Many Requests", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
}


def reason(status: int) -> str:
    """``"401 Unauthorized"``: a status as error messages spell it."""
    return f"{status} {_REASONS.get(status, 'HTTP error')}"


def host_of(url: str) -> str:
    return urlsplit(url).netloc


# -- WWW-Authenticate ------------------------------------------------------------------

_PARAM_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic" (lower case)
    params: dict

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scope(self) -> str | None:
        return self.params.get("scope")


def parse_www_authenticate(value: str | None) -> Challenge | None:
    """Parse ``Bearer realm="...",service="...",scope="..."`` or ``Basic realm="..."``."""
    if not value:
        return None
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    scheme = scheme.lower()
    if scheme not in ("bearer", "basic"):
        return None
    params = {}
    for m in _PARAM_RE.finditer(rest):
        v = m.group(2)
        if v.startswith('"'):
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        params[m.group(1).lower()] = v
    return Challenge(scheme, params)


# -- tokens ----------------------------------------------------------------------------

@dataclass
class Token:
    value: str
    expires_at: float  # time.monotonic() deadline

    def valid(self) -> bool:
        return time.monotonic() < self.expires_at


def repository_scope(repository: str, actions: str = "pull") -> str:
    return f"repository:{repository}:{actions}"


def scope_repository(scope: str | None) -> str | None:
    """The repository a ``repository:NAME:ACTIONS`` scope names, else None."""
    if scope and scope.startswith("repository:"):
        return scope.split(":")[1]
    return None


class TokenReply(Protocol):
    """What :class:`Authenticator` needs of an answer: ``status``, ``ok``, ``body``."""

    status: int
    ok: bool
    body: bytes


# send(method, url, *, headers, params=None, data=None, limit, auth_origin=None)
Send = Callable[..., Awaitable[TokenReply]]


class Authenticator:
    """Challenges, credentials and tokens of one registry and its mirrors (module docs).

    ``registry``/``origin``: the registry's name and base URL (explicit
    ``credentials`` apply to the origin only); ``send``: the client's request
    function, used for the token service."""

    def __init__(self, registry: str, origin: str, *, config: RegistryConfig, send: Send,
                 credentials: Credentials | None = None, use_keyring: bool = True):
        self.registry = registry
        self.origin = origin
        self.config = config
        self.use_keyring = use_keyring
        self.tokens_fetched = 0
        self._send = send
        self._explicit = credentials
        self._challenges: dict[str, Challenge | None] = {}
        self._tokens: dict[tuple[str, str], Token] = {}
        self._creds: dict[tuple[str, str | None], Credentials | None] = {}
        self._locks: dict[object, anyio.Lock] = {}

    def _lock(self, key) -> anyio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = anyio.Lock()
        return lock

    def remember(self, base: str, challenge: Challenge | None) -> None:
        """Record what ``base`` asked for (None: no auth needed there)."""
        self._challenges[base] = challenge

    async def credentials_for(self, base: str, repository: str | None) -> Credentials | None:
        host = host_of(base)
        is_origin = base == self.origin
        if is_origin and self._explicit is not None:
            return self._explicit
        registry = self.registry if is_origin else host
        key = (registry, repository)
        if key in self._creds:
            return self._creds[key]
        async with self._lock(("creds", key)):
            if key in self._creds:
                return self._creds[key]
            try:
                with anyio.fail_after(CREDENTIAL_LOOKUP_TIMEOUT):
                    creds = await anyio.to_thread.run_sync(
                        lambda: _creds.lookup(registry, repository, use_keyring=self.use_keyring),
                        abandon_on_cancel=True)
            except TimeoutError:
                log.warning("credential lookup for %s timed out; continuing anonymously", registry)
                creds = None
            self._creds[key] = creds
            return creds

    def invalidate_tokens(self, scope: str | None = None) -> None:
        """Forget cached tokens (all, or those whose scope set includes ``scope``)."""
        for k in list(self._tokens):
            if scope is None or scope in k[1].split(" "):
                del self._tokens[k]

    async def header(self, base: str, scope: str | None, *, rejected: str | None = None,
                     extra_scope: str | None = None) -> str | None:
        """The ``Authorization`` value for ``base`` (None before any challenge):
        a cached or fresh token for ``scope``, or Basic credentials. ``rejected``:
        a token the registry just refused, replaced by a fresh one."""
        challenge = self._challenges.get(base)
        if challenge is None:
            return None
        repo = scope_repository(scope)
        if challenge.scheme == "basic":
            creds = await self.credentials_for(base, repo)
            return creds.basic_header() if creds is not None else None
        scopes = [s for s in (scope, extra_scope) if s]
        return f"Bearer {await self._token(base, challenge, scopes, repo, rejected=rejected)}"

    async def answer(self, base: str, scope: str | None, www_authenticate: str | None,
                     sent: str | None) -> str | None:
        """After a 401 on ``base`` (``sent``: the ``Authorization`` we sent): the
        value to repeat the request with, or None when there is nothing better
        to send. Raises :class:`AuthError` when a Basic registry needs
        credentials we do not have."""
        challenge = parse_www_authenticate(www_authenticate)
        if challenge is None:
            return None
        self._challenges[base] = challenge
        if challenge.scheme == "basic" and await self.credentials_for(
                base, scope_repository(scope)) is None:
            raise AuthError(f"registry {host_of(base)} requires authentication: run "
                            f"'stargz-tui login {self.registry}'")
        # A token we had was rejected (expired or revoked): fetch a fresh one, once.
        rejected = sent[7:] if sent and sent.startswith("Bearer ") else None
        return await self.header(base, scope, rejected=rejected,
                                 extra_scope=challenge.scope if challenge.scope != scope else None)

    async def refused(self, base: str, scope: str | None) -> CredentialsRejectedError | None:
        """After a second 401 with what :meth:`answer` gave: the error to raise
        when Basic credentials were refused, else None (the 401 stands)."""
        if (self._challenges.get(base) or Challenge("", {})).scheme != "basic":
            return None
        creds = await self.credentials_for(base, scope_repository(scope))
        src = f" (from {creds.source})" if creds and creds.source else ""
        return CredentialsRejectedError(f"registry {host_of(base)} rejected the "
                                        f"credentials{src}: {reason(401)}")

    async def _token(self, base: str, challenge: Challenge, scopes: list[str],
                     repository: str | None, *, rejected: str | None = None) -> str:
        scope_key = " ".join(sorted(set(s for s in scopes if s)))
        key = (base, scope_key)
        tok = self._tokens.get(key)
        if tok and tok.valid() and tok.value != rejected:
            return tok.value
        async with self._lock(("token", key)):
            tok = self._tokens.get(key)
            if tok and tok.valid() and tok.value != rejected:
                return tok.value
            new = await self.fetch_token(base, challenge, scope_key.split(" ") if scope_key
                                         else [], repository)
            self._tokens[key] = new
            return new.value

    async def fetch_token(self, base: str, challenge: Challenge, scopes: list[str],
                          repository: str | None) -> Token:
        """A new token from the challenge's realm (not cached)."""
        realm = challenge.realm
        host = host_of(base)
        if not realm:
            raise AuthError(f"registry {host} sent a Bearer challenge without a realm")
        r = urlsplit(realm)
        if r.scheme not in ("http", "https") or not r.netloc:
            raise AuthError(f"registry {host} sent an invalid token realm")
        if r.scheme == "http" and not (is_loopback_host(r.netloc)
                                       or self.config.is_insecure(r.netloc)):
            raise AuthError(f"registry {host} wants credentials sent to a plain HTTP token "
                            f"service at {r.netloc}; refused")
        creds = await self.credentials_for(base, repository)
        params: list[tuple[str, str]] = []
        if challenge.service:
            params.append(("service", challenge.service))
        for s in scopes:
            params.append(("scope", s))
        if creds and creds.is_identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": creds.secret,
                    "client_id": "stargz-tui", "scope": " ".join(scopes)}
            if challenge.service:
                form["service"] = challenge.service
            reply = await self._send("POST", realm, headers={}, data=form, limit=1 << 20)
        else:
            headers = {}
            if creds:
                headers["Authorization"] = creds.basic_header()
                params.append(("account", creds.username))
            reply = await self._send("GET", realm, headers=headers, params=params, limit=1 << 20,
                                     auth_origin=realm)
        self.tokens_fetched += 1
        if reply.status in (401, 403):
            if creds:
                raise CredentialsRejectedError(
                    f"registry {host} rejected the credentials (from {creds.source or 'login'}): "
                    f"token service answered {reason(reply.status)}")
            raise AuthError(f"registry {host} requires authentication: run "
                            f"'stargz-tui login {self.registry}'")
        if not reply.ok:
            raise AuthError(f"token service {r.netloc} for registry {host} failed: "
                            f"HTTP {reason(reply.status)}")
        try:
            doc = json.loads(reply.body)
            value = doc.get("token") or doc.get("access_token")
            expires_in = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise AuthError(f"token service {r.netloc} sent an unreadable answer") from None
        if not isinstance(value, str) or not value:
            raise AuthError(f"token service {r.netloc} sent no token")
        margin = min(10.0, expires_in / 5)
        return Token(value, time.monotonic() + max(0.0, expires_in - margin))


__all__ = ["Authenticator", "Challenge", "Token", "parse_www_authenticate", "repository_scope",
           "scope_repository", "CATALOG_SCOPE", "reason", "host_of"]
