"""Who is at the other end of a Unix socket.

Every Unix socket stargz-tui connects to (the mount service, a daemon's
control socket) or accepts on must have our own uid at the other end: a
socket file is only a name in a directory, and whoever managed to serve it
would otherwise get our environment (tokens included) and terminal, or tell
us a mount succeeded. ``SO_PEERCRED`` gives the uid of the process that
called ``connect()`` (for an accepted socket) or ``listen()`` (for a
connected one), which no peer can forge.

Imports nothing heavy: every service client checks the service with it.
"""

from __future__ import annotations

import os
import sys

from .errors import MountError

_UCRED_SIZE = 12  # struct ucred: pid_t, uid_t, gid_t


def peer_uid(sock) -> int:
    """The uid of the peer of the connected Unix socket ``sock``."""
    import socket

    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED_SIZE)
    return int.from_bytes(raw[4:8], sys.byteorder)


def peer_pid(sock) -> int:
    """The pid of the peer of the connected Unix socket ``sock``."""
    import socket

    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED_SIZE)
    return int.from_bytes(raw[0:4], sys.byteorder)


def is_own_peer(sock) -> bool:
    """Does the peer of ``sock`` run as our uid? False when it cannot be told."""
    try:
        return peer_uid(sock) == os.getuid()
    except OSError:
        return False


def peer_text(sock) -> str:
    """The peer's uid for a log line ("?" when it cannot be told)."""
    try:
        return str(peer_uid(sock))
    except OSError:
        return "?"


def require_own_peer(sock, what: str) -> None:
    """Raise :class:`MountError` (one line) unless the peer of ``sock`` runs
    as our uid; ``what`` names the socket for the message."""
    try:
        uid = peer_uid(sock)
    except OSError as e:
        raise MountError(f"cannot tell who serves {what} ({e.strerror}); refusing it") from None
    if uid != os.getuid():
        raise MountError(f"refusing {what}: it is served by uid {uid}, not by us "
                         f"(uid {os.getuid()}); someone else's process is listening there")
