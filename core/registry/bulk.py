"""Bulk blob range reads on blocking sockets in worker threads.

``httpx``/``h11`` receive a response body on the event loop in pieces of at
most ``READ_NUM_BYTES``, copying every byte about three times while holding
the GIL; for a background fetch of a whole layer that receive competes for
the GIL with the threads inflating and hashing the chunks (each of which
needs the GIL back several times per chunk). :class:`BulkReader` instead runs
one plain HTTP/1.1 range GET in a worker thread and receives the body with
``recv(length, MSG_WAITALL)``: one system call, without the GIL, straight
into the ``bytes`` object that is returned.

It is only a fast path. It takes a URL and headers the regular client has
already used successfully (the blob URL, or a cached redirect target, and
the same ``Authorization`` the client would send there), and it accepts
nothing but the exact answer: ``206`` with ``Content-Range`` starting at the
offset asked for and ``Content-Length`` equal to the length asked for, no
transfer coding. Anything else (another status, a redirect, 401, a reset,
a timeout, a short body) raises :class:`BulkUnavailable` and the caller
repeats the read through the regular client, which owns retries, token
renewal, redirects and the errors users see.

TLS is verified with the same policy as the regular client
(``httpx.create_ssl_context()``: the CA bundle, or ``SSL_CERT_FILE`` /
``SSL_CERT_DIR``); when a proxy is configured in the environment for the
URL's scheme the bulk path is not used at all.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import urllib.request
from collections.abc import Callable
from urllib.parse import urlsplit

import anyio
import anyio.to_thread

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 64 << 10
MAX_IDLE = 4  # idle keep-alive connections kept per origin


class BulkUnavailable(Exception):
    """The bulk read did not produce the exact range; use the regular client."""


def proxied(scheme: str) -> bool:
    """Does the environment configure a proxy for ``scheme`` (or all schemes)?"""
    try:
        proxies = urllib.request.getproxies()
    except Exception:  # noqa: BLE001 - unreadable environment: be conservative
        return True
    return bool(proxies.get(scheme) or proxies.get("all"))


def _origin(url: str) -> tuple[str, str, int]:
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise BulkUnavailable(f"unsupported URL scheme {u.scheme!r}")
    port = u.port or (443 if u.scheme == "https" else 80)
    return u.scheme, u.hostname, port


class _Job:
    """One bulk read; :meth:`abort` (from any thread) ends a blocked receive."""

    __slots__ = ("sock", "aborted", "lock")

    def __init__(self):
        self.sock: socket.socket | None = None
        self.aborted = False
        self.lock = threading.Lock()

    def attach(self, sock: socket.socket) -> None:
        with self.lock:
            self.sock = sock
            if self.aborted:
                _shutdown(sock)

    def abort(self) -> None:
        with self.lock:
            self.aborted = True
            if self.sock is not None:
                _shutdown(self.sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """Blocking socket whose every send/receive gives up after ``seconds``
    (SO_RCVTIMEO/SO_SNDTIMEO): unlike ``settimeout`` this keeps the socket
    blocking, so ``MSG_WAITALL`` receives a whole body in one call."""
    sec = int(seconds)
    usec = int((seconds - sec) * 1e6)
    tv = struct.pack("ll", sec, usec)
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


class BulkReader:
    """Range GETs on a small pool of blocking keep-alive connections.

    ``timeout``: every socket operation (connect, send, each wait for data);
    ``ssl_context``: a callable giving the verifying context for ``https``
    (made at the first ``https`` read)."""

    def __init__(self, *, timeout: float, connect_timeout: float,
                 ssl_context: Callable[[], ssl.SSLContext], user_agent: str):
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._ssl_factory = ssl_context
        self._ssl: ssl.SSLContext | None = None
        self.user_agent = user_agent
        self._idle: dict[tuple, list[socket.socket]] = {}
        self._active: set[_Job] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.stats = {"reads": 0, "bytes": 0, "fallbacks": 0, "connections": 0}

    # -- connections -------------------------------------------------------------
    def _connect(self, origin: tuple[str, str, int]) -> socket.socket:
        scheme, host, port = origin
        sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                with self._lock:
                    if self._ssl is None:
                        self._ssl = self._ssl_factory()
                    ctx = self._ssl
                sock = ctx.wrap_socket(sock, server_hostname=host)
                sock.settimeout(self.timeout)  # TLS: Python-level timeouts
            else:
                _set_io_timeout(sock, self.timeout)
        except BaseException:
            sock.close()
            raise
        self.stats["connections"] += 1
        return sock

    def _take(self, origin) -> socket.socket | None:
        with self._lock:
            idle = self._idle.get(origin)
            return idle.pop() if idle else None

    def _give_back(self, origin, sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(origin, [])
            if not self._closed and len(idle) < MAX_IDLE:
                idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        """Close idle connections and end reads still running (their callers
        get :class:`BulkUnavailable`)."""
        with self._lock:
            self._closed = True
            socks = [s for idle in self._idle.values() for s in idle]
            self._idle.clear()
            active = list(self._active)
        for s in socks:
            s.close()
        for job in active:
            job.abort()

    # -- one read ----------------------------------------------------------------
    async def read(self, url: str, headers: dict, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the resource at ``url``, or
        :class:`BulkUnavailable`. Cancelling the caller aborts the receive."""
        job = _Job()
        with self._lock:
            self._active.add(job)
        try:
            data = await anyio.to_thread.run_sync(self._read_sync, job, url, headers, offset,
                                                  length, abandon_on_cancel=True)
        except BaseException:
            job.abort()
            raise
        finally:
            with self._lock:
                self._active.discard(job)
        self.stats["reads"] += 1
        self.stats["bytes"] += len(data)
        return data

    def _read_sync(self, job: _Job, url: str, headers: dict, offset: int, length: int) -> bytes:
        if self._closed:
            raise BulkUnavailable("reader closed")
        origin = _origin(url)
        u = urlsplit(url)
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        host = u.netloc.rpartition("@")[2]
        lines = [f"GET {target} HTTP/1.1", f"Host: {host}", f"User-Agent: {self.user_agent}",
                 "Accept-Encoding: identity",
                 f"Range: bytes={offset}-{offset + length - 1}"]
        for k, v in headers.items():
            if k.lower() not in ("host", "user-agent", "accept-encoding", "range", "connection"):
                if "\r" in v or "\n" in v or "\r" in k or "\n" in k:
                    raise BulkUnavailable("header with a line break")
                lines.append(f"{k}: {v}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        for attempt in (0, 1):
            sock = self._take(origin) if attempt == 0 else None
            reused = sock is not None
            try:
                if sock is None:
                    sock = self._connect(origin)
                job.attach(sock)
                if job.aborted:
                    raise BulkUnavailable("aborted")
                data, keep = self._exchange(sock, request, offset, length, reused)
            except _StaleConnection:
                sock.close()
                continue  # an idle connection the server had closed: once more, fresh
            except BulkUnavailable:
                if sock is not None:
                    sock.close()
                self.stats["fallbacks"] += 1
                raise
            except (OSError, ValueError) as e:  # socket errors, timeouts, TLS errors
                if sock is not None:
                    sock.close()
                self.stats["fallbacks"] += 1
                raise BulkUnavailable(str(e) or type(e).__name__) from None
            if keep and not job.aborted:
                self._give_back(origin, sock)
            else:
                sock.close()
            return data
        self.stats["fallbacks"] += 1
        raise BulkUnavailable("connection closed before an answer")

    def _exchange(self, sock: socket.socket, request: bytes, offset: int, length: int,
                  reused: bool) -> tuple[bytes, bool]:
        head = bytearray()
        # Plain sockets: peek, then take only the header, so that the body
        # lands whole in the bytes object one recv(MSG_WAITALL) returns (no
        # copy, no page faults under the GIL).
        peek = socket.MSG_PEEK if not isinstance(sock, ssl.SSLSocket) else 0
        try:
            sock.sendall(request)
            first = sock.recv(MAX_HEADER_BYTES, peek)
        except (ConnectionResetError, BrokenPipeError):
            if reused:  # the server closed the idle connection meanwhile
                raise _StaleConnection() from None
            raise
        while True:
            piece = first if first is not None else sock.recv(MAX_HEADER_BYTES, peek)
            first = None
            if not piece:
                if reused and not head:
                    raise _StaleConnection()
                raise BulkUnavailable("connection closed in the response header")
            if peek:
                at = (bytes(head[-3:]) + piece).find(b"\r\n\r\n")
                take = len(piece) if at < 0 else at + 4 - min(3, len(head))
                piece = sock.recv(take, socket.MSG_WAITALL)
                if len(piece) != take:
                    raise BulkUnavailable("connection closed in the response header")
            head += piece
            end = head.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(head) > MAX_HEADER_BYTES:
                raise BulkUnavailable("response header too large")
        status, fields = _parse_head(bytes(head[:end]))
        rest = head[end + 4:]
        if status != 206:
            raise BulkUnavailable(f"HTTP {status}")
        if fields.get("transfer-encoding", "identity").lower() != "identity":
            raise BulkUnavailable("transfer coding")
        if fields.get("content-encoding", "identity").lower() != "identity":
            raise BulkUnavailable("content coding")
        try:
            clen = int(fields.get("content-length", ""))
        except ValueError:
            raise BulkUnavailable("no Content-Length") from None
        cr = fields.get("content-range", "")
        want = f"bytes {offset}-{offset + length - 1}/"
        if clen != length or not cr.startswith(want):
            raise BulkUnavailable(f"answered {cr!r} ({clen} bytes) for {want}")
        if len(rest) > length:
            raise BulkUnavailable("more bytes than the range")
        data = self._receive(sock, rest, length)
        keep = fields.get("connection", "").lower() != "close"
        return data, keep

    @staticmethod
    def _receive(sock: socket.socket, rest: bytearray, length: int) -> bytes:
        need = length - len(rest)
        if need == 0:
            return bytes(rest)
        if not rest and not isinstance(sock, ssl.SSLSocket):
            # Usually the whole body in one call, into the bytes object returned.
            data = sock.recv(need, socket.MSG_WAITALL)
            if len(data) == need:
                return data
            if not data:
                raise BulkUnavailable(f"body ended after 0 of {length} bytes")
            rest = bytearray(data)
            need -= len(data)
        buf = bytearray(length)
        got = len(rest)
        buf[:got] = rest
        view = memoryview(buf)
        flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
        while got < length:
            n = sock.recv_into(view[got:], length - got, flags)
            if n <= 0:
                raise BulkUnavailable(f"body ended after {got} of {length} bytes")
            got += n
        return bytes(buf)


class _StaleConnection(Exception):
    pass


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise BulkUnavailable("not an HTTP/1.x answer")
    try:
        status = int(parts[1])
    except ValueError:
        raise BulkUnavailable("bad status line") from None
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise BulkUnavailable("bad header line")
        key = name.strip().lower()
        value = value.strip()
        fields[key] = f"{fields[key]}, {value}" if key in fields else value
    if parts[0] == "HTTP/1.0" and fields.get("connection", "").lower() != "keep-alive":
        fields["connection"] = "close"
    return status, fields


__all__ = ["BulkReader", "BulkUnavailable", "proxied"]
