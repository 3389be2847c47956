"""Network faults from a real fault-injecting proxy in front of a real docker-registry.

Two levels: the core (RegistryStore + load_layer_index + read_file_range,
with a short client timeout so stalls are testable quickly) and real FUSE
mounts (daemons fetching through the proxy). Everywhere: the right bytes
(ground truth: the -gzip image read with tarfile) or a clear error / EIO —
never wrong bytes, never a hang past a bound, never a dead daemon; the mount
recovers once the faults stop.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import sys
import tarfile
import time

import anyio
import pytest
from faultproxy import FaultProxy

from core import mount as core_mount
from core.errors import CoreError
from core.estargz import load_layer_index, read_file_range
from core.image import open_image
from core.reference import parse_reference
from core.registry.store import RegistryStore

pytestmark = [pytest.mark.reliability, pytest.mark.registry, pytest.mark.fuse]

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "fixtures", "estargz-oci")
BLOBS = r"/v2/.*/blobs/sha256:"


def ground_truth(tag_family: str = "mini", layer: int = 0) -> dict[str, bytes]:
    sys.path.insert(0, os.path.dirname(HERE))
    from fuse_helpers import layer_blobs

    out = {}
    with tarfile.open(layer_blobs(f"{tag_family}-gzip")[layer], "r:*") as tf:
        members = {}
        for ti in tf:
            name = "/".join(p for p in ti.name.split("/") if p not in ("", "."))
            if ti.isfile():
                out[name] = tf.extractfile(ti).read()
                members[name] = out[name]
            elif ti.islnk():
                out[name] = members["/".join(p for p in ti.linkname.split("/") if p not in ("", "."))]
    return out


TRUTH = ground_truth()


async def _read_all(ref: str, *, timeout: float = 2.0, attempts: int = 3):
    """Open the image through the proxy and read every file of layer 0:
    returns ({path: bytes | CoreError}, error-or-None from opening)."""
    r = parse_reference(ref)
    store = RegistryStore(r, use_keyring=False, timeout=timeout, max_attempts=attempts,
                          backoff=0.05, max_backoff=0.5, max_retry_time=20)
    try:
        img = await open_image(r, store=store)
        d = img.layers[0]
        src = store.blob_source(d.digest, d.size)
        ix = await load_layer_index(src, expected_toc_digest=d.toc_digest_annotation)
        out = {}
        for path in TRUTH:
            e = ix.lookup(path)
            try:
                out[path] = await read_file_range(ix, src, e)
            except CoreError as err:
                out[path] = err
        return out, None
    except CoreError as e:
        return {}, e
    finally:
        await store.aclose()


CORE_FAULTS = [
    # (kind, rule kwargs, what is tried, must it succeed after retries?)
    ("drop", {"path": BLOBS, "count": 2}, "connection dropped before headers (x2)", True),
    ("reset", {"path": BLOBS, "count": 2}, "reset mid-body (x2)", True),
    ("stall", {"path": BLOBS, "count": 1, "seconds": 8}, "stall 8 s mid-body, client timeout 2 s",
     True),
    ("truncate", {"path": BLOBS, "count": 2}, "truncated body with the full Content-Length (x2)",
     True),
    ("corrupt", {"path": BLOBS, "count": 3}, "flipped bytes, right length (x3)", None),
    ("bad_range", {"path": BLOBS, "count": 2, "shift": 7}, "206 with a Content-Range 7 bytes off "
     "(x2)", True),
    ("no_range", {"path": BLOBS, "count": 2}, "206 without Content-Range (x2)", None),
    ("status", {"path": BLOBS, "count": 2, "status": 500}, "HTTP 500 (x2)", True),
    ("status", {"path": BLOBS, "count": 2, "status": 502}, "HTTP 502 (x2)", True),
    ("status", {"path": BLOBS, "count": 2, "status": 503}, "HTTP 503 (x2)", True),
    ("status", {"path": BLOBS, "count": 2, "status": 429, "retry_after": "1"},
     "HTTP 429 with Retry-After: 1 (x2)", True),
    ("status", {"path": BLOBS, "count": 1000, "status": 503}, "HTTP 503 forever", False),
    ("drop", {"path": BLOBS, "fraction": 0.3, "seed": 7}, "30% of blob requests dropped", None),
    ("status", {"path": r"/manifests/", "count": 2, "status": 502}, "manifest GET 502 (x2)", True),
    ("corrupt", {"path": r"/manifests/", "count": 1}, "manifest body corrupted", None),
]


def judge_reads(out: dict, err, must, tried: str, took: float) -> str:
    """Check what reads under a fault gave (never wrong bytes, one-line
    errors, success or failure as ``must`` says: True, False, or None for
    either); returns the outcome for the report row."""
    assert took < 60, f"{tried}: took {took:.0f} s"
    wrong = [p for p, v in out.items() if isinstance(v, bytes) and v != TRUTH[p]]
    assert not wrong, f"{tried}: WRONG BYTES served for {wrong}"
    failed = [p for p, v in out.items() if not isinstance(v, bytes)]
    if err is not None:
        assert "\n" not in str(err)
    if must is True:
        assert err is None and not failed, f"{tried}: {err or out[failed[0]]}"
        return f"all {len(out)} files right after retries ({took:.1f} s)"
    if must is False:
        assert err is not None or failed
        e = err or out[failed[0]]
        return f"clear error in {took:.1f} s: {type(e).__name__}: {str(e)[:90]}"
    e = err or (out[failed[0]] if failed else None)
    if e is None:
        return f"all {len(out)} files right ({took:.1f} s)"
    result = (f"{len(out) - len(failed)}/{len(TRUTH)} files right, the rest a clear error"
              if e is None or out else f"refused: {str(e)[:90]}")
    if e is not None:
        result += f" ({type(e).__name__}: {str(e)[:70]})"
    return result


@pytest.mark.parametrize("kind,kw,tried,must", CORE_FAULTS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CORE_FAULTS)])
def test_core_reads_under_fault(proxy, registry, isolated_env, kind, kw, tried, must, rel):
    proxy.add(kind, **kw)
    ref = f"{proxy.host}/fixtures/mini:mini-esgz"
    t0 = time.monotonic()
    out, err = anyio.run(_read_all, ref)
    result = judge_reads(out, err, must, tried, time.monotonic() - t0)
    injected = len(proxy.faults())
    assert injected >= 1, "the fault was never injected"
    rel.row("network", f"core: {tried} [{injected} injected]", f"no wrong bytes; {result}")


def test_core_connection_refused_then_back(proxy, isolated_env, rel):
    proxy.refuse()
    out, err = anyio.run(_read_all, f"{proxy.host}/fixtures/mini:mini-esgz")
    assert err is not None and "\n" not in str(err)
    proxy.accept()
    out2, err2 = anyio.run(_read_all, f"{proxy.host}/fixtures/mini:mini-esgz")
    assert err2 is None and all(out2[p] == TRUTH[p] for p in TRUTH)
    rel.row("network", "core: connection refused (proxy not listening), then listening again",
            f"clear error ({type(err).__name__}: {str(err)[:80]}); all files right once back")


# ----------------------------------------------------------------- FUSE level

@pytest.fixture
def mount_env(tmp_path, monkeypatch, isolated_env):
    sys.path.insert(0, os.path.dirname(HERE))
    from fuse_helpers import isolated_mount_env

    yield from isolated_mount_env(tmp_path, monkeypatch)


def _read_file(path: str):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return e


def _read_mount(mp: str, files, timeout: float = 90.0) -> dict:
    """Read files in worker threads; every read must finish within timeout."""
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        futs = {p: ex.submit(_read_file, os.path.join(mp, p)) for p in files}
        done, pending = concurrent.futures.wait(futs.values(), timeout=timeout)
        assert not pending, f"{len(pending)} FUSE reads hung past {timeout} s"
        return {p: f.result() for p, f in futs.items()}


def _check(got: dict, tried: str) -> list[str]:
    wrong = [p for p, v in got.items() if isinstance(v, bytes) and v != TRUTH[p]]
    assert not wrong, f"{tried}: WRONG BYTES through FUSE for {wrong}"
    bad = [p for p, v in got.items() if not isinstance(v, bytes)]
    for p in bad:
        assert got[p].errno == errno.EIO, (p, got[p])
    return bad


def _mount(mount_env, ref, name="mnt"):
    mp = mount_env.mountpoint(name)
    mount_env.mount(ref, mp, layer=0, prefetch=False, background_fetch=False)
    return mp


FUSE_FAULTS = [
    ("status", {"path": BLOBS, "fraction": 0.4, "status": 503, "seed": 3},
     "40% of blob range GETs answer 503"),
    ("reset", {"path": BLOBS, "fraction": 0.4, "seed": 4}, "40% of blob range GETs reset mid-body"),
    ("truncate", {"path": BLOBS, "fraction": 0.4, "seed": 5},
     "40% of blob range GETs truncated (right Content-Length)"),
    ("corrupt", {"path": BLOBS, "fraction": 0.4, "seed": 6}, "40% of blob range GETs corrupted"),
    ("bad_range", {"path": BLOBS, "fraction": 0.4, "seed": 8, "shift": 3},
     "40% of blob range GETs answered from the wrong offset"),
    ("status", {"path": BLOBS, "count": 3, "status": 429, "retry_after": "1"},
     "429 with Retry-After: 1 (x3)"),
    ("stall", {"path": BLOBS, "count": 1, "seconds": 5}, "one 5 s stall mid-body"),
]


@pytest.mark.parametrize("kind,kw,tried", FUSE_FAULTS, ids=[f"{c[0]}-{i}" for i, c in
                                                         enumerate(FUSE_FAULTS)])
def test_mounted_reads_under_fault(proxy, registry, mount_env, kind, kw, tried, rel):
    mp = _mount(mount_env, f"{proxy.host}/fixtures/mini:mini-esgz")
    pid = core_mount.list_mounts()[0]["layers"][0]["pid"]
    proxy.add(kind, **kw)
    got = _read_mount(mp, TRUTH)
    bad = _check(got, tried)
    injected = len(proxy.faults())
    os.kill(pid, 0)
    proxy.clear()
    # recovery: whatever failed reads right now the faults are gone
    again = _read_mount(mp, bad)
    assert all(again[p] == TRUTH[p] for p in bad), "the mount did not recover"
    if bad:
        log = open(core_mount.list_mounts()[0]["layers"][0]["log"]).read()
        assert "ERROR" in log or "WARNING" in log, "EIO without a logged reason"
    core_mount.unmount(mp)
    assert not core_mount.is_mounted(mp)
    rel.row("network", f"mount: {tried} [{injected} injected]",
            f"{len(TRUTH) - len(bad)}/{len(TRUTH)} files right, {len(bad)} EIO with a logged "
            "reason, 0 wrong; daemon alive; all right after the faults stop")


def test_mounted_registry_restart(make_registry, mount_env, rel):
    reg = make_registry(load=["mini-esgz"])
    p = FaultProxy(reg.url).start()
    try:
        mp = _mount(mount_env, f"{p.host}/fixtures/mini:mini-esgz")
        pid = core_mount.list_mounts()[0]["layers"][0]["pid"]
        first = ["etc/os-release"]
        assert _read_mount(mp, first)["etc/os-release"] == TRUTH["etc/os-release"]
        reg.stop()
        t0 = time.monotonic()
        down = _read_mount(mp, ["data/text.txt"], timeout=150)
        took = time.monotonic() - t0
        assert isinstance(down["data/text.txt"], OSError) and down["data/text.txt"].errno == errno.EIO
        # cached data still served while the registry is down
        assert _read_mount(mp, first)["etc/os-release"] == TRUTH["etc/os-release"]
        os.kill(pid, 0)
        reg.start()
        back = _read_mount(mp, TRUTH)
        assert all(back[k] == TRUTH[k] for k in TRUTH), "no recovery after the registry restart"
        core_mount.unmount(mp)
        rel.row("network", "mount: registry stopped mid-mount, then restarted (same port/storage)",
                f"uncached read: EIO after {took:.0f} s (bounded); cached files still served; "
                "daemon alive; every file right after restart")
    finally:
        p.stop()


def test_mounted_read_with_registry_stopped_fails_once_and_fast(make_registry, mount_env, rel):
    """The registry stopped (nothing listens on its port): an uncached read
    ends in EIO after one retry budget (core.registry.policy.RequestPolicy,
    applied by the registry client alone, not again by the blob source and
    the fetcher) and leaves one log line naming the file and the cause; once
    the registry answers again the same read succeeds without a remount."""
    reg = make_registry(load=["mini-esgz"])
    mp = _mount(mount_env, reg.ref("mini-esgz"))
    st = core_mount.list_mounts()[0]["layers"][0]  # nothing read yet: no chunk cached
    end = time.monotonic() + 30
    while b"pre-resolved" not in open(st["log"], "rb").read():  # its start-up work done
        assert time.monotonic() < end, "the daemon never finished its start"
        time.sleep(0.1)
    with open(st["log"], "rb") as f:
        before = len(f.read())
    reg.stop()
    t0 = time.monotonic()
    down = _read_mount(mp, ["data/text.txt"], timeout=60)["data/text.txt"]
    took = time.monotonic() - t0
    assert isinstance(down, OSError) and down.errno == errno.EIO, down
    time.sleep(0.3)  # let the daemon's log reach the file
    with open(st["log"], "rb") as f:
        lines = f.read()[before:].decode(errors="replace").splitlines()
    assert len(lines) == 1, lines
    assert "read data/text.txt: " in lines[0] and f"cannot reach registry {reg.host}" in lines[0]
    # one budget: 4 attempts, backoff 0.25 s doubling, with jitter (<= 2.7 s)
    assert took < 4.0, f"the read took {took:.1f} s"
    reg.start()  # same port, same storage
    assert _read_mount(mp, ["data/text.txt"])["data/text.txt"] == TRUTH["data/text.txt"]
    assert core_mount.list_mounts()[0]["layers"][0]["pid"] == st["pid"]  # no remount
    core_mount.unmount(mp)
    rel.row("network", "mount: registry stopped, uncached read; then started again",
            f"EIO after {took:.1f} s with one log line naming the file and the cause; "
            "the same read right once it answers, no remount")


def test_mounted_token_expiry(make_token_registry, mount_env, rel, monkeypatch):
    """401 mid-session as a registry answers when a token has expired: the
    daemon fetches a new token and reads go on."""
    reg = make_token_registry(anonymous_pull=True, expires_in=300, load=["mini-esgz"])
    p = FaultProxy(reg.url).start()
    try:
        mp = _mount(mount_env, f"{p.host}/fixtures/mini:mini-esgz")
        p.add("unauthorized", path=BLOBS, count=2)
        got = _read_mount(mp, TRUTH)
        bad = _check(got, "401 mid-session")
        assert not bad, f"reads failed after a 401: {bad}"
        assert len(p.faults()) >= 1
        core_mount.unmount(mp)
        rel.row("network", "mount: 401 with the registry's Bearer challenge mid-session "
                "(token expired) x2", "new token fetched; every file right")
    finally:
        p.stop()


def test_mounted_redirect_url_expires(registry, redirecting_front, mount_env, rel):
    front, cdn = redirecting_front(registry, ttl=2)
    mp = _mount(mount_env, f"{front.host}/fixtures/mini:mini-esgz")
    first = _read_mount(mp, ["etc/os-release"])
    assert first["etc/os-release"] == TRUTH["etc/os-release"]
    time.sleep(3)  # the signed URL the daemon cached has expired now
    got = _read_mount(mp, TRUTH)
    bad = _check(got, "expired redirect")
    assert not bad, f"reads failed after the redirect expired: {bad}"
    core_mount.unmount(mp)
    rel.row("network", "mount: blob redirects to a signed CDN URL valid 2 s; reads after it "
            "expired", "registry asked again for a fresh URL; every file right")
