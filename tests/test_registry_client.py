"""RegistryStore / RegistryClient / RegistryBlobSource against a real docker-registry:
same results as the OCI layout, pagination, redirects, retries, mirrors, verification."""

from __future__ import annotations

import json
import os
import threading
import time

import anyio
import pytest
from registry_helpers import FIXTURE_LAYOUT, fixture_tags, free_port

from core.errors import (
    BlobReadError,
    DigestMismatchError,
    FormatError,
    NotFoundError,
    RegistryError,
    RegistryUnreachableError,
)
from core.image import OCILayoutStore, open_image
from core.reference import Reference, parse_reference
from core.registry import (
    RegistryClient,
    RegistryStore,
    parse_www_authenticate,
    push_blob,
    push_manifest,
    push_oci_layout,
)
from core.registry.config import RegistryConfig, load_config
from core.registry.credentials import Credentials

pytestmark = pytest.mark.registry


def _store(ref: str, config=None, **kw) -> RegistryStore:
    return RegistryStore(parse_reference(ref), config=config or RegistryConfig(),
                         use_keyring=False, **kw)


@pytest.mark.parametrize("tag", fixture_tags())
def test_registry_image_equals_oci_layout(registry, tag, isolated_env):
    async def run():
        store = _store(registry.ref(tag))
        try:
            img = await open_image(store.ref, store=store)
            local = await open_image(Reference("oci", tag=tag, layout_dir=FIXTURE_LAYOUT),
                                     store=OCILayoutStore(FIXTURE_LAYOUT))
            assert img.manifest_digest == local.manifest_digest == registry.digests[tag]
            assert img.config == local.config
            assert [(x.digest, x.size, x.annotations, x.diff_id) for x in img.layers] == \
                [(x.digest, x.size, x.annotations, x.diff_id) for x in local.layers]
            layer = img.layers[-1]
            src = store.blob_source(layer.digest, layer.size)
            lsrc = local.store.blob_source(layer.digest, layer.size)
            for off, n in ((0, 1), (layer.size - 64, 64), (layer.size // 3, 4096),
                           (layer.size - 10, 100)):
                assert await src.read_range(off, n) == await lsrc.read_range(off, n)
            assert src.requests == 4 and src.bytes_read == lsrc.bytes_read
            assert await src.read_range(layer.size, 10) == b""
            # by digest, verified
            body, mt, digest = await store.get_manifest(store.ref.with_digest(img.manifest_digest))
            assert digest == img.manifest_digest and mt == img.manifest_media_type
            mt2, d2, size = await store.head_manifest(store.ref)
            assert d2 == img.manifest_digest and size == len(body)
        finally:
            await store.aclose()

    anyio.run(run)


def test_missing_tag_and_blob_are_not_found(registry, isolated_env):
    async def run():
        store = _store(registry.host + "/fixtures/mini:no-such-tag")
        try:
            with pytest.raises(NotFoundError, match="tag 'no-such-tag' not found"):
                await store.get_manifest(store.ref)
            src = store.blob_source("sha256:" + "0" * 64, 100)
            with pytest.raises(BlobReadError, match="not found"):
                await src.read_range(0, 10)
        finally:
            await store.aclose()

    anyio.run(run)


def _push_many(reg, n_repos: int, n_tags: int) -> None:
    """Push one tiny image under many repositories and tags (manifest PUT + blob uploads)."""
    async def run():
        client = RegistryClient(reg.host, config=RegistryConfig(), use_keyring=False)
        try:
            config = json.dumps({"architecture": "amd64", "os": "linux",
                                 "rootfs": {"type": "layers", "diff_ids": []}}).encode()
            import hashlib

            cdig = "sha256:" + hashlib.sha256(config).hexdigest()
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cdig, "size": len(config)},
                "layers": []}).encode()
            for r in range(n_repos):
                repo = f"paging/repo{r:02d}"
                await push_blob(client, repo, cdig, data=config)
                tags = n_tags if r == 0 else 1
                for t in range(tags):
                    await push_manifest(client, repo, f"t{t:02d}", manifest,
                                        "application/vnd.oci.image.manifest.v1+json")
        finally:
            await client.aclose()

    anyio.run(run)


def test_catalog_and_tags_pagination(make_registry, front_proxy, isolated_env):
    reg = make_registry()
    _push_many(reg, n_repos=5, n_tags=7)
    front = front_proxy(reg)
    front.paginate_tags = True  # docker-registry 2.8 ignores n= for tags/list

    async def run():
        client = RegistryClient(reg.host, config=RegistryConfig(), use_keyring=False)
        n0 = client.stats["requests"]
        repos = [r async for r in client.iter_catalog(page_size=2)]
        catalog_requests = client.stats["requests"] - n0
        await client.aclose()
        client = RegistryClient(front.host, config=RegistryConfig(), use_keyring=False)
        try:
            n0 = client.stats["requests"]
            tags = [t async for t in client.iter_tags("paging/repo00", page_size=3)]
            tag_requests = client.stats["requests"] - n0
            page, more = await client.list_page("/v2/paging/repo00/tags/list", "tags",
                                                "repository:paging/repo00:pull", n=3,
                                                last="t02")
            return repos, catalog_requests, tags, tag_requests, page, more
        finally:
            await client.aclose()

    repos, creq, tags, treq, page, more = anyio.run(run)
    assert repos == [f"paging/repo{r:02d}" for r in range(5)]
    assert creq >= 3  # 5 repos at 2 per page
    assert sorted(tags) == [f"t{t:02d}" for t in range(7)]
    assert treq >= 3
    assert page == ["t03", "t04", "t05"] and more


def test_redirect_never_sends_authorization_to_cdn(basic_registry, redirecting_front,
                                                   isolated_env):
    front, cdn = redirecting_front(basic_registry)
    creds = Credentials("alice", basic_registry.users["alice"], "test")

    async def run():
        store = _store(front.host + "/fixtures/mini:mini-esgz", credentials=creds)
        try:
            img = await open_image(store.ref, store=store)
            layer = img.layers[0]
            src = store.blob_source(layer.digest, layer.size)
            a = await src.read_range(0, 1000)
            b = await src.read_range(layer.size - 51, 51)
            local = OCILayoutStore(FIXTURE_LAYOUT).blob_source(layer.digest, layer.size)
            assert a == await local.read_range(0, 1000)
            assert b == await local.read_range(layer.size - 51, 51)
            return store.client.stats["redirects"]
        finally:
            await store.aclose()

    redirects = anyio.run(run)
    assert redirects >= 2  # the config blob and the first range read
    assert cdn.requests, "the CDN was never asked"
    assert all("Authorization" not in h and "authorization" not in h for _, h in cdn.requests)
    front_auth = [h for m, p, h in front.requests if "/blobs/" in p and "Authorization" in h]
    assert front_auth, "the registry front should have seen our credentials"
    # the second range read reused the cached signed URL: one registry round trip per blob
    layer_gets = [p for m, p, h in front.requests if m == "GET" and "/blobs/" in p]
    assert len(layer_gets) == 2


def test_expired_signed_url_goes_back_to_registry(registry, redirecting_front, isolated_env):
    front, cdn = redirecting_front(registry, ttl=0.5)

    async def run():
        store = _store(front.host + "/fixtures/mini:mini-esgz")
        try:
            img = await open_image(store.ref, store=store)
            layer = img.layers[0]
            src = store.blob_source(layer.digest, layer.size)
            await src.read_range(0, 10)
            await anyio.sleep(0.7)
            data = await src.read_range(10, 10)
            return layer.digest, data
        finally:
            await store.aclose()

    digest, data = anyio.run(run)
    assert len(data) == 10
    gets = [p for m, p, h in front.requests if m == "GET" and digest in p]
    assert len(gets) == 2  # asked the registry again after the URL expired
    assert cdn.expired_hits == 1


def test_retries_5xx_and_429_with_retry_after(registry, front_proxy, isolated_env):
    front = front_proxy(registry)

    async def run():
        store = _store(front.host + "/fixtures/mini:mini-esgz", backoff=0.05)
        try:
            front.fail_next(2, 503)
            await store.get_manifest(store.ref)
            assert store.client.stats["retries"] == 2
            front.fail_next(1, 429, {"Retry-After": "1"})
            t = time.monotonic()
            await store.get_manifest(store.ref)
            assert time.monotonic() - t >= 0.9
            front.drop_next(1)
            await store.get_manifest(store.ref)
            assert store.client.stats["retries"] == 4
        finally:
            await store.aclose()

    anyio.run(run)


def test_retries_are_bounded_and_error_names_host_and_status(registry, front_proxy,
                                                             isolated_env):
    front = front_proxy(registry)
    front.fail_next(50, 502)

    async def run():
        store = _store(front.host + "/fixtures/mini:mini-esgz", backoff=0.01, max_attempts=3)
        try:
            with pytest.raises(RegistryError) as e:
                await store.get_manifest(store.ref)
            return str(e.value)
        finally:
            await store.aclose()

    t = time.monotonic()
    msg = anyio.run(run)
    assert time.monotonic() - t < 10
    assert front.host in msg and "502" in msg and "3 attempts" in msg and "\n" not in msg


def test_blob_source_survives_registry_restart(make_registry, isolated_env):
    reg = make_registry(load=["mini-esgz"])

    async def run():
        store = _store(reg.ref("mini-esgz"), backoff=0.2)
        try:
            img = await open_image(store.ref, store=store)
            layer = img.layers[0]
            src = store.blob_source(layer.digest, layer.size)
            first = await src.read_range(0, 100)
            reg.stop()
            t = threading.Timer(0.4, reg.start)
            t.start()
            try:
                second = await src.read_range(0, 100)
            finally:
                t.join(30)
            return first, second, reg.port
        finally:
            await store.aclose()

    port = reg.port
    first, second, port2 = anyio.run(run)
    assert first == second and port2 == port and reg.running


def test_manifest_digest_mismatch_detected(registry, front_proxy, isolated_env):
    front = front_proxy(registry)
    front.alter_manifest = lambda body: body.replace(b'"schemaVersion":2', b'"schemaVersion": 2')

    async def run():
        store = _store(front.host + "/fixtures/mini:mini-esgz")
        try:
            with pytest.raises(DigestMismatchError, match="Docker-Content-Digest"):
                await store.get_manifest(store.ref)
            by_digest = store.ref.with_digest(registry.digests["mini-esgz"])
            with pytest.raises(DigestMismatchError, match="fetched by digest"):
                await store.get_manifest(by_digest)
        finally:
            await store.aclose()

    anyio.run(run)


def test_unsupported_media_type_refused(registry, front_proxy, isolated_env):
    front = front_proxy(registry)
    front.manifest_content_type = "application/vnd.docker.distribution.manifest.v1+prettyjws"

    async def run():
        store = _store(front.host + "/fixtures/mini:mini-esgz")
        try:
            with pytest.raises(FormatError, match="schema 1"):
                await store.get_manifest(store.ref)
            front.manifest_content_type = "application/vnd.cncf.helm.chart.v1+json"
            with pytest.raises(FormatError, match="unsupported media type"):
                await store.get_manifest(store.ref)
        finally:
            await store.aclose()

    anyio.run(run)


def test_mirrors_in_order_with_fallback(registry, make_registry, front_proxy, isolated_env,
                                        tmp_path):
    empty = make_registry()  # a mirror that lacks the content
    front = front_proxy(registry)  # a mirror that has it
    dead = f"127.0.0.1:{free_port()}"
    origin = make_registry(load=["mini-esgz"])
    cfg_path = tmp_path / "registries.toml"
    cfg_path.write_text(f'[registries."{origin.host}"]\nmirrors = ["{dead}", "{empty.host}", '
                        f'"http://{front.host}"]\n')
    cfg = load_config(str(cfg_path))
    assert cfg.mirrors_for(origin.host) == [dead, empty.host, f"http://{front.host}"]

    async def run():
        store = _store(origin.ref("mini-esgz"), config=cfg, max_attempts=1)
        try:
            img = await open_image(store.ref, store=store)
            layer = img.layers[0]
            data = await store.blob_source(layer.digest, layer.size).read_range(0, 10)
            return img, data
        finally:
            await store.aclose()

    img, data = anyio.run(run)
    assert img.manifest_digest == registry.digests["mini-esgz"] and len(data) == 10
    assert any("/manifests/mini-esgz" in p for _, p, _ in front.requests)
    # origin is the fallback when no mirror has the content
    origin_only = make_registry(load=["mini-gzip"])
    cfg2 = RegistryConfig(mirrors={origin_only.host: [empty.host]})

    async def run2():
        store = _store(origin_only.ref("mini-gzip"), config=cfg2)
        try:
            return await open_image(store.ref, store=store)
        finally:
            await store.aclose()

    assert anyio.run(run2).manifest_digest == registry.digests["mini-gzip"]


def test_plain_http_only_for_loopback_or_insecure(tmp_path, isolated_env):
    cfg = RegistryConfig()
    assert cfg.base_url("registry.example.com") == "https://registry.example.com"
    assert cfg.base_url("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert cfg.base_url("localhost:5000") == "http://localhost:5000"
    assert cfg.with_insecure(["registry.lan:5000"]).base_url("registry.lan:5000") == \
        "http://registry.lan:5000"
    with pytest.raises(RegistryError, match="refusing plain HTTP"):
        RegistryClient("registry.example.com",
                       config=RegistryConfig(mirrors={"registry.example.com":
                                                      ["http://mirror.example.com"]}))
    c = RegistryClient("docker.io", config=cfg)
    assert c.origin == "https://registry-1.docker.io"
    anyio.run(c.aclose)
    p = tmp_path / "r.toml"
    p.write_text('insecure-registries = ["Reg.Lan:5000"]\n[registries."reg2.lan"]\ninsecure = true\n')
    cfg = load_config(str(p))
    assert cfg.is_insecure("reg.lan:5000") and cfg.is_insecure("reg2.lan")


def test_www_authenticate_parsing():
    c = parse_www_authenticate('Bearer realm="https://auth.docker.io/token",'
                               'service="registry.docker.io",'
                               'scope="repository:samalba/my-app:pull,push"')
    assert c.scheme == "bearer" and c.realm == "https://auth.docker.io/token"
    assert c.service == "registry.docker.io"
    assert c.scope == "repository:samalba/my-app:pull,push"
    b = parse_www_authenticate('Basic realm="Registry Realm"')
    assert b.scheme == "basic" and b.params == {"realm": "Registry Realm"}
    assert parse_www_authenticate("Negotiate abc") is None
    assert parse_www_authenticate(None) is None


def test_push_skips_existing_blobs(registry, front_proxy, isolated_env):
    front = front_proxy(registry)

    async def run():
        return await push_oci_layout(FIXTURE_LAYOUT, "mini-esgz",
                                     f"{front.host}/fixtures/mini:mini-esgz",
                                     config=RegistryConfig(), use_keyring=False)

    assert anyio.run(run) == registry.digests["mini-esgz"]
    assert not [p for m, p, _ in front.requests if m in ("POST", "PATCH")]
    assert [p for m, p, _ in front.requests if m == "HEAD" and "/blobs/" in p]


def test_unknown_host_is_one_clear_error(isolated_env):
    async def run():
        c = RegistryClient("nosuch-registry.invalid", config=RegistryConfig())
        try:
            await c.ping()
        finally:
            await c.aclose()

    t = time.monotonic()
    with pytest.raises(RegistryError) as e:
        anyio.run(run)
    assert "nosuch-registry.invalid" in str(e.value) and "unknown host" in str(e.value)
    assert time.monotonic() - t < 20


def test_push_large_blob_streams_from_file(make_registry, tmp_path, isolated_env):
    """Blobs over the in-memory limit are streamed from disk (Content-Length set)."""
    import hashlib

    import core.registry.push as push

    reg = make_registry()
    path = tmp_path / "big.bin"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    old = push._IN_MEMORY
    push._IN_MEMORY = 1 << 20
    try:
        async def run():
            c = RegistryClient(reg.host, config=RegistryConfig(), use_keyring=False)
            try:
                assert await push_blob(c, "big/blob", digest, path=str(path))
                assert not await push_blob(c, "big/blob", digest, path=str(path))
                store = _store(f"{reg.host}/big/blob:x")
                try:
                    return await store.blob_source(digest, len(data)).read_range(1 << 20, 1000)
                finally:
                    await store.aclose()
            finally:
                await c.aclose()

        assert anyio.run(run) == data[1 << 20:(1 << 20) + 1000]
    finally:
        push._IN_MEMORY = old


def test_works_under_trio_with_concurrent_reads(token_registry, isolated_env):
    """FUSE daemons run on trio: concurrent range reads share one token fetch."""
    creds = Credentials("alice", token_registry.users["alice"], "test")

    async def run():
        store = _store(token_registry.ref("mini-esgz"), credentials=creds)
        try:
            img = await open_image(store.ref, store=store)
            layer = img.layers[0]
            src = store.blob_source(layer.digest, layer.size)
            store.client.invalidate_tokens()
            n = token_registry.issuer.issued
            out = {}

            async def read(i):
                out[i] = await src.read_range(i * 1000, 1000)

            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(read, i)
            local = OCILayoutStore(FIXTURE_LAYOUT).blob_source(layer.digest, layer.size)
            for i in range(8):
                assert out[i] == await local.read_range(i * 1000, 1000)
            return token_registry.issuer.issued - n, src.requests
        finally:
            await store.aclose()

    fetched, requests = anyio.run(run, backend="trio")
    assert fetched == 1 and requests == 8


def test_a_host_found_down_is_not_retried_again_at_once(make_registry, isolated_env):
    """RequestPolicy.down_hold: after a request spent its attempts on a stopped
    registry, the next one (a reader asking again at once) gets one attempt,
    and a registry that is back answers that attempt."""
    reg = make_registry()

    async def run():
        client = RegistryClient(reg.host, config=RegistryConfig(), use_keyring=False)
        try:
            assert (await client.request("GET", "/v2/")).status in (200, 401)
            reg.stop()
            out = []
            for _ in range(2):
                t0 = time.monotonic()
                with pytest.raises(RegistryUnreachableError) as e:
                    await client.request("GET", "/v2/")
                out.append((time.monotonic() - t0, str(e.value)))
            reg.start()  # same port, within the hold
            t0 = time.monotonic()
            back = await client.request("GET", "/v2/")
            return out, back.status, time.monotonic() - t0
        finally:
            await client.aclose()

    out, status, took = anyio.run(run)
    (first, msg1), (second, msg2) = out
    assert "(after 4 attempts)" in msg1 and first >= 0.4  # the policy's retries, backoff
    assert "not retried" in msg2 and second < 0.3  # one attempt, no backoff
    assert status in (200, 401) and took < 1.0  # back: answered at the first attempt
