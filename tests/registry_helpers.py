"""Real parts for registry tests: Debian's ``docker-registry`` on loopback, a JWT
token issuer, a redirecting / fault-injecting front proxy, and a private
Secret Service keyring. Used by the fixtures in ``tests/registry_fixtures.py``
(see that module for the fixture API).

Fixture images are pushed with our own push code (``core.registry.push_oci_layout``)
from ``tests/fixtures/estargz-oci``: each tag goes to the repository of its
family, keeping the full tag name::

    mini-gzip, mini-esgz, mini-esgz-64k, mini-esgz-prefetch, mini-zstdchunked
        -> <host>/fixtures/mini:<tag>        e.g. 127.0.0.1:PORT/fixtures/mini:mini-esgz
    special-gzip, special-esgz, special-esgz-64k, special-zstdchunked
        -> <host>/fixtures/special:<tag>

``fixture_repo(tag)`` gives the repository, ``Registry.ref(tag)`` the reference.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.server
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import httpx

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_LAYOUT = os.path.join(REPO_ROOT, "tests", "fixtures", "estargz-oci")
REGISTRY_BIN = os.environ.get("STARGZ_TUI_TEST_REGISTRY_BIN", "/usr/bin/docker-registry")
TOKEN_SERVICE = "stargz-tui-test-registry"
TOKEN_ISSUER = "stargz-tui-test-issuer"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def fixture_tags() -> list[str]:
    with open(os.path.join(FIXTURE_LAYOUT, "index.json")) as f:
        index = json.load(f)
    return [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]


def fixture_repo(tag: str) -> str:
    """``mini-esgz`` -> ``fixtures/mini``; ``special-gzip`` -> ``fixtures/special``."""
    return "fixtures/" + tag.split("-", 1)[0]


# -- docker-registry ------------------------------------------------------------------

class Registry:
    """Debian's ``docker-registry`` serving 127.0.0.1:``port`` from ``root``.

    ``auth`` is None (open), ``("htpasswd", path)`` or ``("token", TokenIssuer)``.
    :meth:`stop` and :meth:`start` again keep the port and the storage, so fault
    tests can take the registry away and bring it back.
    """

    def __init__(self, workdir: str, *, port: int | None = None, auth=None,
                 log_level: str = "warn"):
        self.workdir = workdir
        self.root = os.path.join(workdir, "storage")
        self.port = port or free_port()
        self.auth = auth
        self.log_level = log_level
        self.log_path = os.path.join(workdir, "registry.log")
        self.config_path = os.path.join(workdir, "registry.yml")
        self.proc: subprocess.Popen | None = None
        os.makedirs(self.root, exist_ok=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, tag: str, repo: str | None = None) -> str:
        """``127.0.0.1:PORT/fixtures/mini:mini-esgz`` for a fixture tag."""
        return f"{self.host}/{repo or fixture_repo(tag)}:{tag}"

    def _config(self) -> str:
        auth = ""
        if self.auth and self.auth[0] == "htpasswd":
            auth = f"""auth:
  htpasswd:
    realm: stargz-tui-test
    path: {self.auth[1]}
"""
        elif self.auth and self.auth[0] == "token":
            issuer: TokenIssuer = self.auth[1]
            auth = f"""auth:
  token:
    realm: {issuer.url}/token
    service: {TOKEN_SERVICE}
    issuer: {TOKEN_ISSUER}
    rootcertbundle: {issuer.cert_path}
"""
        return f"""version: 0.1
log:
  level: {self.log_level}
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {self.root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{self.port}
  secret: stargz-tui-test-secret
{auth}"""

    def start(self, timeout: float = 20.0) -> Registry:
        if self.proc and self.proc.poll() is None:
            return self
        with open(self.config_path, "w") as f:
            f.write(self._config())
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept for the process's life
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", self.config_path], stdout=log,
                                     stderr=log, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited ({self.proc.returncode}); log:\n"
                                   + self.log_tail())
            try:
                r = httpx.get(self.url + "/v2/", timeout=1.0)
                if r.status_code in (200, 401):
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("docker-registry did not come up in time; log:\n" + self.log_tail())

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def restart(self) -> Registry:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""


def push_fixtures(registry_host: str, tags: list[str] | None = None, *,
                  credentials=None, repo_for=fixture_repo) -> dict[str, str]:
    """Push fixture tags with our own push code; returns {tag: manifest digest}."""
    import anyio

    from core.registry import RegistryClient, push_oci_layout
    from core.registry.config import RegistryConfig

    async def run():
        out = {}
        client = RegistryClient(registry_host, config=RegistryConfig(), credentials=credentials,
                                use_keyring=False)
        try:
            for tag in tags or fixture_tags():
                out[tag] = await push_oci_layout(FIXTURE_LAYOUT, tag,
                                                 f"{registry_host}/{repo_for(tag)}:{tag}",
                                                 client=client)
        finally:
            await client.aclose()
        return out

    return anyio.run(run)


def write_htpasswd(path: str, users: dict[str, str]) -> str:
    """An htpasswd file with bcrypt hashes (the only kind docker-registry accepts)."""
    import bcrypt

    with open(path, "w") as f:
        for user, password in users.items():
            h = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
            f.write(f"{user}:{h}\n")
    return path


# -- a small HTTP server base ------------------------------------------------------------

class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 (or ``bind``) running ``handle(handler)``."""

    def __init__(self, bind: str = "127.0.0.1", port: int = 0):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _dispatch(self):
                try:
                    outer.handle(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

        self.server = _Server((bind, port), Handler)
        self.bind = bind
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       kwargs={"poll_interval": 0.1})

    @property
    def host(self) -> str:
        return f"{self.bind}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self):
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def reply(h, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        h.send_response(status)
        hdrs = {"Content-Length": str(len(body))}
        hdrs.update(headers or {})
        for k, v in hdrs.items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD" and body:
            h.wfile.write(body)

    @staticmethod
    def read_body(h) -> bytes:
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""


# -- token issuer -----------------------------------------------------------------------

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer(LoopbackServer):
    """``/token`` for ``auth: token`` registries: RS256 JWTs signed with a test
    certificate (``cert_path``, given to the registry as ``rootcertbundle``).

    ``users`` maps username -> password (checked from Basic auth, or from the
    refresh token ``refresh-<user>`` for the OAuth2 refresh-token flow).
    ``anonymous_pull``: grant ``pull`` without credentials. ``expires_in``:
    what the answer claims (seconds). ``expired_tokens``: that many next tokens
    are issued already expired (the registry refuses them: tests renewal on 401).
    ``requests`` records (method, params, had_authorization) of each call.
    """

    def __init__(self, workdir: str, users: dict[str, str] | None = None, *,
                 anonymous_pull: bool = False, expires_in: int = 300, bind: str = "127.0.0.1"):
        super().__init__(bind)
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = dict(users or {})
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.expired_tokens = 0
        self.requests: list[tuple[str, dict, bool]] = []
        self.issued = 0
        self._lock = threading.Lock()
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stargz-tui test token issuer")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=30))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.cert_der = self.cert.public_bytes(serialization.Encoding.DER)
        self.cert_path = os.path.join(workdir, "token-issuer.pem")
        with open(self.cert_path, "wb") as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))

    def make_jwt(self, subject: str, access: list[dict], *, expired: bool = False) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT",
                  "x5c": [base64.b64encode(self.cert_der).decode()]}
        exp = now - 600 if expired else now + max(self.expires_in, 1)
        claims = {"iss": TOKEN_ISSUER, "sub": subject, "aud": TOKEN_SERVICE,
                  "exp": exp, "nbf": now - 1200 if expired else now - 10,
                  "iat": now - 1200 if expired else now, "jti": secrets.token_hex(8),
                  "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode()))
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)

    def _user(self, h, form: dict) -> str | None | bool:
        """The authenticated user, None for anonymous, False for bad credentials."""
        if form.get("grant_type") == "refresh_token":
            tok = form.get("refresh_token", "")
            user = tok[len("refresh-"):] if tok.startswith("refresh-") else ""
            return user if user in self.users else False
        if form.get("grant_type") == "password":
            u, p = form.get("username", ""), form.get("password", "")
            return u if self.users.get(u) == p and p else False
        auth = h.headers.get("Authorization")
        if not auth:
            return None
        if not auth.startswith("Basic "):
            return False
        try:
            u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
        except ValueError:
            return False
        return u if self.users.get(u) == p and p else False

    def handle(self, h) -> None:
        parsed = urllib.parse.urlsplit(h.path)
        if parsed.path != "/token":
            return self.reply(h, 404, b"not found")
        params = urllib.parse.parse_qs(parsed.query)
        form = {}
        if h.command == "POST":
            form = {k: v[-1] for k, v in
                    urllib.parse.parse_qs(self.read_body(h).decode()).items()}
        scopes = params.get("scope", []) + (form.get("scope", "").split() if form else [])
        with self._lock:
            self.requests.append((h.command, {"scope": scopes, **{k: v[-1] for k, v in
                                                                   params.items() if k != "scope"}},
                                  "Authorization" in h.headers))
        user = self._user(h, form)
        if user is False or (user is None and not self.anonymous_pull):
            return self.reply(h, 401, b'{"details":"invalid credentials"}',
                              {"Content-Type": "application/json",
                               "WWW-Authenticate": 'Basic realm="token"'})
        access = []
        for s in scopes:
            parts = s.split(":")
            if len(parts) != 3:
                continue
            typ, name, actions = parts
            wanted = actions.split(",")
            granted = wanted if user else [a for a in wanted if a == "pull"]
            access.append({"type": typ, "name": name, "actions": granted})
        with self._lock:
            expired = self.expired_tokens > 0
            if expired:
                self.expired_tokens -= 1
            self.issued += 1
        token = self.make_jwt(user or "", access, expired=expired)
        doc = {"token": token, "access_token": token, "expires_in": self.expires_in,
               "issued_at": datetime.datetime.now(datetime.UTC).isoformat()}
        if form.get("grant_type") == "password" or (user and form.get("access_type") == "offline"):
            doc["refresh_token"] = f"refresh-{user}"
        self.reply(h, 200, json.dumps(doc).encode(), {"Content-Type": "application/json"})


# -- front proxy -------------------------------------------------------------------------

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "proxy-authorization", "proxy-authenticate", "host", "content-length"}


class FrontProxy(LoopbackServer):
    """A loopback front for a registry that can misbehave on purpose.

    * ``redirect_blobs_to`` (a :class:`CdnServer`): blob GETs are answered with
      307 to the CDN (another loopback host: 127.0.0.2);
    * ``alter_manifest(body) -> body``: rewrite manifest bodies (digest mismatch tests),
      ``manifest_content_type``: replace the manifest's Content-Type;
    * ``fail_next(n, status, headers)``: the next ``n`` requests get ``status``
      (e.g. 503, or 429 with ``Retry-After``); ``drop_next(n)``: close the
      connection without answering;
    * ``paginate_tags``: answer ``tags/list?n=&last=`` page by page with a ``Link``
      header as the distribution spec (and Docker Hub, GHCR...) do; Debian's
      docker-registry 2.8 paginates the catalog but ignores ``n`` for tags;
    * ``requests`` records (method, path, headers) of everything received.
    """

    def __init__(self, upstream: str, *, bind: str = "127.0.0.1"):
        super().__init__(bind)
        self.upstream = upstream.rstrip("/")
        self.redirect_blobs_to: CdnServer | None = None
        self.alter_manifest = None
        self.manifest_content_type: str | None = None
        self.paginate_tags = False
        self.requests: list[tuple[str, str, dict]] = []
        self._faults: list[tuple[str, int, dict]] = []
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=30, follow_redirects=False)

    def fail_next(self, n: int, status: int = 503, headers: dict | None = None) -> None:
        with self._lock:
            self._faults += [("status", status, dict(headers or {}))] * n

    def drop_next(self, n: int) -> None:
        with self._lock:
            self._faults += [("drop", 0, {})] * n

    def stop(self) -> None:
        super().stop()
        self._client.close()

    def handle(self, h) -> None:
        with self._lock:
            self.requests.append((h.command, h.path, dict(h.headers)))
            fault = self._faults.pop(0) if self._faults else None
        if fault and fault[0] == "drop":
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault:
            return self.reply(h, fault[1], b'{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}',
                              {"Content-Type": "application/json", **fault[2]})
        path = urllib.parse.urlsplit(h.path).path
        body = self.read_body(h)
        if self.paginate_tags and h.command == "GET" and path.endswith("/tags/list"):
            return self._tags_page(h, path)
        if (self.redirect_blobs_to and h.command == "GET" and "/blobs/sha256:" in path):
            # Check auth with the registry first (as a real registry would).
            hdrs = {k: v for k, v in self._fwd(h).items() if k.lower() != "range"}
            r = self._client.request("HEAD", self.upstream + h.path, headers=hdrs)
            if r.status_code != 200:
                return self.reply(h, r.status_code, b"", self._back(r.headers))
            digest = path.rsplit("/", 1)[1]
            target = self.redirect_blobs_to.sign(self.upstream + h.path, digest)
            return self.reply(h, 307, b"", {"Location": target})
        r = self._client.request(h.command, self.upstream + h.path, headers=self._fwd(h),
                                 content=body or None)
        out = r.content
        headers = self._back(r.headers)
        if "/manifests/" in path and r.status_code == 200:
            if self.alter_manifest:
                out = self.alter_manifest(out)
            if self.manifest_content_type:
                headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
                headers["Content-Type"] = self.manifest_content_type
        if "Location" in headers and headers["Location"].startswith(self.upstream):
            headers["Location"] = self.url + headers["Location"][len(self.upstream):]
        if h.command == "HEAD":
            h.send_response(r.status_code)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", r.headers.get("content-length", "0"))
            h.end_headers()
            return
        self.reply(h, r.status_code, out, headers)

    def _tags_page(self, h, path: str) -> None:
        q = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(h.path).query))
        r = self._client.get(self.upstream + path, headers=self._fwd(h))
        if r.status_code != 200:
            return self.reply(h, r.status_code, r.content, self._back(r.headers))
        doc = r.json()
        tags = sorted(doc.get("tags") or [])
        if q.get("last"):
            tags = [t for t in tags if t > q["last"]]
        headers = {"Content-Type": "application/json"}
        if q.get("n"):
            n = int(q["n"])
            if len(tags) > n:
                tags = tags[:n]
                nxt = urllib.parse.urlencode({"n": n, "last": tags[-1]})
                headers["Link"] = f'<{path}?{nxt}>; rel="next"'
        doc["tags"] = tags
        self.reply(h, 200, json.dumps(doc).encode(), headers)

    @staticmethod
    def _fwd(h) -> dict:
        return {k: v for k, v in h.headers.items() if k.lower() not in _HOP}

    @staticmethod
    def _back(headers) -> dict:
        return {k: v for k, v in headers.items() if k.lower() not in _HOP
                and k.lower() != "content-encoding"}


class CdnServer(LoopbackServer):
    """A second loopback host (127.0.0.2) serving blobs by "signed" URL
    (``/cdn/<digest>?exp=..&sig=..``) straight from the registry's storage
    directory, like an S3 bucket behind a registry.

    ``ttl``: how long a signed URL works (then 403 ``Request has expired``).
    ``requests`` records (path, headers) of every request: tests assert no
    ``Authorization`` header ever arrives here.
    """

    def __init__(self, storage_root: str, *, bind: str = "127.0.0.2", ttl: float = 300.0):
        super().__init__(bind)
        self.storage_root = storage_root
        self.ttl = ttl
        self.requests: list[tuple[str, dict]] = []
        self.expired_hits = 0
        self._lock = threading.Lock()
        self._key = secrets.token_bytes(16)

    def sign(self, _upstream_url: str, digest: str) -> str:
        import hashlib
        import hmac

        exp = f"{time.time() + self.ttl:.3f}"
        sig = hmac.new(self._key, f"{digest}:{exp}".encode(), hashlib.sha256).hexdigest()
        return f"{self.url}/cdn/{digest}?exp={exp}&sig={sig}"

    def _blob_path(self, digest: str) -> str:
        hexd = digest.split(":", 1)[1]
        return os.path.join(self.storage_root, "docker", "registry", "v2", "blobs", "sha256",
                            hexd[:2], hexd, "data")

    def handle(self, h) -> None:
        import hashlib
        import hmac

        with self._lock:
            self.requests.append((h.path, dict(h.headers)))
        u = urllib.parse.urlsplit(h.path)
        q = dict(urllib.parse.parse_qsl(u.query))
        digest = u.path.rsplit("/", 1)[-1]
        exp = q.get("exp", "0")
        want = hmac.new(self._key, f"{digest}:{exp}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, q.get("sig", "")):
            return self.reply(h, 403, b"<Error>SignatureDoesNotMatch</Error>")
        if float(exp) < time.time():
            with self._lock:
                self.expired_hits += 1
            return self.reply(h, 403, b"<Error>Request has expired</Error>")
        try:
            with open(self._blob_path(digest), "rb") as f:
                data = f.read()
        except OSError:
            return self.reply(h, 404, b"<Error>NoSuchKey</Error>")
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a)
            end = min(int(b) if b else len(data) - 1, len(data) - 1)
            return self.reply(h, 206, data[start:end + 1],
                              {"Content-Range": f"bytes {start}-{end}/{len(data)}",
                               "Content-Type": "application/octet-stream"})
        self.reply(h, 200, data, {"Content-Type": "application/octet-stream"})


# -- Secret Service keyring --------------------------------------------------------------

class SecretServiceSession:
    """A private D-Bus session bus with gnome-keyring's Secret Service, unlocked.

    Everything lives under ``workdir`` (HOME, XDG dirs), so the developer's real
    keyring is never touched. ``env`` holds the variables to give to the test
    process and to subprocesses (``DBUS_SESSION_BUS_ADDRESS``, ``HOME``,
    ``XDG_*``, ``PYTHON_KEYRING_BACKEND``).
    """

    PASSWORD = "stargz-tui-test-keyring"

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.env: dict[str, str] = {}

    def start(self, timeout: float = 20.0) -> SecretServiceSession:
        home = os.path.join(self.workdir, "home")
        runtime = os.path.join(self.workdir, "run")
        for d in (home, runtime, os.path.join(home, ".local", "share"),
                  os.path.join(home, ".config"), os.path.join(home, ".cache")):
            os.makedirs(d, mode=0o700, exist_ok=True)
        base = {
            "HOME": home, "XDG_RUNTIME_DIR": runtime,
            "XDG_DATA_HOME": os.path.join(home, ".local", "share"),
            "XDG_CONFIG_HOME": os.path.join(home, ".config"),
            "XDG_CACHE_HOME": os.path.join(home, ".cache"),
        }
        env = {**os.environ, **base}
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        bus = subprocess.Popen(["dbus-daemon", "--session", "--nofork", "--nopidfile",
                                "--print-address=1"], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env,
                               start_new_session=True)
        self.procs.append(bus)
        address = bus.stdout.readline().decode().strip()
        if not address:
            self.stop()
            raise RuntimeError("dbus-daemon did not print its address")
        env["DBUS_SESSION_BUS_ADDRESS"] = address
        gk = subprocess.Popen(["gnome-keyring-daemon", "--foreground", "--unlock",
                               "--components=secrets"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              start_new_session=True)
        self.procs.append(gk)
        gk.stdin.write(self.PASSWORD.encode())
        gk.stdin.close()
        self.env = {**base, "DBUS_SESSION_BUS_ADDRESS": address,
                    "PYTHON_KEYRING_BACKEND": "keyring.backends.SecretService.Keyring"}
        # Wait until the Secret Service answers on the bus with an unlocked collection.
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if gk.poll() is not None:
                self.stop()
                raise RuntimeError("gnome-keyring-daemon exited")
            p = subprocess.run(
                [sys.executable, "-c", _PROBE], env={**env, **self.env},
                capture_output=True, timeout=15)
            if p.returncode == 0:
                return self
            last = p.stderr.decode()[-500:]
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("Secret Service did not come up: " + last)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        self.procs = []


_PROBE = """
import secretstorage
conn = secretstorage.dbus_init()
c = secretstorage.get_default_collection(conn)
assert not c.is_locked()
"""
