"""Mountpoint guards: one mount at a time per mountpoint, and no silent mount
over a directory that holds something (real CLI processes, real FUSE)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from core import mount as core_mount

pytestmark = [pytest.mark.reliability, pytest.mark.fuse]

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FIXTURES = os.path.abspath(os.path.join(HERE, "..", "fixtures", "estargz-oci"))
REF = f"oci:{FIXTURES}:mini-esgz"


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.dirname(HERE))
    from fuse_helpers import isolated_mount_env

    monkeypatch.setenv("STARGZ_TUI_SERVER", "off")  # each CLI process mounts by itself
    yield from isolated_mount_env(tmp_path, monkeypatch)


def _kernel_mounts(mp: str) -> int:
    return sum(1 for mounted in _mountinfo_points() if mounted == mp)


def _mountinfo_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f]


def _cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stargz_tui", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))


def test_two_concurrent_mounts_of_one_mountpoint(mount_env, rel):
    rounds, outcomes = 3, []
    for i in range(rounds):
        mp = mount_env.mountpoint(f"mnt{i}")
        procs = [_cli("mount", REF, mp) for _ in range(2)]  # merged: the widest window
        results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
        try:
            kernel = _kernel_mounts(mp)
            ok = [r for r in results if r[0] == 0]
            failed = [r for r in results if r[0] != 0]
            assert kernel == 1, f"round {i}: {kernel} kernel mounts at {mp}: {results}"
            assert len(ok) == 1 and len(failed) == 1, results
            err = failed[0][2].strip().splitlines()
            assert len(err) == 1 and err[0].startswith("stargz-tui: ") and "already" in err[0], \
                failed[0][2]
            assert "Traceback" not in failed[0][2]
            outcomes.append(err[0])
            assert len(core_mount._read_records()) == 1
        finally:
            core_mount.unmount(mp, force=True)
            for _ in range(4):  # a second kernel mount has no record of its own
                if _kernel_mounts(mp):
                    subprocess.run(["umount", "-l", mp], capture_output=True)
        assert _kernel_mounts(mp) == 0 and not core_mount._read_records()
    rel.row("load", f"two `stargz-tui mount` (merged image) processes started together on one "
            f"mountpoint "
            f"({rounds} rounds)",
            f"one kernel mount and one record each round; the other gets one line: "
            f"{outcomes[0][:90]}")


def test_non_empty_mountpoint_needs_force(mount_env, rel):
    mp = mount_env.mountpoint()
    keep = os.path.join(mp, "precious.txt")
    with open(keep, "w") as f:
        f.write("mine\n")
    p = _cli("mount", REF, mp, "--layer", "0")
    rc, out, err = p.wait(timeout=120), *p.communicate()
    lines = err.strip().splitlines()
    assert rc != 0 and _kernel_mounts(mp) == 0, (rc, out, err)
    assert len(lines) == 1 and "not empty" in lines[0] and "--force" in lines[0], err
    assert not core_mount._read_records()
    p = _cli("mount", REF, mp, "--layer", "0", "--force")
    rc2, _out2, err2 = p.wait(timeout=120), *p.communicate()
    try:
        assert rc2 == 0, err2
        assert _kernel_mounts(mp) == 1 and not os.path.exists(keep)
        assert os.path.isfile(os.path.join(mp, "etc", "os-release"))
    finally:
        core_mount.unmount(mp, force=True)
    assert open(keep).read() == "mine\n"
    rel.row("security", "`mount` onto a directory that holds files",
            f"refused in one line: {lines[0][:100]}; with --force mounted, and the files "
            "are back after unmount")
