"""The kernel caches a mounted layer's entries and attributes (issue 17, B5).

A layer never changes while it is mounted, so core.fusefs tells the kernel to
trust what it answered (``IMMUTABLE_TIMEOUT``): a path looked up once is not
asked about again, seconds later too. Checked on the daemon's own trace of
the FUSE requests it gets (``--debug``)."""

from __future__ import annotations

import os
import time

import pytest
from fuse_helpers import FIXTURES, isolated_mount_env

pytestmark = pytest.mark.fuse


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    yield from isolated_mount_env(tmp_path, monkeypatch)


def _requests(log: str, ops=("lookup", "getattr", "readdir")) -> list[str]:
    with open(log, encoding="utf-8", errors="replace") as f:
        return [line for line in f if any(f" {op} " in line for op in ops)]


def test_entries_and_attributes_stay_cached(mount_env):
    mp = mount_env.mountpoint()
    rec = mount_env.mount(f"oci:{FIXTURES}:mini-esgz", mp, layer=0, debug=True)
    log = rec["layers"][0]["log"]
    names = []
    for root, dirs, files in os.walk(mp):
        names += [os.path.join(root, n) for n in dirs + files]
    assert len(names) > 5
    first = {p: os.lstat(p) for p in names}
    asked = _requests(log)
    assert asked, "the daemon's trace shows no request at all"
    time.sleep(2.5)  # well past the 1 s the kernel was told to trust before
    again = {p: os.lstat(p) for p in names}
    assert _requests(log) == asked  # not one lookup or getattr more
    assert {p: (s.st_ino, s.st_mode, s.st_size, s.st_nlink) for p, s in again.items()} == \
        {p: (s.st_ino, s.st_mode, s.st_size, s.st_nlink) for p, s in first.items()}


def test_missing_names_stay_cached(mount_env):
    """A name that is not in the layer is asked for once: the kernel keeps
    the negative answer (an interpreter probing for modules, overlayfs asking
    each lower layer, do not cost a request each time)."""
    mp = mount_env.mountpoint()
    rec = mount_env.mount(f"oci:{FIXTURES}:mini-esgz", mp, layer=0, debug=True)
    log = rec["layers"][0]["log"]
    missing = [os.path.join(mp, "etc", f"no-such-{i}.py") for i in range(5)]
    for p in missing:
        assert not os.path.exists(p)
    asked = _requests(log, ("lookup",))
    assert sum("no-such-" in line for line in asked) == len(missing)
    time.sleep(1.5)
    for _ in range(3):
        for p in missing:
            assert not os.path.exists(p)
    assert _requests(log, ("lookup",)) == asked
