"""The mount service's spare daemon (core.starter.Spare, B1): real service
processes, real FUSE mounts from the real loopback registry, real signals.

- the service keeps one spare, forked ahead and warmed up; a mount through
  the service is served by it (the record names its pid), and a new spare
  takes its place shortly after;
- two mounts at once: one may take the spare, the other forks; both serve;
- a spare killed before its mount is replaced, and mounts go on working;
- a spare that dies while a mount waits on it fails that mount in one line,
  quickly (it is not the worker's child: the worker watches a pidfd);
- the service stopped: its spare ends too, the mounts keep serving.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from cli_helpers import stargz_cli
from fuse_helpers import compare_tree, family, layer_blobs, raw_expected
from test_service import (
    REPO_ROOT,
    _proc_alive,
    _record,
    _start_service,
    _status,
    _wait,
    svc_env,  # noqa: F401 - the fixture (private dirs, the service stopped after)
)

pytestmark = [pytest.mark.fuse, pytest.mark.registry]

TAG = "mini-esgz"


@pytest.fixture
def env(request):
    """test_service's ``svc_env``: private dirs, the service stopped after."""
    return request.getfixturevalue("svc_env")


def _spare(other_than: int | None = None, timeout: float = 10.0) -> int:
    """The service's spare daemon's pid (waits until there is one that is
    not ``other_than``)."""
    def ready():
        pid = _status().get("spare")
        return pid if pid and pid != other_than else None

    return _wait(ready, timeout, "a spare daemon")


def _title(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_a_mount_is_served_by_the_spare_and_a_new_spare_follows(env, registry):
    info = _start_service()
    spare = _spare()
    # forked from the service, waiting: a process of its own in ps
    assert _ppid(spare) == info["pid"] and os.getsid(spare) == spare
    assert _title(spare).startswith(b"stargz-tui-spare")
    assert "spare daemon" in stargz_cli("service", "status").stdout
    mp = env.mountpoint()
    r = stargz_cli("mount", registry.ref(TAG), mp, "--layer", "0")
    assert r.returncode == 0, r.stderr
    pid = _record(mp)["layers"][0]["pid"]
    assert pid == spare, "the mount did not take the spare"
    assert _title(pid).startswith(b"stargz-tui-daemon layer 0")
    compare_tree(mp, raw_expected(layer_blobs(f"{family(TAG)}-gzip")[0]))
    # its log is the mount's (the spare's stdout and stderr were /dev/null)
    with open(_record(mp)["layers"][0]["log"]) as f:
        assert "serving" in f.read()
    nxt = _spare(other_than=spare)
    assert _proc_alive(nxt) and _title(nxt).startswith(b"stargz-tui-spare")
    assert stargz_cli("unmount", mp).returncode == 0
    assert not os.path.ismount(mp)


def test_two_mounts_at_once_both_serve(env, registry):
    _start_service()
    spare = _spare()
    mps = [env.mountpoint(f"m{i}") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "stargz_tui", "mount", registry.ref(TAG),
                               mp, "--layer", str(i)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i, mp in enumerate(mps)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    pids = [_record(mp)["layers"][0]["pid"] for mp in mps]
    assert pids[0] != pids[1] and pids.count(spare) <= 1
    truth = layer_blobs(f"{family(TAG)}-gzip")
    for i, mp in enumerate(mps):
        compare_tree(mp, raw_expected(truth[i]))
        assert stargz_cli("unmount", mp).returncode == 0


def test_a_killed_spare_is_replaced(env, registry):
    _start_service()
    spare = _spare()
    os.kill(spare, signal.SIGKILL)
    _wait(lambda: not _proc_alive(spare), 10, "the spare to die")
    mp = env.mountpoint()
    r = stargz_cli("mount", registry.ref(TAG), mp, "--layer", "0")  # forks, or takes a new spare
    assert r.returncode == 0, r.stderr
    assert _record(mp)["layers"][0]["pid"] != spare
    compare_tree(mp, raw_expected(layer_blobs(f"{family(TAG)}-gzip")[0]))
    assert _proc_alive(_spare(other_than=spare))
    assert stargz_cli("unmount", mp).returncode == 0


def test_a_spare_dying_under_a_mount_fails_it_in_one_line(env, registry):
    _start_service()
    spare = _spare()
    os.kill(spare, signal.SIGSTOP)  # it takes the config but never reads it
    mp = env.mountpoint()
    try:
        p = subprocess.Popen([sys.executable, "-m", "stargz_tui", "mount", registry.ref(TAG), mp,
                              "--layer", "0"], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        # the mount has taken it once the service no longer offers it
        _wait(lambda: _status().get("spare") != spare, 30, "the mount to take the spare")
        time.sleep(0.5)
    finally:
        os.kill(spare, signal.SIGKILL)
    t0 = time.monotonic()
    _, err = p.communicate(timeout=60)
    assert time.monotonic() - t0 < 10, "the mount did not notice its daemon died"
    assert p.returncode == 1 and err.startswith("stargz-tui: "), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "exited" in err, err
    assert not os.path.ismount(mp)
    assert stargz_cli("mounts", "--json").stdout.strip() in ("[]", "")
    # and the next mount works
    r = stargz_cli("mount", registry.ref(TAG), mp, "--layer", "0")
    assert r.returncode == 0, r.stderr
    assert stargz_cli("unmount", mp).returncode == 0


def test_a_stopped_service_ends_its_spare_and_mounts_keep_serving(env, registry):
    _start_service()
    mp = env.mountpoint()
    assert stargz_cli("mount", registry.ref(TAG), mp, "--layer", "0").returncode == 0
    daemon = _record(mp)["layers"][0]["pid"]
    spare = _spare(other_than=daemon)
    assert stargz_cli("service", "stop").returncode == 0
    _wait(lambda: not _proc_alive(spare), 10, "the spare to end with the service")
    with open(_record(mp)["layers"][0]["log"]) as f:
        log = f.read()[-2000:]
    assert _proc_alive(daemon) and os.path.ismount(mp), log
    compare_tree(mp, raw_expected(layer_blobs(f"{family(TAG)}-gzip")[0]))
