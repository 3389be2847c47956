"""Total deadlines and plain-HTTP redirects, against real registries.

A registry that trickles (one byte every 2 s through the real fault proxy,
so every single socket read gets data in time and no per-read timeout ever
fires) must end ``inspect`` and ``cat`` with one clear line within the
configured request deadline, and a read through a mount with EIO within the
mount's read timeout (and a line in the daemon log); once the registry is
healthy again the same read succeeds without a remount. Small deadlines are
configured so the tests stay short.

A loopback registry that redirects a blob to plain HTTP on a host off
loopback is refused before any connection is made to that host.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import socket
import subprocess
import sys
import time

import pytest

from core import mount as core_mount

pytestmark = [pytest.mark.reliability, pytest.mark.registry]

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from registry_fixtures import run_cli  # noqa: E402

TRICKLE_ALL = r"/v2/.*/(manifests|blobs)/"
BLOBS = r"/v2/.*/blobs/sha256:"
IMAGE = "fixtures/mini:mini-esgz"
# interpreter start-up and image opening on a loaded 2-core CI machine
SLACK = 10.0


def _trickle(proxy, path: str) -> None:
    proxy.add("trickle", path=path, count=10_000, interval=2.0, seconds=120)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0, r.stdout[:300]
    assert len(lines) == 1 and lines[0].startswith("stargz-tui: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    return lines[0]


def test_inspect_trickling_registry_ends_at_the_deadline(proxy, isolated_env, rel):
    _trickle(proxy, TRICKLE_ALL)
    t0 = time.monotonic()
    r = run_cli(["inspect", f"{proxy.host}/{IMAGE}", "--timeout", "3"], isolated_env, timeout=90)
    took = time.monotonic() - t0
    line = _one_error_line(r)
    assert "within 3 s" in line and proxy.host in line, line
    assert took < 3 + SLACK, f"inspect took {took:.1f} s with a 3 s deadline"
    assert proxy.faults(), "the trickle was never injected"
    rel.row("network", "inspect against a registry trickling 1 byte / 2 s (manifests and blobs), "
            "--timeout 3", f"exit {r.returncode} after {took:.1f} s: {line[:110]}")


def test_cat_trickling_blob_ends_at_the_configured_deadline(proxy, isolated_env, rel):
    # the deadline from registries.toml (what mounts and the app use too)
    with open(isolated_env["STARGZ_TUI_REGISTRIES_CONFIG"], "w") as f:
        f.write("request-timeout = 3\n")
    _trickle(proxy, BLOBS)
    t0 = time.monotonic()
    r = run_cli(["cat", f"{proxy.host}/{IMAGE}", "etc/os-release"], isolated_env, timeout=90)
    took = time.monotonic() - t0
    line = _one_error_line(r)
    assert "within 3 s" in line, line
    assert r.stdout == ""
    assert took < 3 + SLACK, f"cat took {took:.1f} s with a 3 s deadline"
    assert proxy.faults(), "the trickle was never injected"
    rel.row("network", "cat against a registry trickling blob bytes (1 byte / 2 s), "
            "request-timeout = 3 in registries.toml",
            f"exit {r.returncode} after {took:.1f} s: {line[:110]}")


# ----------------------------------------------------------------- FUSE level

@pytest.fixture
def mount_env(tmp_path, monkeypatch, isolated_env):
    from fuse_helpers import isolated_mount_env

    yield from isolated_mount_env(tmp_path, monkeypatch)


def _read(path: str, timeout: float):
    def go():
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(go)
        t0 = time.monotonic()
        try:
            return fut.result(timeout=timeout), time.monotonic() - t0
        except concurrent.futures.TimeoutError:
            pytest.fail(f"a read of {path} hung past {timeout} s")


@pytest.mark.fuse
def test_mounted_read_from_trickling_registry_fails_at_the_read_timeout(
        proxy, registry, mount_env, isolated_env, rel):
    from test_network_faults import TRUTH

    # the registry request deadline (5 s) is longer than the read timeout
    # (2 s): what ends the read is the mount's bound, not the registry's
    with open(isolated_env["STARGZ_TUI_REGISTRIES_CONFIG"], "w") as f:
        f.write("request-timeout = 5\n")
    mp = mount_env.mountpoint("mnt")
    mount_env.mount(f"{proxy.host}/{IMAGE}", mp, layer=0, prefetch=False,
                    background_fetch=False, read_timeout=2)
    st = core_mount.list_mounts()[0]["layers"][0]
    name = "data/text.txt"
    _trickle(proxy, BLOBS)
    got, took = _read(os.path.join(mp, name), timeout=2 + SLACK + 30)
    assert isinstance(got, OSError) and got.errno == errno.EIO, got
    assert took < 2 + SLACK, f"the read failed after {took:.1f} s, read timeout 2 s"
    assert proxy.faults(), "the trickle was never injected"
    with open(st["log"]) as f:
        logged = [ln for ln in f if "ERROR" in ln and "read timeout" in ln and name in ln]
    assert logged, "EIO without a line in the daemon log"
    os.kill(st["pid"], 0)
    # the registry is healthy again: once the stuck fetch has ended (its own
    # 5 s deadline), the same read succeeds on the same mount
    proxy.clear()
    end = time.monotonic() + 30
    while core_mount.list_mounts()[0]["layers"][0]["stats"]["chunksInFlight"]:
        assert time.monotonic() < end, "the stuck fetch never ended"
        time.sleep(0.2)
    again, _ = _read(os.path.join(mp, name), timeout=30)
    assert again == TRUTH[name], "the mount did not recover once the registry was healthy"
    core_mount.unmount(mp)
    rel.row("network", "mount: blob bytes trickled 1 byte / 2 s, --read-timeout 2, "
            "request-timeout 5", f"EIO after {took:.1f} s (each FUSE request bounded; the "
            "kernel retries a failed read-ahead once), logged: "
            f"{logged[0].split(' ERROR ', 1)[-1].strip()[:90]}; the same read right once the "
            "registry is healthy, no remount")


# --------------------------------------------------------- plain-HTTP redirects

def _off_loopback_address() -> str | None:
    """An address of this machine that is not loopback (``hostname -I``)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for a in out.split():
        if ":" not in a and not a.startswith("127."):
            return a
    return None


class _Listener:
    """A TCP listener that only counts the connections it gets."""

    def __init__(self, addr: str):
        self.sock = socket.create_server((addr, 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0

    def count(self) -> int:
        while True:
            try:
                c, _ = self.sock.accept()
            except (TimeoutError, OSError):
                return self.accepted
            self.accepted += 1
            c.close()

    def close(self) -> None:
        self.sock.close()


class _OffLoopbackCdn:
    """What the front's ``redirect_blobs_to`` needs: signs blob URLs on a
    plain-HTTP host off loopback."""

    def __init__(self, host: str):
        self.host = host

    def sign(self, _upstream_url: str, digest: str) -> str:
        return f"http://{self.host}/cdn/{digest}?sig=x"


def test_plain_http_redirect_off_loopback_is_refused_before_connecting(
        registry, front_proxy, isolated_env, rel):
    addr = _off_loopback_address()
    listener = _Listener(addr) if addr else None
    # without an address off loopback, a name that resolves nowhere: the
    # refusal must come before any name lookup or connection
    host = f"{addr}:{listener.port}" if listener else "cdn.stargz-tui-test.invalid:8080"
    front = front_proxy(registry)
    front.redirect_blobs_to = _OffLoopbackCdn(host)
    try:
        r = run_cli(["cat", f"{front.host}/{IMAGE}", "etc/os-release"], isolated_env, timeout=90)
        line = _one_error_line(r)
        assert f"refusing plain-HTTP redirect to {host}" in line, line
        assert "not found" not in line and "cannot reach" not in line, line
        if listener is not None:
            assert listener.count() == 0, "connected to the plain-HTTP host before refusing"
        # configured insecure, the same redirect is followed (the listener
        # answers nothing, so the read fails, but only after connecting)
        if listener is not None:
            r2 = run_cli(["cat", f"{front.host}/{IMAGE}", "etc/os-release", "--timeout", "3",
                          "--insecure-registry", host], isolated_env, timeout=90)
            assert r2.returncode != 0 and "refusing" not in r2.stderr, r2.stderr[-500:]
            assert listener.count() >= 1, "the insecure host was not contacted"
    finally:
        if listener is not None:
            listener.close()
    rel.row("network", "a loopback registry redirects a blob to plain HTTP off loopback "
            f"({'this machine' + chr(39) + 's address' if listener else 'a .invalid name'})",
            f"refused before connecting: {line[:110]}; followed with --insecure-registry HOST")


def test_bulk_read_from_trickling_registry_ends_at_the_deadline(proxy, registry, isolated_env,
                                                                  monkeypatch, rel):
    """The bulk reader (a blocking receive in a worker thread, whose socket
    timeout is per receive) is held to the same deadline: cancelling it
    aborts the receive."""
    import anyio

    from core.errors import BlobReadError
    from core.estargz import load_layer_index, read_file_range
    from core.image import open_image
    from core.reference import parse_reference
    from core.registry.store import RegistryBlobSource, RegistryStore

    monkeypatch.setattr(RegistryBlobSource, "bulk_min", 1)  # every range tries it first

    async def go():
        r = parse_reference(f"{proxy.host}/{IMAGE}")
        store = RegistryStore(r, use_keyring=False, deadline=3)
        try:
            img = await open_image(r, store=store)
            d = img.layers[0]
            src = store.blob_source(d.digest, d.size)
            # regular reads: the source learns the blob's URL for bulk reads
            ix = await load_layer_index(src, expected_toc_digest=d.toc_digest_annotation)
            proxy.add("trickle", path=BLOBS, count=10_000, interval=1.0, seconds=120)
            t0 = time.monotonic()
            with pytest.raises(BlobReadError) as e:
                await read_file_range(ix, src, ix.lookup("data/text.txt"))
            return time.monotonic() - t0, str(e.value), dict(store.client.bulk_reader().stats)
        finally:
            await store.aclose()

    took, msg, stats = anyio.run(go)
    assert "within 3 s" in msg and "\n" not in msg, msg
    assert took < 3 + 3, f"the read took {took:.1f} s with a 3 s deadline"
    assert stats["connections"] >= 1, "the bulk reader was never used"
    assert proxy.faults()
    rel.row("network", "core, bulk range read of a registry trickling 1 byte / s, deadline 3 s",
            f"BlobReadError after {took:.1f} s (bulk receive aborted): {msg[:100]}")


@pytest.mark.fuse
def test_mounted_read_outlasts_two_wrong_answers(proxy, registry, mount_env, rel):
    """One retry layer in the daemon: the blob source asks again after a
    wrong answer, refreshing its URL and tokens, by the client's
    RequestPolicy (up to its attempts); nothing above it retries."""
    from test_network_faults import TRUTH

    mp = mount_env.mountpoint("mnt")
    mount_env.mount(f"{proxy.host}/{IMAGE}", mp, layer=0, prefetch=False,
                    background_fetch=False)
    name = "etc/os-release"  # one small chunk: one range request per attempt
    proxy.add("bad_range", path=BLOBS, count=2, shift=5)
    got, _ = _read(os.path.join(mp, name), timeout=60)
    assert got == TRUTH[name], got
    assert len(proxy.faults()) == 2
    # the source's retries got the bytes: no read failed on the way (the
    # kernel retries a failed read once, which would hide a failure)
    with open(core_mount.list_mounts()[0]["layers"][0]["log"]) as f:
        failed = [ln for ln in f if "core.fusefs ERROR" in ln]
    assert not failed, failed
    core_mount.unmount(mp)
    rel.row("network", "mount: the first two range answers for a file come from the wrong "
            "offset", "the blob source's retries (one policy, after a refresh): right bytes")
