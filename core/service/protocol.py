"""The mount service's wire protocol: versioned, typed, size-limited.

Contract: every message is one frame (:mod:`core.service.wire`), a 4-byte
big-endian length then that many bytes of JSON, at most :data:`MAX_MESSAGE`
bytes; this module gives the messages their msgspec types and validates
every request against them, whoever encoded it. A request is
an object with ``"v"`` (:data:`VERSION`) and ``"op"`` (``mount``,
``unmount``, ``list``, ``watch``, ``restore``, ``repair``, ``status``,
``stop``) and the fields of its struct below, nothing else (unknown fields
are refused). Every answer is a :class:`Reply`: ``ok`` with ``data``, or
``error`` (one line) and ``kind`` (the :mod:`core.errors` class a client
raises). ``watch`` answers with a reply every ``interval`` seconds.

What is refused, with a reply saying why, the connection then closed:
a frame over the limit (before its body is read), bytes that are not JSON
or not an object of a known op, a version this service does not speak,
a peer that is not our uid. No argv, environment or file descriptor
crosses the socket: a mount is a :class:`core.options.MountOptions`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ..options import MountOptions
from .wire import (
    HEADER_SIZE,
    MAX_MESSAGE,
    SOCKET_NAME,
    VERSION,
    ProtocolError,
    body_length,
    frame_body,
    read_frame,
)


class _Base(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="op"):
    v: int = VERSION


class Mount(_Base, tag="mount"):
    options: MountOptions


class Unmount(_Base, tag="unmount"):
    mountpoint: str
    force: bool = False


class List(_Base, tag="list"):
    pass


class Watch(_Base, tag="watch"):
    interval: float = 1.0
    count: int = 0  # replies to send; 0: until the client goes away


class Restore(_Base, tag="restore"):
    pass


class Repair(_Base, tag="repair"):
    pass


class Status(_Base, tag="status"):
    pass


class Stop(_Base, tag="stop"):
    pass


Request = Mount | Unmount | List | Watch | Restore | Repair | Status | Stop


class Reply(msgspec.Struct, kw_only=True, omit_defaults=True):
    v: int = VERSION
    ok: bool = True
    data: Any = None
    error: str | None = None
    kind: str | None = None  # the core.errors class name of ``error``


class _Head(msgspec.Struct):
    v: Any = None


_request_decoder = msgspec.json.Decoder(Request)
_head_decoder = msgspec.json.Decoder(_Head)
_reply_decoder = msgspec.json.Decoder(Reply)
_encoder = msgspec.json.Encoder()


def frame(msg) -> bytes:
    return frame_body(_encoder.encode(msg))


def decode_request(body: bytes) -> Request:
    """A request, or ProtocolError saying in one line what is wrong with it."""
    try:
        head = _head_decoder.decode(body)
    except msgspec.DecodeError:
        raise ProtocolError("malformed request: not a JSON object") from None
    if head.v != VERSION:
        raise ProtocolError(f"protocol version {head.v!r} is not spoken here "
                            f"(this service speaks version {VERSION})")
    try:
        return _request_decoder.decode(body)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed request: {e}") from None


def decode_reply(body: bytes) -> Reply:
    try:
        return _reply_decoder.decode(body)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"the mount service sent a malformed reply: {e}") from None


__all__ = ["VERSION", "MAX_MESSAGE", "SOCKET_NAME", "ProtocolError", "Mount", "Unmount", "List",
           "Watch", "Restore", "Repair", "Status", "Stop", "Request", "Reply", "frame",
           "body_length", "decode_request", "decode_reply", "HEADER_SIZE", "read_frame"]
