"""The mount service's framing: what a client needs to speak to it with the
standard library alone.

Contract: a message is a 4-byte big-endian length, then that many bytes of
JSON, at most :data:`MAX_MESSAGE`; every request carries ``"v":``
:data:`VERSION`. :mod:`core.service.protocol` defines (and validates) the
messages on top of this; the ``stargz-tui mount`` fast client
(:mod:`stargz_tui.mountclient`) sends a ``mount`` request built with
``json`` through :func:`frame_body` and reads the reply with
:func:`read_frame`, so a mount through the service imports neither msgspec
nor argparse. Imports only ``struct`` and ``core.errors``.
"""

from __future__ import annotations

import struct

from ..errors import MountError

VERSION = 1
MAX_MESSAGE = 1 << 20
SOCKET_NAME = "service.sock"
_LEN = struct.Struct(">I")
HEADER_SIZE = _LEN.size


class ProtocolError(MountError):
    """A message this protocol refuses (one line, sent back as the reason)."""


def frame_body(body: bytes) -> bytes:
    """``body`` (encoded JSON) framed; ProtocolError when over the limit."""
    if len(body) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(body)} bytes is over the {MAX_MESSAGE} byte limit")
    return _LEN.pack(len(body)) + body


def body_length(header: bytes) -> int:
    """The body length a frame header announces; ProtocolError when over the limit."""
    (n,) = _LEN.unpack(header)
    if n > MAX_MESSAGE:
        raise ProtocolError(f"a message of {n} bytes is over the {MAX_MESSAGE} byte limit")
    return n


def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        piece = sock.recv(min(n - len(buf), 1 << 16))
        if not piece:
            raise EOFError("the connection closed mid-message" if buf else "the connection closed")
        buf += piece
    return bytes(buf)


def read_frame(sock) -> bytes:
    """One frame's body from ``sock`` (its timeout applies to each recv);
    ProtocolError when it announces more than the limit (nothing more is
    read), EOFError when the peer closed, OSError (e.g. a timeout)."""
    n = body_length(_recv_exact(sock, HEADER_SIZE))
    return _recv_exact(sock, n)
