"""Id mapping for mounts: how the image's uids/gids are presented.

A mapping is a list of ``(container, host, count)`` ranges, the syntax of
fuse-overlayfs' ``uidmapping=``/``gidmapping=`` and of podman's
``--uidmap``: image id ``container + k`` (``0 <= k < count``) is shown as
``host + k``. The first range holding an id wins; ids no range holds are
shown unchanged. Without a mapping, the image's ids are shown exactly.

``owner_mapping(...)`` is what ``mount --map-owner`` uses, the way rootless
podman maps a container: image id 0 becomes the invoking user's id and image
ids ``1..count`` her subordinate range from /etc/subuid (/etc/subgid) when
she has one, so she owns (and can read) what the image gives to root.

Ids mapped here are presentation only: the FUSE filesystem answers
``getattr`` with them and the kernel checks permissions against them
(``default_permissions``); nothing is ever written.
"""

from __future__ import annotations

import os
import pwd
from typing import NamedTuple

from .errors import MountError

MAX_ID = (1 << 32) - 2  # (uid_t)-1 is "no id"


class IdRange(NamedTuple):
    container: int
    host: int
    count: int

    def __str__(self) -> str:
        return f"{self.container}:{self.host}:{self.count}"


def parse_range(text: str) -> IdRange:
    """``CONTAINER:HOST:COUNT`` -> :class:`IdRange` (MountError when malformed)."""
    parts = str(text).strip().split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        c, h, n = (int(p, 10) for p in parts)
    except ValueError:
        raise MountError(f"bad id mapping {text!r}: expected CONTAINER:HOST:COUNT, "
                         "e.g. 0:1000:1") from None
    if c < 0 or h < 0 or n < 1 or c + n - 1 > MAX_ID or h + n - 1 > MAX_ID:
        raise MountError(f"bad id mapping {text!r}: ids must be 0..{MAX_ID} and COUNT at least 1")
    return IdRange(c, h, n)


def parse_ranges(texts) -> list[IdRange]:
    """Each item a ``C:H:N`` string (or several separated by commas)."""
    out = []
    for t in texts or ():
        out.extend(parse_range(p) for p in str(t).split(",") if p.strip())
    return out


def subordinate_range(path: str, user: str, uid: int) -> IdRange | None:
    """The first range ``/etc/subuid``-style ``path`` gives ``user`` (by name
    or by uid) as ``IdRange(1, start, count)``, or None."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) != 3 or parts[0] not in (user, str(uid)):
            continue
        try:
            start, count = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if count > 0 and start >= 0:
            return IdRange(1, start, min(count, MAX_ID - start + 1))
    return None


def owner_mapping(uid: int | None = None, gid: int | None = None, *,
                  subuid: str = "/etc/subuid",
                  subgid: str = "/etc/subgid") -> tuple[list[IdRange], list[IdRange]]:
    """``--map-owner``: image 0 -> ``uid``/``gid`` (default: ours), the rest
    through our subordinate ranges when we have them."""
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    uids, gids = [IdRange(0, uid, 1)], [IdRange(0, gid, 1)]
    su = subordinate_range(subuid, user, uid)
    if su is not None:
        uids.append(su)
    sg = subordinate_range(subgid, user, uid)
    if sg is not None:
        gids.append(sg)
    return uids, gids


class IdMapper:
    """Maps image ids to the ids shown (identity where no range applies)."""

    def __init__(self, uid_ranges=(), gid_ranges=()):
        self.uid_ranges = tuple(uid_ranges)
        self.gid_ranges = tuple(gid_ranges)

    def __bool__(self) -> bool:
        return bool(self.uid_ranges or self.gid_ranges)

    @staticmethod
    def _map(ranges, i: int) -> int:
        for c, h, n in ranges:
            if c <= i < c + n:
                return h + (i - c)
        return i

    def uid(self, i: int) -> int:
        return self._map(self.uid_ranges, i)

    def gid(self, i: int) -> int:
        return self._map(self.gid_ranges, i)
