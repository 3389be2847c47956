"""The app as a plain user (issue 13): it browses the fixture image, mounts
it from the Mounts screen (merged, one daemon) and unmounts it
(tests/plainuser/app_as_user.py runs the Pilot as her)."""

from __future__ import annotations

import json
import os
import stat

import pytest

pytestmark = pytest.mark.fuse


def test_app_mounts_and_unmounts_from_mounts_screen_as_plain_user(alice):
    mp = alice.mkdir("mnt-app")
    script = os.path.join(alice.install.src, "tests", "plainuser", "app_as_user.py")
    r = alice.run([alice.install.python, script, mp], cwd=alice.install.src, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["overlay"] is None and got["rows"] == 1  # one daemon, no fuse-overlayfs
    assert got["data"] == ["empty", "hardlink.bin", "link-to-os-release", "new.txt", "old",
                           "random.bin", "text.txt"]
    assert got["os_release"] > 0
    assert got["mounted_after"] is False and got["records_after"] == []
    assert alice.mounts() == []
    # her settings (recent images) are hers alone
    conf = f"{alice.home}/.config/stargz-tui"
    for path, mode in ((conf, 0o700), (f"{conf}/app.toml", 0o600)):
        st = os.stat(path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (alice.uid, mode), path
