"""Fixtures of the rootless tests (issue 13): every test here runs stargz-tui
as a plain user (see tests/plainuser_support.py for how).

``plain_install`` (session): /dev/fuse at Debian's default 0666 when it is
stricter, the project copied with a venv where plain users can run it.
``alice``, ``bob`` (function): :class:`PlainUser` accounts ``sgz-alice`` and
``sgz-bob``; each test ends with every mount of theirs removed.
"""

from __future__ import annotations

import os

import pytest
from plainuser_support import Install, PlainUser, ensure_user, fuse_device_for_users

ALICE, BOB = "sgz-alice", "sgz-bob"


@pytest.fixture(scope="session")
def plain_install():
    if os.geteuid() != 0:
        pytest.fail("the rootless tests create users: run the suite as root (CI does)")
    fuse_device_for_users()
    ensure_user(ALICE)
    inst = Install(ALICE)
    try:
        yield inst
    finally:
        inst.remove()


def _user(name: str, inst: Install):
    u = PlainUser(name, inst)
    u.cleanup()  # what an earlier, interrupted run may have left
    try:
        yield u
    finally:
        u.cleanup()


@pytest.fixture
def alice(plain_install):
    yield from _user(ALICE, plain_install)


@pytest.fixture
def bob(plain_install):
    yield from _user(BOB, plain_install)
