"""On-disk image records (core.records): written after a verified fetch,
verified again when read, a damaged one ignored and fetched again; a mount
started with the registry down serves from them (cached reads at once,
uncached reads EIO until the registry answers again, without a remount);
``cache prune`` keeps the records of recorded mounts.

Real loopback registry (stopped and started on the same port), real FUSE mounts.
"""

from __future__ import annotations

import errno
import gzip
import logging
import os
import stat
import tarfile
import time

import anyio
import msgspec
import pytest
from fuse_helpers import isolated_mount_env, push_layout, write_big_layout

from core import mount as core_mount
from core.errors import BlobReadError, RegistryError
from core.image import open_image, open_store
from core.records import Records, TocRecord, pinned_reference, recorded_store, toc_key
from core.reference import parse_reference
from core.resolver import Resolver

pytestmark = [pytest.mark.registry]

TAGS = ["mini-esgz", "mini-zstdchunked"]


@pytest.fixture
def mount_env(tmp_path, monkeypatch, isolated_env):
    yield from isolated_mount_env(tmp_path, monkeypatch)


def _resolve(ref_text: str, records: Records | None):
    """(image, [paths of each layer's index]) through ``records``."""
    async def run():
        ref = parse_reference(ref_text)
        store = recorded_store(open_store(ref), records)
        resolver = Resolver(records=records, timeout=20)
        try:
            img = await open_image(ref, store=store)
            paths = []
            for d in img.layers:
                layer = await resolver.resolve(store, d, acquire=False)
                paths.append(sorted(layer.index.path_of(i) for i in range(len(layer.index))))
            return img, paths
        finally:
            await resolver.aclose()
            await store.aclose()

    return anyio.run(run, backend="trio")


def _forge_toc(offset: int, data: bytes, blob_size: int) -> bytes:
    """``data`` (the recorded tail of an eStargz blob at ``offset``) with its
    TOC JSON changed by one byte and compressed again: a
    well-formed TOC that is not the annotated one (its footer moved to match)."""
    from core.estargz.footer import estargz_footer, parse_footer

    if offset + len(data) != blob_size:
        return data
    footer = parse_footer(data[-72:], blob_size)
    start, end = footer.toc_offset - offset, len(data) - footer.footer_size
    tar = bytearray(gzip.decompress(data[start:end]))
    i = tar.index(b'"size":')  # an entry's size: one digit changed, same length
    j = i + len(b'"size":')
    tar[j] = ord("1") if tar[j] != ord("1") else ord("2")
    size = tarfile.TarInfo.frombuf(bytes(tar[:512]), "utf-8", "surrogateescape").size
    region = gzip.compress(bytes(tar[:512 + size]), 9)  # the loader reads no further
    # the forged TOC ends at the footer, which points at its start
    start = end - len(region)
    return data[:start] + region + estargz_footer(offset + start)


def _files(records: Records) -> dict[tuple[str, str], int]:
    return {(i.kind, i.name): i.size for i in records.list()}


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


@pytest.mark.parametrize("tag", TAGS)
def test_records_written_verified_and_used_without_registry(tmp_path, isolated_env,
                                                             make_registry, tag, caplog):
    reg = make_registry(load=[tag])
    records = Records(str(tmp_path / "cache" / "records"))
    img, paths = _resolve(reg.ref(tag), records)
    have = _files(records)
    assert ("manifests", _hex(img.manifest_digest)) in have
    assert ("configs", _hex(img.config_digest)) in have
    for d in img.layers:
        assert ("tocs", toc_key(d)) in have
        anchor = d.toc_digest_annotation or d.zstd_manifest_checksum
        assert toc_key(d) == ("toc-" if d.toc_digest_annotation else "zstd-") + _hex(anchor)
    assert any(kind == "refs" for kind, _ in have)
    assert records.missing(img.manifest_digest) == []
    # private: 0700 dirs, 0600 files, no temp files left
    for dirpath, _dirnames, filenames in os.walk(records.root):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o700, dirpath
        for f in filenames:
            assert not f.startswith(".tmp-")
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode) == 0o600, f
    # the registry gone: a pinned reference needs no request at all, and a tag
    # falls back to the digest it last resolved to (one warning)
    reg.stop()
    pinned = pinned_reference(reg.ref(tag), img.manifest_digest)
    assert pinned.endswith("@" + img.manifest_digest)
    fresh = Records(records.root)
    img2, paths2 = _resolve(pinned, fresh)
    assert img2.manifest_digest == img.manifest_digest and img2.config == img.config
    assert paths2 == paths
    assert fresh.hits == 2 + len(img.layers) and fresh.writes == 0
    caplog.set_level(logging.WARNING, logger="core.records")
    img3, paths3 = _resolve(reg.ref(tag), Records(records.root))
    assert (img3.manifest_digest, paths3) == (img.manifest_digest, paths)
    assert any("registry unreachable" in r.getMessage() for r in caplog.records)
    # without the records nothing resolves: they are what made it work
    with pytest.raises(RegistryError):
        _resolve(pinned, None)
    os.unlink(os.path.join(records.root, "tocs", toc_key(img.layers[-1])))
    assert records.missing(img.manifest_digest) == ["tocs/" + toc_key(img.layers[-1])]
    with pytest.raises(BlobReadError, match="cannot reach"):
        _resolve(pinned, Records(records.root))


def test_damaged_records_are_ignored_and_fetched_again(tmp_path, isolated_env, make_registry,
                                                       caplog):
    tag = "mini-esgz"
    reg = make_registry(load=[tag])
    records = Records(str(tmp_path / "records"))
    img, paths = _resolve(reg.ref(tag), records)
    manifest = os.path.join(records.root, "manifests", _hex(img.manifest_digest))
    config = os.path.join(records.root, "configs", _hex(img.config_digest))
    key = toc_key(img.layers[0])
    toc = os.path.join(records.root, "tocs", key)
    good = {p: open(p, "rb").read() for p in (manifest, config, toc)}

    # bytes flipped on disk (the TOC record's own checksum catches it), and a
    # TOC record rewritten with a consistent checksum but another TOC region:
    # only the layer's toc.digest annotation catches that one
    def damage():
        for p in (manifest, config):
            data = bytearray(good[p])
            data[len(data) // 2] ^= 0xFF
            with open(p, "wb") as f:
                f.write(data)
        rec = msgspec.msgpack.decode(good[toc], type=TocRecord)
        ranges = [(o, _forge_toc(o, d, rec.blob_size)) for o, d in rec.ranges]
        forged = Records(str(tmp_path / "forge"))
        forged.put_toc(key, rec.blob_digest, rec.blob_size, ranges)
        with open(os.path.join(forged.root, "tocs", key), "rb") as f:
            forged_bytes = f.read()
        with open(toc, "wb") as f:
            f.write(forged_bytes)

    damage()
    caplog.set_level(logging.WARNING, logger="core.records")
    pinned = pinned_reference(reg.ref(tag), img.manifest_digest)
    img2, paths2 = _resolve(pinned, records)
    assert (img2.manifest_digest, paths2) == (img.manifest_digest, paths)
    damaged = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(damaged) == 3, damaged  # one line each: manifest, config, layer 0's TOC
    assert any("tocs/" + key in m and "TOC digest mismatch" in m for m in damaged), damaged
    # fetched again and recorded again, byte for byte what verified
    for p, data in good.items():
        assert open(p, "rb").read() == data, p

    # damaged with the registry down: never trusted, the resolve fails
    damage()
    reg.stop()
    with pytest.raises(RegistryError):
        _resolve(pinned, records)
    assert not os.path.exists(manifest)


@pytest.mark.fuse
def test_mount_from_records_with_registry_down(mount_env, make_registry):
    big = write_big_layout(mount_env.tmp / "big", files=8)
    reg = make_registry()
    ref = f"{reg.host}/big/app:{big['tag']}"
    push_layout(big["layout"], big["tag"], ref)
    mp = mount_env.mountpoint()
    opts = {"prefetch": False, "background_fetch": False, "read_timeout": 60}
    rec = mount_env.mount(ref, mp, layer=0, **opts)
    with open(os.path.join(mp, "etc/hello.txt"), "rb") as f:
        assert f.read() == big["contents"]["etc/hello.txt"]
    core_mount.unmount(mp)

    reg.stop()  # as after a reboot: nothing answers on the registry's port
    rec = mount_env.mount(ref, mp, layer=0, **opts)
    pid = rec["layers"][0]["pid"]
    log_path = rec["layers"][0]["log"]
    t0 = time.monotonic()
    with open(os.path.join(mp, "etc/hello.txt"), "rb") as f:
        assert f.read() == big["contents"]["etc/hello.txt"]
    assert time.monotonic() - t0 < 1.0, "a cached file waited for the registry"
    name = sorted(n for n in big["contents"] if n.startswith("bulk/"))[0]
    with pytest.raises(OSError) as e:
        with open(os.path.join(mp, name), "rb") as f:
            f.read()
    assert e.value.errno == errno.EIO
    log = open(log_path, encoding="utf-8", errors="replace").read()
    assert "cannot read" in log and reg.host in log, log[-2000:]

    reg.start()  # same port, same storage
    with open(os.path.join(mp, name), "rb") as f:
        assert f.read() == big["contents"][name]
    st = mount_env.status(mp)
    assert st["state"] == "serving" and st["layers"][0]["pid"] == pid  # no remount


@pytest.mark.fuse
def test_prune_keeps_the_records_of_recorded_mounts(mount_env, make_registry):
    reg = make_registry(load=["mini-esgz", "special-esgz"])
    live = mount_env.mount(reg.ref("mini-esgz"), mount_env.mountpoint())
    records = Records.for_cache_dir(str(mount_env.cache))
    other, _ = _resolve(reg.ref("special-esgz"), records)
    before = _files(records)
    assert ("manifests", _hex(other.manifest_digest)) in before
    usage = core_mount.cache_usage()["records"]
    assert usage["records"] == len(before) and usage["manifests"] == 2

    res = core_mount.cache_prune()
    after = _files(records)
    assert res["removedRecords"] == len(before) - len(after) > 0
    kept = records.referenced([live["manifestDigest"]])
    assert set(after) == kept | {k for k in before if k[0] == "refs" and k in after}
    assert ("manifests", _hex(live["manifestDigest"])) in after
    assert ("manifests", _hex(other.manifest_digest)) not in after
    assert sum(1 for k in after if k[0] == "tocs") == len(live["layers"])
    # the live mount's records still bring it back with the registry down
    core_mount.unmount(live["mountpoint"])
    reg.stop()
    again = mount_env.mount(pinned_reference(reg.ref("mini-esgz"), live["manifestDigest"]),
                            live["mountpoint"])
    assert again["manifestDigest"] == live["manifestDigest"]
    assert sorted(os.listdir(live["mountpoint"]))


def test_records_are_bounded_and_must_be_plain_files_of_ours(tmp_path, caplog):
    from core.oci import MAX_MANIFEST_BYTES, sha256_digest

    records = Records(str(tmp_path / "records"))
    small = b'{"schemaVersion": 2, "layers": []}'
    big = small + b" " * MAX_MANIFEST_BYTES  # valid JSON, over the manifest limit
    for data in (small, big):
        records.put_manifest(data, sha256_digest(data))
    assert records.get_manifest(sha256_digest(small)) == small
    assert ("manifests", _hex(sha256_digest(big))) not in _files(records)  # never written
    # one planted over the limit (or as a link) is refused and removed, not read
    caplog.set_level(logging.WARNING, logger="core.records")
    planted = os.path.join(records.root, "manifests", _hex(sha256_digest(big)))
    with open(planted, "wb") as f:
        f.write(big)
    assert records.get_manifest(sha256_digest(big)) is None and not os.path.exists(planted)
    target = os.path.join(records.root, "manifests", _hex(sha256_digest(small)))
    link = os.path.join(records.root, "configs", _hex(sha256_digest(small)))
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(target, link)
    assert records.get_config(sha256_digest(small)) is None and not os.path.lexists(link)
    assert sum("is damaged" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.fuse
def test_daemon_from_records_asks_for_a_token_only_when_a_chunk_is_needed(mount_env,
                                                                          make_token_registry):
    """Token auth: a daemon started from records with the registry down sends
    nothing (no token, no blob URL) until a read needs a chunk; once the
    registry is back, that read gets its token and its bytes."""
    import base64
    import json

    from registry_fixtures import TEST_USERS

    from core.registry import RegistryClient, push_oci_layout
    from core.registry.config import RegistryConfig
    from core.registry.credentials import Credentials

    reg = make_token_registry(load=[])
    big = write_big_layout(mount_env.tmp / "big", files=6)
    ref = f"{reg.host}/big/app:{big['tag']}"

    async def push():
        client = RegistryClient(reg.host, config=RegistryConfig(), use_keyring=False,
                                credentials=Credentials("alice", TEST_USERS["alice"], "test"))
        try:
            return await push_oci_layout(big["layout"], big["tag"], ref, client=client)
        finally:
            await client.aclose()

    anyio.run(push)
    auth = base64.b64encode(f"alice:{TEST_USERS['alice']}".encode()).decode()
    with open(os.path.join(os.environ["DOCKER_CONFIG"], "config.json"), "w") as f:
        json.dump({"auths": {reg.host: {"auth": auth}}}, f)
    mp = mount_env.mountpoint()
    opts = {"prefetch": False, "background_fetch": False, "read_timeout": 60}
    rec = mount_env.mount(ref, mp, layer=0, **opts)
    with open(os.path.join(mp, "etc/hello.txt"), "rb") as f:
        assert f.read() == big["contents"]["etc/hello.txt"]
    core_mount.unmount(mp)

    reg.stop()  # the token issuer stays up: only the registry is gone
    issued = len(reg.issuer.requests)
    rec = mount_env.mount(pinned_reference(ref, rec["manifestDigest"]), mp, layer=0, **opts)
    with open(os.path.join(mp, "etc/hello.txt"), "rb") as f:
        assert f.read() == big["contents"]["etc/hello.txt"]
    assert len(reg.issuer.requests) == issued, "the daemon asked for a token before a chunk"
    name = sorted(n for n in big["contents"] if n.startswith("bulk/"))[-1]
    with pytest.raises(OSError) as e:
        with open(os.path.join(mp, name), "rb") as f:
            f.read()
    assert e.value.errno == errno.EIO
    reg.start()
    with open(os.path.join(mp, name), "rb") as f:
        assert f.read() == big["contents"][name]
    assert len(reg.issuer.requests) > issued  # the token came when the chunk was needed
    assert mount_env.status(mp)["layers"][0]["pid"] == rec["layers"][0]["pid"]
