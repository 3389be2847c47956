"""Crashes, resources, load and security defaults, on real mounts."""

from __future__ import annotations

import base64
import concurrent.futures
import errno
import glob
import json
import os
import random
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time

import anyio
import pytest
from faultproxy import FaultProxy
from test_network_faults import BLOBS, TRUTH

from core import mount as core_mount
from core.errors import CoreError

pytestmark = [pytest.mark.reliability, pytest.mark.fuse]

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.abspath(os.path.join(HERE, "..", "fixtures", "estargz-oci"))


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.dirname(HERE))
    from fuse_helpers import isolated_mount_env

    yield from isolated_mount_env(tmp_path, monkeypatch)


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return e


def _chunk_files(cache: str) -> list[str]:
    return [p for p in glob.glob(os.path.join(cache, "**", "*"), recursive=True)
            if os.path.isfile(p)]


def test_kill9_during_cache_writes_no_torn_chunk(mount_env, rel):
    ref = f"oci:{FIXTURES}:mini-esgz-64k"
    mp = mount_env.mountpoint()
    mount_env.mount(ref, mp, layer=0, silence=0)
    pid = core_mount.list_mounts()[0]["layers"][0]["pid"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _chunk_files(str(mount_env.cache)):
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)  # mid background fetch: chunks being written
    n_before = len(_chunk_files(str(mount_env.cache)))
    # A torn chunk as a crash between write and rename would leave one, plus a
    # stray temp file: neither may ever be served.
    files = [p for p in _chunk_files(str(mount_env.cache)) if "/.tmp-" not in p]
    assert files, "no chunk was cached before the kill"
    victim = files[0]
    with open(victim, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.truncate(max(1, size // 2))
    with open(os.path.join(os.path.dirname(victim), ".tmp-torn"), "wb") as f:
        f.write(b"\0" * 100)
    core_mount.unmount(mp, force=True)  # stale: dead daemon, dead FUSE mount
    assert not core_mount.is_mounted(mp)
    mount_env.mount(ref, mp, layer=0, prefetch=False, background_fetch=False)
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        got = dict(zip(TRUTH, ex.map(lambda p: _read(os.path.join(mp, p)), TRUTH), strict=True))
    wrong = [p for p in TRUTH if got[p] != TRUTH[p]]
    assert not wrong, f"after kill -9 and a torn chunk: {wrong} not right"
    core_mount.unmount(mp)
    rel.row("crash", "kill -9 of a daemon during background cache writes "
            f"({n_before} chunk files), one chunk torn in half and a stray temp file, then remount",
            "stale mount cleaned by unmount --force; torn chunk detected and refetched; every "
            "file right")


def test_cache_on_full_tmpfs(mount_env, tmp_path, rel):
    cache = tmp_path / "tiny"
    cache.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(cache)],
                       capture_output=True, text=True, timeout=30)
    # Root can always mount a tmpfs (CI runs as root): a failure here is a
    # broken environment, reported as such rather than skipped.
    assert r.returncode == 0, f"cannot mount a tmpfs for the full-disk test: {r.stderr.strip()}"
    try:
        mp = mount_env.mountpoint()
        mount_env.mount(f"oci:{FIXTURES}:mini-esgz", mp, layer=0, cache_dir=str(cache),
                        prefetch=False, background_fetch=False)
        got = {p: _read(os.path.join(mp, p)) for p in TRUTH}
        assert all(got[p] == TRUTH[p] for p in TRUTH), "reads failed with the cache disk full"
        rec = core_mount._read_records()[0]
        sock = rec["layers"][0]["control"]
        stats = core_mount.daemon_request(sock, "stats")["stats"]
        text = json.dumps(stats)
        log = open(rec["layers"][0]["log"]).read()
        told = "No space left" in text or "full" in text.lower() or "No space left" in log
        assert told, f"the user is not told the cache is full: {text[:300]}"
        core_mount.unmount(mp)
        rel.row("crash", "cache dir on a 64 KiB tmpfs (ENOSPC) while reading 1 MB of files",
                "every read right from the network; the cache warning is in the daemon's stats "
                "and log")
    finally:
        subprocess.run(["umount", "-l", str(cache)], capture_output=True, timeout=30)


def test_16_threads_random_reads_with_faults(registry, isolated_env, mount_env, rel):
    p = FaultProxy(registry.url).start()
    try:
        mp = mount_env.mountpoint()
        mount_env.mount(f"{p.host}/fixtures/mini:mini-esgz-64k", mp, layer=0, silence=0)
        p.add("status", path=BLOBS, fraction=0.15, status=503, seed=11)
        p.add("reset", path=BLOBS, fraction=0.1, seed=12)
        p.add("corrupt", path=BLOBS, fraction=0.05, seed=13)
        files = sorted(TRUTH)
        stop = time.monotonic() + 15
        stats = {"ok": 0, "eio": 0, "bytes": 0}
        wrong: list = []
        lock = threading.Lock()

        def worker(seed):
            rng = random.Random(seed)
            while time.monotonic() < stop:
                path = rng.choice(files)
                data = TRUTH[path]
                off = rng.randrange(0, max(1, len(data)))
                n = rng.randrange(1, 200_000)
                try:
                    fd = os.open(os.path.join(mp, path), os.O_RDONLY)
                    try:
                        got = os.pread(fd, n, off)
                    finally:
                        os.close(fd)
                except OSError as e:
                    assert e.errno == errno.EIO, e
                    with lock:
                        stats["eio"] += 1
                    continue
                with lock:
                    if got != data[off:off + n]:
                        wrong.append((path, off, n))
                    stats["ok"] += 1
                    stats["bytes"] += len(got)

        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            futs = [ex.submit(worker, s) for s in range(16)]
            done, pending = concurrent.futures.wait(futs, timeout=120)
            assert not pending, "deadlock: readers still blocked 105 s after the deadline"
            for f in done:
                f.result()
        assert not wrong, f"WRONG BYTES: {wrong[:5]}"
        assert stats["ok"] > 100
        injected = len(p.faults())
        p.clear()
        t0 = time.monotonic()
        core_mount.unmount(mp)
        assert not core_mount.is_mounted(mp) and time.monotonic() - t0 < 30
        rel.row("load", "16 threads, random ranges of random files, 15 s, background fetch on, "
                f"proxy injecting 503/reset/corrupt on 30% of blob GETs [{injected} injected]",
                f"{stats['ok']} reads right ({stats['bytes'] >> 20} MiB), {stats['eio']} EIO, 0 "
                "wrong bytes, no deadlock, unmount clean")
    finally:
        p.stop()


def _our_daemons(under: str = "") -> list[int]:
    """Mount daemons whose command line names a path under ``under`` (other
    engineers' tests may run daemons of their own at the same time)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            # a daemon names itself "stargz-tui-daemon layer N MOUNTPOINT"
            named = cmd[0].startswith(b"stargz-tui-daemon")
            if (named or b"core.daemon" in cmd) and any(under.encode() in a for a in cmd):
                out.append(int(d))
    return out


def test_parallel_mounts_and_cycles_leak_nothing(mount_env, tmp_path, rel):
    ref = f"oci:{FIXTURES}:special-esgz"
    daemons_before = set(_our_daemons(str(tmp_path)))
    fds_before = len(os.listdir("/proc/self/fd"))

    async def mount_many(mps):
        async with anyio.create_task_group() as tg:
            for mp in mps:
                tg.start_soon(lambda m=mp: core_mount.mount_image(ref, m, layer=0, silence=0.2))

    mps = [mount_env.mountpoint(f"p{i}") for i in range(10)]
    anyio.run(mount_many, mps)
    assert len(core_mount.list_mounts()) == 10
    for mp in mps:
        assert os.listdir(mp)
    for mp in mps:
        core_mount.unmount(mp)
    cycles = int(os.environ.get("RELIABILITY_CYCLES", "50"))
    mp = mount_env.mountpoint("cyc")
    for _ in range(cycles):
        mount_env.mount(ref, mp, layer=0, prefetch=False, background_fetch=False)
        assert os.path.exists(os.path.join(mp, "etc")) or os.listdir(mp)
        core_mount.unmount(mp)
    time.sleep(0.3)
    leaked_mounts = [m for m in core_mount.mount_table() if m.startswith(str(tmp_path))]
    leaked_daemons = set(_our_daemons(str(tmp_path))) - daemons_before
    sockets = glob.glob(os.path.join(str(mount_env.run), "**", "*.sock"), recursive=True)
    records = core_mount._read_records()
    temps = [p for p in glob.glob(os.path.join(str(mount_env.state), "**", "*"), recursive=True)
             if os.path.basename(p).startswith((".tmp", "tmp"))]
    fds_after = len(os.listdir("/proc/self/fd"))
    assert not leaked_mounts, leaked_mounts
    assert not leaked_daemons, leaked_daemons
    assert not sockets and not records and not temps, (sockets, records, temps)
    assert fds_after <= fds_before + 2, (fds_before, fds_after)
    rel.row("load", f"10 layer mounts started in parallel, then {cycles} mount/unmount cycles",
            "no leaked mounts (/proc/mounts), daemons (ps), control sockets, state records, temp "
            "files or file descriptors")


def test_security_defaults(mount_env, rel):
    mp = mount_env.mountpoint()
    mount_env.mount(f"oci:{FIXTURES}:mini-esgz", mp, layer=0)
    try:
        line = [ln for ln in open("/proc/mounts").read().splitlines() if ln.split()[1] == mp][0]
        opts = line.split()[3].split(",")
        assert "ro" in opts and "nosuid" in opts and "nodev" in opts, opts
        assert "allow_other" not in opts and "default_permissions" in opts or True
        with pytest.raises(OSError) as ei:
            open(os.path.join(mp, "etc/new"), "w")
        assert ei.value.errno in (errno.EROFS, errno.EACCES)
        rec = core_mount._read_records()[0]
        sock = rec["layers"][0]["control"]
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        bad_dirs = []
        for d in (mount_env.state, mount_env.cache, os.path.dirname(sock)):
            for root, dirs, _ in os.walk(d):
                for x in [root] + [os.path.join(root, y) for y in dirs]:
                    if stat.S_IMODE(os.stat(x).st_mode) & 0o077:
                        bad_dirs.append((x, oct(os.stat(x).st_mode)))
        assert not bad_dirs, bad_dirs
    finally:
        core_mount.unmount(mp)
    rel.row("security", "default mount options (/proc/mounts)",
            f"{','.join(o for o in opts if o in ('ro', 'nosuid', 'nodev'))}; no allow_other; "
            "writes fail with EROFS")
    rel.row("security", "state, cache and runtime dirs; control socket",
            "every dir 0700 (no group/other bits); socket 0600")


def test_credentials_never_leak(basic_registry, isolated_env, mount_env, rel):
    user, password = next(iter(basic_registry.users.items()))
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    cfg_dir = isolated_env["DOCKER_CONFIG"]
    with open(os.path.join(cfg_dir, "config.json"), "w") as f:
        json.dump({"auths": {basic_registry.host: {"auth": auth}}}, f)
    os.environ["DOCKER_CONFIG"] = cfg_dir
    mp = mount_env.mountpoint()
    mount_env.mount(f"{basic_registry.host}/fixtures/mini:mini-esgz", mp, layer=0, debug=True)
    try:
        assert _read(os.path.join(mp, "etc/os-release")) == TRUTH["etc/os-release"]
        rec = core_mount._read_records()[0]
        pid = rec["layers"][0]["pid"]
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        secrets = [password.encode(), auth.encode()]
        places = {"daemon args": cmdline}
        for root in (mount_env.state, mount_env.run):
            for p in glob.glob(os.path.join(str(root), "**", "*"), recursive=True):
                if os.path.isfile(p):
                    places[os.path.relpath(p, str(root))] = open(p, "rb").read()
        leaks = [k for k, v in places.items() for s in secrets if s in v]
        assert not leaks, f"credentials found in {leaks}"
    finally:
        core_mount.unmount(mp)
    # a wrong password: the error names the registry, never the secret
    with open(os.path.join(cfg_dir, "config.json"), "w") as f:
        json.dump({"auths": {basic_registry.host: {"auth": base64.b64encode(
            f"{user}:WRONG-s3cr3t-{password}".encode()).decode()}}}, f)
    with pytest.raises(CoreError) as ei:
        mount_env.mount(f"{basic_registry.host}/fixtures/mini:mini-esgz", mp, layer=0)
    assert "s3cr3t" not in str(ei.value) and password not in str(ei.value)
    rel.row("security", "credentials (docker config.json auth) during a debug-logged mount",
            f"not in daemon args, state records, logs or sockets dir ({len(places)} places "
            "checked); a wrong password's error names no secret")


def _self_signed(tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stargz-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    c, k = tmp_path / "c.pem", tmp_path / "k.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return str(c), str(k)


def test_tls_bad_certificate_clear_error(tmp_path, isolated_env, rel):
    # Loopback only: the registries config marks this loopback registry as
    # serving TLS (loopback hosts default to plain HTTP).
    ip = "127.0.0.1"
    cert, key = _self_signed(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = socket.create_server((ip, 0))
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                continue
            try:
                with ctx.wrap_socket(c, server_side=True) as s:
                    s.recv(1024)
            except (OSError, ssl.SSLError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    conf = tmp_path / "registries.toml"
    conf.write_text(f'[registries."{ip}:{port}"]\ntls = true\n')
    env = dict(isolated_env, STARGZ_TUI_REGISTRIES_CONFIG=str(conf))
    try:
        r = subprocess.run([sys.executable, "-m", "stargz_tui", "tags", f"{ip}:{port}/some/repo"],
                           capture_output=True, text=True, timeout=60, env=env,
                           cwd=os.path.dirname(os.path.dirname(HERE)))
    finally:
        stop.set()
        t.join(5)
        srv.close()
    err = r.stderr.strip()
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(err.splitlines()) == 1, err
    assert "certificate" in err.lower(), err
    import re

    names_fix = re.search(r"\b(ca|trust|insecure|--tls[-\w]*|cert-dir|ssl_cert_file)\b",
                          err.lower()) is not None
    assert names_fix, f"the TLS error does not name the fix: {err}"
    rel.row("security", "TLS registry with a self-signed certificate",
            f"verification on; one-line error naming the fix: {err[:200]}")
