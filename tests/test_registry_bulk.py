"""The bulk range reader (core.registry.bulk) behind RegistryBlobSource against a
real docker-registry: same bytes as the regular path, the regular path's auth
and redirect rules, fallback to the regular path, proxies, cancellation."""

from __future__ import annotations

import hashlib
import os
import time

import anyio
import pytest
from registry_helpers import FIXTURE_LAYOUT

from core.image import OCILayoutStore, open_image
from core.options import Tuning
from core.reference import parse_reference
from core.registry import RegistryClient, RegistryStore, push_blob
from core.registry.config import RegistryConfig
from core.registry.credentials import Credentials
from core.registry.store import RegistryBlobSource

pytestmark = pytest.mark.registry


def _store(ref: str, config: RegistryConfig | None = None, **kw) -> RegistryStore:
    return RegistryStore(parse_reference(ref), config=config or RegistryConfig(),
                         use_keyring=False, **kw)


@pytest.fixture
def big_blob(make_registry, isolated_env):
    """A registry holding one 5 MiB random blob: (registry, data, digest)."""
    reg = make_registry()
    data = os.urandom(5 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    async def push():
        c = RegistryClient(reg.host, config=RegistryConfig(), use_keyring=False)
        try:
            await push_blob(c, "bulk/blob", digest, data=data)
        finally:
            await c.aclose()

    anyio.run(push)
    return reg, data, digest


def test_bulk_reads_are_the_same_bytes(big_blob):
    reg, data, digest = big_blob

    async def run(bulk: bool):
        store = _store(f"{reg.host}/bulk/blob:x")
        src = store.blob_source(digest, len(data))
        if not bulk:
            src.bulk_min = 1 << 40
        try:
            out = [await src.read_range(0, 100)]  # regular: learns the URL
            for off, n in ((0, 1 << 20), (len(data) - (2 << 20), 2 << 20), (12345, 3 << 20),
                           (len(data) - (1 << 20) + 7, 2 << 20)):  # the last one is clipped
                out.append(await src.read_range(off, n))

            async def par(i):
                out.append(await src.read_range(i << 20, 1 << 20))

            async with anyio.create_task_group() as tg:
                for i in range(4):
                    tg.start_soon(par, i)
            return out, src.bulk_reads, src.requests
        finally:
            await store.aclose()

    got, bulk_reads, requests = anyio.run(run, True)
    regular, none, _ = anyio.run(run, False)
    assert got[:5] == regular[:5]
    assert got[1] == data[:1 << 20] and got[3] == data[12345:12345 + (3 << 20)]
    assert got[4] == data[len(data) - (1 << 20) + 7:]
    assert sorted(got[5:]) == sorted(data[i << 20:(i + 1) << 20] for i in range(4))
    assert bulk_reads == 7 and requests == 9 and none == 0  # clipped one < bulk_min


def test_bulk_reads_under_trio(big_blob):
    reg, data, digest = big_blob

    async def run():
        store = _store(f"{reg.host}/bulk/blob:x")
        src = store.blob_source(digest, len(data))
        try:
            await src.read_range(0, 10)
            return await src.read_range(1 << 20, 2 << 20), src.bulk_reads
        finally:
            await store.aclose()

    got, n = anyio.run(run, backend="trio")
    assert got == data[1 << 20:3 << 20] and n == 1


@pytest.mark.parametrize("env", [
    {"HTTPS_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost"},  # httpx: direct
    {"STARGZ_TUI_BULK_READS": "0"},
])
def test_bulk_not_used_behind_a_proxy_or_when_off(big_blob, monkeypatch, env):
    reg, data, digest = big_blob
    for k, v in env.items():
        monkeypatch.setenv(k, v)

    async def run():
        # STARGZ_TUI_BULK_READS is read at the edge (core.options.Tuning), as
        # the CLI's registry options and a daemon's config do
        store = _store(f"{reg.host}/bulk/blob:x", bulk_reads=Tuning.from_env().bulk_reads)
        src = store.blob_source(digest, len(data))
        try:
            await src.read_range(0, 10)
            return await src.read_range(0, 2 << 20), src.bulk_reads
        finally:
            await store.aclose()

    got, n = anyio.run(run)
    assert got == data[:2 << 20] and n == 0


def test_bulk_sends_credentials_to_the_registry_only(basic_registry, redirecting_front,
                                                     isolated_env, monkeypatch):
    """Through a redirecting front: bulk reads go to the signed CDN URL without
    credentials; direct to a registry with Basic auth they carry them."""
    monkeypatch.setattr(RegistryBlobSource, "bulk_min", 1)
    front, cdn = redirecting_front(basic_registry)
    creds = Credentials("alice", basic_registry.users["alice"], "test")

    async def run(host):
        store = _store(host + "/fixtures/mini:mini-esgz", credentials=creds)
        try:
            img = await open_image(store.ref, store=store)
            layer = img.layers[0]
            src = store.blob_source(layer.digest, layer.size)
            local = OCILayoutStore(FIXTURE_LAYOUT).blob_source(layer.digest, layer.size)
            for off, n in ((0, 1000), (1000, 5000), (layer.size - 51, 51)):
                assert await src.read_range(off, n) == await local.read_range(off, n)
            return src.bulk_reads
        finally:
            await store.aclose()

    assert anyio.run(run, front.host) == 2
    assert len(cdn.requests) >= 4  # config blob, first range (regular), 2 bulk reads
    assert all("Authorization" not in h and "authorization" not in h for _, h in cdn.requests)
    layer_gets = [p for m, p, h in front.requests if m == "GET" and "/blobs/" in p]
    assert len(layer_gets) == 2  # config blob + the first range: later ones use the CDN URL
    assert anyio.run(run, basic_registry.host) == 2  # 401 without them: would fall back


def test_bulk_with_tokens_and_expiry(token_registry, isolated_env, monkeypatch):
    monkeypatch.setattr(RegistryBlobSource, "bulk_min", 1)
    creds = Credentials("alice", token_registry.users["alice"], "test")

    async def run():
        store = _store(token_registry.ref("mini-esgz"), credentials=creds)
        try:
            img = await open_image(store.ref, store=store)
            layer = img.layers[0]
            src = store.blob_source(layer.digest, layer.size)
            local = OCILayoutStore(FIXTURE_LAYOUT).blob_source(layer.digest, layer.size)
            a = await src.read_range(0, 3000)
            b = await src.read_range(3000, 3000)  # bulk, with the cached token
            n = src.bulk_reads
            # a token the registry no longer takes (the next one is issued
            # expired): bulk answers 401, the regular path renews it
            store.client.invalidate_tokens()
            token_registry.issuer.expired_tokens = 1
            c = await src.read_range(6000, 3000)
            d = await src.read_range(9000, 3000)  # bulk again with the new token
            assert a + b + c + d == await local.read_range(0, 12000)
            return n, src.bulk_reads
        finally:
            await store.aclose()

    n1, n2 = anyio.run(run)
    assert n1 == 1 and n2 == 2


def test_bulk_read_cancelled_promptly(big_blob):
    """A bulk read blocked on a silent server ends when its caller is cancelled."""
    import socket
    import threading

    reg, data, digest = big_blob
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    conns = []
    stop = threading.Event()

    def accept():
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(silent.accept()[0])  # read nothing, answer nothing
            except OSError:
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()

    async def run():
        store = _store(f"{reg.host}/bulk/blob:x")
        src = store.blob_source(digest, len(data))
        try:
            await src.read_range(0, 10)
            host, port = silent.getsockname()
            src._bulk_target = (f"http://{host}:{port}/v2/bulk/blob/blobs/{digest}", None)
            t = time.monotonic()
            with anyio.move_on_after(0.5):
                await src.read_range(0, 2 << 20)
            return time.monotonic() - t
        finally:
            await store.aclose()

    try:
        took = anyio.run(run)
    finally:
        stop.set()
        th.join(5)
        for c in conns:
            c.close()
        silent.close()
    assert took < 5


def _make_tls_files(d) -> tuple[str, str, str]:
    """A CA and a server certificate for 127.0.0.1: (ca.pem, cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stargz-tui test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = [str(d / n) for n in ("ca.pem", "cert.pem", "key.pem")]
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths[0], paths[1], paths[2]


def test_bulk_reads_over_verified_tls(tmp_path, isolated_env, monkeypatch):
    """https: bulk reads verify the registry's certificate like the regular
    client (SSL_CERT_FILE here); without the CA they fail and so does the
    regular path, with its one clear error."""
    from registry_helpers import Registry

    from core.errors import CoreError

    ca, cert, key = _make_tls_files(tmp_path)

    class TLSRegistry(Registry):
        @property
        def url(self) -> str:
            return f"https://{self.host}"

        def _config(self) -> str:
            return super()._config().replace(
                f"  addr: 127.0.0.1:{self.port}\n",
                f"  addr: 127.0.0.1:{self.port}\n  tls:\n    certificate: {cert}\n"
                f"    key: {key}\n")

    monkeypatch.setenv("SSL_CERT_FILE", ca)
    reg = TLSRegistry(str(tmp_path / "reg")).start()
    tls = RegistryConfig(tls={reg.host})  # loopback, yet https
    try:
        data = os.urandom(3 << 20)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()

        async def run():
            c = RegistryClient(reg.host, config=tls, use_keyring=False)
            try:
                await push_blob(c, "bulk/tls", digest, data=data)
            finally:
                await c.aclose()
            store = _store(f"{reg.host}/bulk/tls:x", tls)
            src = store.blob_source(digest, len(data))
            try:
                await src.read_range(0, 10)
                return await src.read_range(100, 2 << 20), src.bulk_reads
            finally:
                await store.aclose()

        got, n = anyio.run(run)
        assert got == data[100:100 + (2 << 20)] and n == 1

        async def untrusted():
            store = _store(f"{reg.host}/bulk/tls:x", tls)
            src = store.blob_source(digest, len(data))
            src._bulk_target = (f"https://{reg.host}/v2/bulk/tls/blobs/{digest}", None)
            try:
                with pytest.raises(CoreError) as e:
                    await src.read_range(0, 2 << 20)
                return str(e.value), src.bulk_reads
            finally:
                await store.aclose()

        monkeypatch.delenv("SSL_CERT_FILE")
        msg, n = anyio.run(untrusted)
        assert n == 0 and "could not be verified" in msg and "\n" not in msg
    finally:
        reg.stop()


def test_bulk_reconnects_when_the_server_closed_an_idle_connection(big_blob):
    reg, data, digest = big_blob

    async def run():
        store = _store(f"{reg.host}/bulk/blob:x")
        src = store.blob_source(digest, len(data))
        try:
            await src.read_range(0, 10)
            a = await src.read_range(0, 1 << 20)  # leaves a keep-alive connection
            reg.restart()  # which the server closes
            b = await src.read_range(1 << 20, 1 << 20)
            stats = store.client.bulk_reader().stats
            return a + b, src.bulk_reads, stats["fallbacks"], stats["connections"]
        finally:
            await store.aclose()

    got, n, fallbacks, connections = anyio.run(run)
    assert got == data[:2 << 20] and n == 2 and fallbacks == 0 and connections == 2
