"""A real fault-injecting HTTP proxy on loopback, in front of a real registry.

    proxy = FaultProxy("http://127.0.0.1:5000").start()
    proxy.add("reset", path=r"/blobs/", count=2)          # next 2 blob GETs
    proxy.add("status", path=r"/blobs/", status=503, fraction=0.3, seed=1)
    ...
    proxy.host  -> "127.0.0.1:PORT" (use it in image references)
    proxy.refuse() / proxy.accept()   -> genuine ECONNREFUSED while refused
    proxy.clear(); proxy.log (method, path, status, fault) of every request
    proxy.stop()

Faults (``kind``), applied to requests whose path matches the ``path`` regex
(and ``method``), for the next ``count`` matches or a ``fraction`` of them:

* ``drop``       close the connection without answering (reset before headers)
* ``reset``      send headers and half the body, then RST the connection
* ``stall``      send headers and half the body, then say nothing for
                 ``seconds`` (default 60), then close
* ``trickle``    send headers, then the body one byte every ``interval``
                 seconds (default 2), for at most ``seconds`` (default 60), then
                 close: every single read of the client gets data in time, so
                 only a total deadline ends the request
* ``truncate``   send the right Content-Length but only half the body, close
* ``corrupt``    flip bytes in the body (right length, wrong bytes)
* ``bad_range``  answer 206 with a Content-Range ``shift`` bytes off, and the
                 bytes from there (consistent but wrong)
* ``no_range``   answer 206 without a Content-Range header
* ``status``     answer ``status`` (500/502/503...) with an error body;
                 ``retry_after`` adds a Retry-After header (use 429 for rate limits)
* ``unauthorized`` answer 401 with the upstream's own WWW-Authenticate
                 challenge (as a registry does when a token has expired)

Everything is bounded: stalls end, the server threads are daemons and
``stop()`` closes every open connection.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-authorization", "proxy-authenticate"}


@dataclass
class Rule:
    kind: str
    path: str = ".*"
    method: str | None = None
    count: int | None = 1
    fraction: float | None = None
    status: int = 503
    retry_after: str | None = None
    seconds: float = 60.0
    interval: float = 2.0
    shift: int = 1
    rng: random.Random = field(default_factory=random.Random)
    hits: int = 0

    def take(self, method: str, path: str) -> bool:
        if self.method and method != self.method:
            return False
        if not re.search(self.path, path):
            return False
        if self.fraction is not None:
            if self.rng.random() >= self.fraction:
                return False
        elif self.count is not None:
            if self.count <= 0:
                return False
            self.count -= 1
        self.hits += 1
        return True


class FaultProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0):
        u = urllib.parse.urlsplit(upstream if "://" in upstream else "http://" + upstream)
        self.upstream_host = u.hostname
        self.upstream_port = u.port or 80
        self.bind = (host, port)
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str, int, str]] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._challenge: str | None = None

    # -- control ----------------------------------------------------------------
    @property
    def host(self) -> str:
        return f"{self.bind[0]}:{self.bind[1]}"

    def add(self, kind: str, *, seed: int | None = None, **kw) -> Rule:
        r = Rule(kind, **kw)
        if kw.get("fraction") is not None:
            r.count = None
        if seed is not None:
            r.rng = random.Random(seed)
        with self.lock:
            self.rules.append(r)
        return r

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def faults(self) -> list[tuple[str, str, int, str]]:
        with self.lock:
            return [e for e in self.log if e[3]]

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            p = proxy

        self.server = ThreadingHTTPServer(self.bind, Handler)
        self.server.daemon_threads = True
        self.bind = self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        return self

    def refuse(self) -> None:
        """Stop listening (clients get ECONNREFUSED) and drop open connections."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        self._drop_all()

    def accept(self) -> None:
        """Listen again on the same port."""
        if self.server is None:
            deadline = time.monotonic() + 10
            while True:
                try:
                    self.start()
                    return
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)

    def stop(self) -> None:
        self.clear()
        self.refuse()

    def _drop_all(self) -> None:
        with self.lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            _rst(c)

    def _match(self, method: str, path: str) -> Rule | None:
        with self.lock:
            for r in self.rules:
                if r.take(method, path):
                    return r
        return None

    def challenge(self) -> str | None:
        if self._challenge is None:
            try:
                c = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=10)
                c.request("GET", "/v2/")
                resp = c.getresponse()
                resp.read()
                self._challenge = resp.getheader("WWW-Authenticate") or ""
                c.close()
            except OSError:
                return None
        return self._challenge or None


def _rst(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    p: FaultProxy
    timeout = 120

    def log_message(self, *a):  # quiet
        pass

    def setup(self):
        super().setup()
        with self.p.lock:
            self.p._conns.add(self.connection)

    def finish(self):
        with self.p.lock:
            self.p._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def do_GET(self):
        self._proxy()

    def do_HEAD(self):
        self._proxy()

    def do_POST(self):
        self._proxy()

    def do_PUT(self):
        self._proxy()

    def do_PATCH(self):
        self._proxy()

    def do_DELETE(self):
        self._proxy()

    def _record(self, status: int, fault: str) -> None:
        with self.p.lock:
            self.p.log.append((self.command, self.path, status, fault))

    def _proxy(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else None
        rule = self.p._match(self.command, self.path)
        kind = rule.kind if rule else ""
        if kind == "drop":
            self._record(0, kind)
            _rst(self.connection)
            self.close_connection = True
            return
        if kind == "status":
            self._send_simple(rule.status, kind, retry_after=rule.retry_after)
            return
        if kind == "unauthorized":
            ch = self.p.challenge() or 'Basic realm="registry"'
            self._send_simple(401, kind, extra={"WWW-Authenticate": ch}, code="UNAUTHORIZED")
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
        headers["Host"] = f"{self.p.upstream_host}:{self.p.upstream_port}"
        rng = self.headers.get("Range")
        if kind == "bad_range" and rng:
            m = re.match(r"bytes=(\d+)-(\d+)", rng)
            if m:
                headers["Range"] = f"bytes={int(m.group(1)) + rule.shift}-{int(m.group(2)) + rule.shift}"
        try:
            up = http.client.HTTPConnection(self.p.upstream_host, self.p.upstream_port, timeout=60)
            up.request(self.command, self.path, body=body, headers=headers)
            resp = up.getresponse()
            data = resp.read()
            status, rh = resp.status, [(k, v) for k, v in resp.getheaders()
                                       if k.lower() not in HOP_HEADERS]
            up.close()
        except OSError:
            self._send_simple(502, "upstream-down")
            return
        if kind == "no_range":
            rh = [(k, v) for k, v in rh if k.lower() != "content-range"]
        if kind == "corrupt" and data:
            b = bytearray(data)
            for i in range(0, len(b), max(1, len(b) // 16)):
                b[i] ^= 0x5A
            data = bytes(b)
        self._record(status, kind)
        try:
            self.send_response_only(status)
            for k, v in rh:
                if k.lower() == "content-length":
                    continue
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                self.wfile.flush()
                return
            if kind == "trickle" and data:
                self._trickle(data, rule)
                return
            if kind in ("reset", "stall", "truncate") and len(data) > 1:
                half = data[: len(data) // 2]
                self.wfile.write(half)
                self.wfile.flush()
                if kind == "stall":
                    end = time.monotonic() + rule.seconds
                    while time.monotonic() < end and self.p.server is not None:
                        time.sleep(0.05)
                    self.connection.close()
                elif kind == "reset":
                    _rst(self.connection)
                else:
                    self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _trickle(self, data: bytes, rule: Rule) -> None:
        end = time.monotonic() + rule.seconds
        for i in range(len(data)):
            if time.monotonic() > end or self.p.server is None:
                break
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()
            pause = time.monotonic() + rule.interval
            while time.monotonic() < pause and self.p.server is not None:
                time.sleep(0.05)
        self.connection.close()
        self.close_connection = True

    def _send_simple(self, status: int, fault: str, *, retry_after: str | None = None,
                     extra: dict | None = None, code: str = "UNAVAILABLE"):
        self._record(status, fault)
        body = (f'{{"errors":[{{"code":"{code}","message":"injected {fault}"}}]}}').encode()
        try:
            self.send_response_only(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if retry_after is not None:
                self.send_header("Retry-After", retry_after)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
