"""An OCI distribution client on ``httpx.AsyncClient`` (works under asyncio and trio).

:class:`RegistryClient` talks to one registry (and its configured mirrors):

* auth through its :class:`~core.registry.auth.Authenticator` (``client.auth``:
  challenges, credentials, tokens); a 401 mid-session is answered once with a
  fresh token or the credentials the challenge asks for;
* redirects are followed by hand: the ``Authorization`` header never goes to
  another host than the one it was meant for;
* one :class:`~core.registry.policy.RequestPolicy` for every request: a total
  deadline per request (retries, redirects and body included), an idle
  timeout, bounded retries with exponential backoff and jitter on connection
  errors, 5xx and 429 (``Retry-After`` honoured), then one clear error naming
  the host and the status;
* TLS verified; plain HTTP only for loopback hosts and configured insecure
  registries, also as the target of a redirect (refused before connecting,
  with :class:`~core.errors.InsecureRedirectError`);
* catalog and tags listing with ``n=`` and ``Link`` pagination.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import anyio
import httpx

from ..errors import (
    AuthError,
    CredentialsRejectedError,
    FormatError,
    InsecureRedirectError,
    NotFoundError,
    RegistryError,
    RegistryUnreachableError,
)
from ..reference import DOCKER_HUB, DOCKER_HUB_API_HOST, is_loopback_host
from .auth import (
    CATALOG_SCOPE,
    Authenticator,
    Challenge,
    host_of,
    parse_www_authenticate,
    reason,
    repository_scope,
)
from .config import RegistryConfig, load_config
from .credentials import Credentials
from .policy import DEFAULT_DEADLINE, DEFAULT_IDLE_TIMEOUT, RETRY_STATUSES, RequestPolicy

log = logging.getLogger(__name__)

USER_AGENT = "stargz-tui/0.1.0"
MAX_REDIRECTS = 5
DEFAULT_BODY_LIMIT = 16 << 20

# -- replies -------------------------------------------------------------------------

@dataclass
class Reply:
    """A response whose body has been read (bounded)."""

    status: int
    headers: httpx.Headers
    body: bytes
    url: str            # the final URL, after redirects
    host: str           # host[:port] the request was meant for (the registry or mirror)
    path: str           # the request's path, for messages (no query string)
    method: str
    redirected: bool = False  # the final URL is on another host than `host`
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def errors(self) -> list[tuple[str, str]]:
        """Distribution's ``{"errors": [{code, message}]}`` as (code, message)
        pairs; empty when the body holds none."""
        try:
            doc = json.loads(self.body[:65536])
            errs = doc.get("errors") or []
            return [(str(e.get("code") or ""), str(e.get("message") or ""))
                    for e in errs if isinstance(e, dict)]
        except (ValueError, AttributeError, TypeError):
            return []

    def error_codes(self) -> set[str]:
        """The distribution error codes of the answer (``NAME_UNKNOWN``, ...)."""
        return {code for code, _ in self.errors() if code}

    def error_detail(self) -> str:
        """The errors as one short line, for messages."""
        parts = [f"{code}: {msg}" if code and msg else code or msg
                 for code, msg in self.errors()[:3]]
        text = " ".join("; ".join(p for p in parts if p).split())
        return text[:200]


def raise_for_reply(reply: Reply, what: str, *, not_found: str | None = None) -> None:
    """Turn a non-2xx reply into one clear :class:`CoreError`."""
    if reply.ok:
        return
    detail = reply.error_detail()
    tail = f" ({detail})" if detail else ""
    where = f"registry {reply.host}"
    if reply.status == 404:
        raise NotFoundError(not_found or f"{what}: not found on {where}{tail}")
    if reply.status == 401:
        raise AuthError(f"{where} refused {what}: {reason(401)}{tail}")
    if reply.status == 403:
        raise AuthError(f"{where} denied {what}: {reason(403)} (no access){tail}")
    more = f" after {reply.attempts} attempts" if reply.attempts > 1 else ""
    raise RegistryError(f"{where}: {what} failed: HTTP {reason(reply.status)}{more}{tail}")


def describe_transport_error(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    text = re.sub(r"\[Errno -?\d+\]\s*", "", text)
    text = " ".join(text.split())
    return text[:200]


# getaddrinfo's "this name does not exist" answers (a temporary failure,
# EAI_AGAIN, is retried like any connection error)
_NO_SUCH_NAME = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n)}


def _caused_by(e: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """The ``kind`` exception in ``e``'s chain of causes, or None (httpx wraps
    httpcore's errors, which wrap the socket's or ssl's)."""
    seen = 0
    while e is not None and seen < 16:
        if isinstance(e, kind):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def _unknown_host(e: BaseException) -> bool:
    """Did name resolution say the host does not exist?"""
    gai = _caused_by(e, socket.gaierror)
    return gai is not None and gai.errno in _NO_SUCH_NAME


def _tls_failure(e: BaseException) -> bool:
    """Was it TLS that failed (handshake, protocol, certificate)?"""
    import ssl

    seen = 0
    while e is not None and seen < 16:
        if isinstance(e, ssl.SSLError):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def same_origin(a: str, b: str) -> bool:
    ua, ub = urlsplit(a), urlsplit(b)
    return (ua.scheme, ua.hostname, ua.port) == (ub.scheme, ub.hostname, ub.port)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class LazyTLSTransport(httpx.AsyncBaseTransport):
    """Plain-HTTP requests on a transport without TLS set up; ``https`` ones on
    a verifying transport made at the first ``https`` request.

    Building a verifying SSL context loads the CA bundle (a cost per process,
    bench/README.md), which a loopback registry over plain HTTP never needs. TLS stays verified: the
    ``https`` transport always has ``verify=True``.
    """

    def __init__(self, **transport_options):
        self._options = transport_options
        self._plain: httpx.AsyncHTTPTransport | None = None
        self._tls: httpx.AsyncHTTPTransport | None = None

    def _transport(self, scheme: str) -> httpx.AsyncHTTPTransport:
        if scheme == "http":
            if self._plain is None:
                # never wraps a socket in TLS: only http:// URLs come here
                self._plain = httpx.AsyncHTTPTransport(verify=False, **self._options)
            return self._plain
        if self._tls is None:
            self._tls = httpx.AsyncHTTPTransport(verify=True, **self._options)
        return self._tls

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._transport(request.url.scheme).handle_async_request(request)

    async def aclose(self) -> None:
        for t in (self._plain, self._tls):
            if t is not None:
                await t.aclose()


class RegistryClient:
    """HTTP access to one registry (``docker.io``, ``ghcr.io``, ``127.0.0.1:5000``).

    ``credentials`` overrides the lookup (used by ``login`` to check new
    credentials); ``use_keyring=False`` keeps the keyring out of the lookup.

    Auth is ``self.auth`` (:class:`~core.registry.auth.Authenticator`); how
    long and how often is ``self.policy`` (core.registry.policy); this class
    sends, follows redirects and retries.
    """

    def __init__(self, registry: str, *, config: RegistryConfig | None = None,
                 insecure_registries=(), credentials: Credentials | None = None,
                 use_keyring: bool = True, timeout: float = DEFAULT_IDLE_TIMEOUT,
                 deadline: float | None = None, max_attempts: int = 4,
                 max_retry_time: float = 60.0, backoff: float = 0.25, max_backoff: float = 8.0,
                 max_retry_after: float = 30.0, http_client: httpx.AsyncClient | None = None,
                 bulk_reads: bool = True):
        self.registry = registry
        self.api_host = DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry
        self.config = (config if config is not None else load_config()).with_insecure(
            insecure_registries)
        self.origin = self.config.base_url(self.api_host)
        self.mirrors = [self.config.base_url(m) for m in self.config.mirrors_for(registry)]
        if deadline is None:
            deadline = self.config.request_timeout or DEFAULT_DEADLINE
        self.policy = RequestPolicy(deadline=deadline, timeout=timeout,
                                    max_attempts=max(1, max_attempts),
                                    max_retry_time=max_retry_time, backoff=backoff,
                                    max_backoff=max_backoff, max_retry_after=max_retry_after)
        self._own_http = http_client is None
        # core.options.Tuning.bulk_reads ($STARGZ_TUI_BULK_READS read once at
        # the edge: a daemon's config, the CLI); this module reads no environment
        self.bulk_reads = bulk_reads
        self._http = http_client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            follow_redirects=False, headers={"User-Agent": USER_AGENT},
            transport=LazyTLSTransport(
                limits=httpx.Limits(max_connections=32, max_keepalive_connections=16)),
        )
        self.auth = Authenticator(registry, self.origin, config=self.config, send=self._send,
                                  credentials=credentials, use_keyring=use_keyring)
        self._bulk = None
        self.stats = {"requests": 0, "retries": 0, "redirects": 0}
        # host -> time.monotonic() it was last found down (policy.down_hold)
        self._down: dict[str, float] = {}
        self._check_origin(self.origin)
        for m in self.mirrors:
            self._check_origin(m)

    # -- policy ----------------------------------------------------------------------

    def _check_origin(self, url: str) -> None:
        u = urlsplit(url)
        if u.scheme == "http" and not (is_loopback_host(u.netloc)
                                       or self.config.is_insecure(u.netloc)):
            raise RegistryError(
                f"refusing plain HTTP to {u.netloc}: only loopback hosts and insecure registries "
                "(--insecure-registry or the configuration file) may use it"
            )

    def pull_bases(self) -> list[str]:
        """Base URLs to read content from: mirrors in order, then the registry itself."""
        return [*self.mirrors, self.origin]

    def invalidate_tokens(self, scope: str | None = None) -> None:
        """Forget cached tokens (all, or those for ``scope``): ``auth.invalidate_tokens``."""
        self.auth.invalidate_tokens(scope)

    # -- sending ---------------------------------------------------------------------

    async def _send(self, method: str, url: str, *, headers: dict, params=None, content=None,
                    data=None, limit: int = DEFAULT_BODY_LIMIT, auth_origin: str | None = None,
                    follow: bool = True) -> Reply:
        """One logical request: retries, then manual redirects (auth only to
        ``auth_origin``), all within the policy's deadline (uploads: the idle
        timeout only, see core.registry.policy)."""
        path = urlsplit(url).path
        if content is not None:
            return await self._send_following(method, url, headers, params, content, data, limit,
                                              auth_origin, follow)
        with self.policy.bounded(f"registry {host_of(url)}: {method} {path}"):
            return await self._send_following(method, url, headers, params, content, data, limit,
                                              auth_origin, follow)

    def _check_redirect(self, first_host: str, old: str, new: str) -> None:
        """Refuse a redirect before connecting anywhere we may not go."""
        u = urlsplit(new)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise RegistryError(f"registry {first_host} redirected to an unsupported URL")
        if u.scheme == "http" and urlsplit(old).scheme == "https":
            raise InsecureRedirectError(f"registry {first_host} redirected from HTTPS to plain "
                                        "HTTP; refused")
        if u.scheme == "http" and not (is_loopback_host(u.netloc)
                                       or self.config.is_insecure(u.netloc)):
            raise InsecureRedirectError(
                f"refusing plain-HTTP redirect to {u.netloc}; registry {first_host} sent "
                f"{urlsplit(old).path} there (only loopback hosts and insecure registries, "
                f"--insecure-registry {u.netloc} or the configuration file, may use plain HTTP)")

    async def _send_following(self, method, url, headers, params, content, data, limit,
                              auth_origin, follow) -> Reply:
        target = url
        first_host = host_of(url)
        path = urlsplit(url).path
        redirected = False
        for _hop in range(MAX_REDIRECTS + 1):
            hdrs = dict(headers)
            if "Authorization" in hdrs and not (auth_origin and same_origin(target, auth_origin)):
                del hdrs["Authorization"]
            reply = await self._send_retrying(method, target, hdrs, params, content, data, limit,
                                              first_host, path)
            if follow and reply.status in (301, 302, 303, 307, 308) and "location" in reply.headers:
                self.stats["redirects"] += 1
                new = urljoin(target, reply.headers["location"])
                self._check_redirect(first_host, target, new)
                if reply.status == 303:
                    method, content, data = "GET", None, None
                target, params = new, None
                redirected = redirected or not same_origin(new, url)
                continue
            reply.redirected = redirected
            reply.url = target
            return reply
        raise RegistryError(f"registry {first_host}: too many redirects for {path}")

    async def _send_retrying(self, method, url, headers, params, content, data, limit,
                             host, path) -> Reply:
        policy = self.policy
        started = time.monotonic()
        down = self._down.get(host)
        held = down is not None and started - down < policy.down_hold
        attempt = 0
        while True:
            attempt += 1
            self.stats["requests"] += 1
            retry_after = None
            try:
                body = content() if callable(content) else content
                req = self._http.build_request(method, url, headers=headers, params=params,
                                               content=body, data=data)
                resp = await self._http.send(req, stream=True)
                try:
                    chunks, total = [], 0
                    async for chunk in resp.aiter_raw() if method == "HEAD" else resp.aiter_bytes():
                        total += len(chunk)
                        if total > limit:
                            raise FormatError(
                                f"registry {host}: answer to {method} {path} is larger than "
                                f"{limit} bytes; refused")
                        chunks.append(chunk)
                finally:
                    await resp.aclose()
                reply = Reply(resp.status_code, resp.headers, b"".join(chunks), url, host, path,
                              method, attempts=attempt)
                self._down.pop(host, None)  # it answered: retry it as usual
                held = False
                if reply.status not in RETRY_STATUSES:
                    return reply
                retry_after = _retry_after(resp.headers.get("retry-after"))
                failure: Reply | BaseException = reply
            except httpx.TransportError as e:
                text = describe_transport_error(e)
                if isinstance(e, httpx.ConnectError) and _unknown_host(e):
                    raise RegistryError(f"cannot reach registry {host}: unknown host "
                                        f"({text})") from None
                if _caused_by(e, ssl.SSLCertVerificationError):
                    raise RegistryError(f"TLS certificate of {host_of(url)} could not be verified "
                                        f"({text}); if you trust this registry, set SSL_CERT_FILE "
                                        "to a CA bundle that includes its CA certificate") from None
                failure = e
            delay = policy.retry_delay(attempt, retry_after)
            if held or not policy.may_retry(attempt, started, delay):
                break
            self.stats["retries"] += 1
            log.debug("retrying %s %s on %s in %.2fs (attempt %d)", method, path, host, delay,
                      attempt)
            await anyio.sleep(delay)
        if isinstance(failure, Reply):
            return failure
        # typed, so that a caller with a local copy (core.records) can tell "no
        # answer" from a TLS failure, which it must not paper over
        cls = RegistryError if _tls_failure(failure) else RegistryUnreachableError
        if cls is RegistryUnreachableError and not held:  # the hold runs from a full budget
            self._down[host] = time.monotonic()
        raise cls(
            f"cannot reach registry {host}: {describe_transport_error(failure)}"
            + (f" (after {attempt} attempts)" if attempt > 1 else
               f" (down {started - down:.1f} s ago: not retried)" if held else "")
        ) from None

    async def request(self, method: str, path: str, *, scope: str | None = None,
                      headers: dict | None = None, params=None, content=None,
                      limit: int = DEFAULT_BODY_LIMIT, base: str | None = None,
                      url: str | None = None, follow: bool = True) -> Reply:
        """Send an authenticated request to ``base + path`` (or the absolute ``url`` on
        the registry, e.g. an upload location). Handles 401 challenges and renewal;
        all of it within the policy's deadline (but uploads, see core.registry.policy)."""
        base = base or self.origin
        if content is not None:
            return await self._request(method, path, scope, headers, params, content, limit,
                                       base, url, follow)
        with self.policy.bounded(f"registry {host_of(base)}: {method} "
                                 f"{urlsplit(url).path if url else path}"):
            return await self._request(method, path, scope, headers, params, content, limit,
                                       base, url, follow)

    async def _request(self, method, path, scope, headers, params, content, limit, base, url,
                       follow) -> Reply:
        target = url or (base + path)
        hdrs = dict(headers or {})
        auth = await self.auth.header(base, scope)
        if auth:
            hdrs["Authorization"] = auth
        reply = await self._send(method, target, headers=hdrs, params=params, content=content,
                                 limit=limit, auth_origin=base, follow=follow)
        if reply.status != 401:
            return reply
        auth = await self.auth.answer(base, scope, reply.headers.get("www-authenticate"),
                                      hdrs.get("Authorization"))
        if not auth:
            return reply
        hdrs["Authorization"] = auth
        reply = await self._send(method, target, headers=hdrs, params=params, content=content,
                                 limit=limit, auth_origin=base, follow=follow)
        if reply.status == 401:
            refused = await self.auth.refused(base, scope)
            if refused is not None:
                raise refused
        return reply

    async def get_url(self, url: str, *, headers: dict | None = None,
                      limit: int = DEFAULT_BODY_LIMIT) -> Reply:
        """GET an absolute URL without credentials (a cached redirect target)."""
        return await self._send("GET", url, headers=dict(headers or {}), limit=limit)

    # -- endpoints -------------------------------------------------------------------

    async def ping(self, base: str | None = None) -> Challenge | None:
        """``GET /v2/``: None when no auth is required, else the registry's challenge."""
        base = base or self.origin
        reply = await self._send("GET", base + "/v2/", headers={}, limit=1 << 20)
        if reply.status == 401:
            ch = parse_www_authenticate(reply.headers.get("www-authenticate"))
            if ch is None:
                raise RegistryError(f"registry {host_of(base)} answered 401 without a usable "
                                    "WWW-Authenticate challenge")
            self.auth.remember(base, ch)
            return ch
        if reply.status == 404:
            raise RegistryError(f"{host_of(base)} does not serve the registry API (/v2/: "
                                f"{reason(404)})")
        raise_for_reply(reply, "GET /v2/")
        self.auth.remember(base, None)
        return None

    async def check_login(self) -> str:
        """Check the client's credentials against the registry (what ``login`` does).

        Returns "basic", "bearer" or "none" (the registry requires no auth)."""
        challenge = await self.ping()
        if challenge is None:
            return "none"
        creds = await self.auth.credentials_for(self.origin, None)
        if creds is None:
            raise AuthError(f"registry {self.api_host} requires credentials")
        if challenge.scheme == "bearer":
            await self.auth.fetch_token(self.origin, challenge, [], None)
            return "bearer"
        reply = await self._send("GET", self.origin + "/v2/",
                                 headers={"Authorization": creds.basic_header()},
                                 auth_origin=self.origin, limit=1 << 20)
        if reply.status == 401:
            raise CredentialsRejectedError(f"registry {self.api_host} rejected the credentials: "
                                           f"{reason(401)}")
        raise_for_reply(reply, "GET /v2/")
        return "basic"

    async def _paginate(self, path: str, key: str, scope: str, page_size: int | None,
                        what: str, max_pages: int = 100000) -> AsyncIterator[str]:
        params = {"n": str(page_size)} if page_size else None
        url = self.origin + path
        seen = set()
        for _ in range(max_pages):
            reply = await self.request("GET", "", url=url, params=params, scope=scope,
                                       limit=8 << 20)
            raise_for_reply(reply, what)
            try:
                doc = json.loads(reply.body)
                items = doc.get(key) or []
            except (ValueError, AttributeError):
                raise FormatError(f"registry {self.api_host} sent an unreadable {what} "
                                  "answer") from None
            for item in items:
                if isinstance(item, str):
                    yield item
            nxt = _next_link(reply.headers.get("link"))
            if not nxt or not items:
                return
            url = urljoin(url, nxt)
            if not same_origin(url, self.origin) or url in seen:
                return
            seen.add(url)
            params = None
        raise RegistryError(f"registry {self.api_host}: {what} has too many pages")

    async def list_page(self, path: str, key: str, scope: str, *, n: int | None = None,
                        last: str | None = None, what: str = "listing") -> tuple[list[str], bool]:
        """One page (``n=``, ``last=``): (items, whether the registry says there is more)."""
        params = {k: v for k, v in (("n", str(n) if n else None), ("last", last)) if v}
        reply = await self.request("GET", path, params=params or None, scope=scope, limit=8 << 20)
        raise_for_reply(reply, what)
        try:
            items = [i for i in (json.loads(reply.body).get(key) or []) if isinstance(i, str)]
        except (ValueError, AttributeError):
            raise FormatError(f"registry {self.api_host} sent an unreadable {what} answer") from None
        return items, bool(_next_link(reply.headers.get("link"))) and bool(items)

    def iter_catalog(self, page_size: int | None = None) -> AsyncIterator[str]:
        """Repository names (``GET /v2/_catalog``), page by page."""
        return self._paginate("/v2/_catalog", "repositories", CATALOG_SCOPE, page_size,
                              "listing repositories")

    def iter_tags(self, repository: str, page_size: int | None = None) -> AsyncIterator[str]:
        """Tags of ``repository`` (``GET /v2/NAME/tags/list``), page by page."""
        return self._paginate(f"/v2/{repository}/tags/list", "tags",
                              repository_scope(repository), page_size,
                              f"listing tags of {repository}")

    def bulk_reader(self):
        """The client's :class:`core.registry.bulk.BulkReader` for large blob
        ranges, or None when it must not be used (an HTTP client given by the
        caller, a proxy configured in the environment, or ``bulk_reads``
        off)."""
        if not self._own_http or not self.bulk_reads:
            return None
        from .bulk import BulkReader, proxied

        if proxied("http") or proxied("https"):
            return None
        if self._bulk is None:
            t = self._http.timeout
            self._bulk = BulkReader(timeout=t.read or 30.0, connect_timeout=t.connect or 15.0,
                                    ssl_context=httpx.create_ssl_context, user_agent=USER_AGENT)
        return self._bulk

    async def aclose(self) -> None:
        if self._bulk is not None:
            self._bulk.close()
        if self._own_http:
            await self._http.aclose()


_LINK_RE = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')


def _next_link(value: str | None) -> str | None:
    if not value:
        return None
    m = _LINK_RE.search(value)
    return m.group(1) if m else None


__all__ = ["RegistryClient", "Reply", "raise_for_reply", "same_origin", "LazyTLSTransport"]
