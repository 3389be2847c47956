"""The chunk cache (budget, damage, ENOSPC) and the background task manager."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import zlib

import anyio
import pytest
from fuse_helpers import FIXTURES, isolated_mount_env

from core.cache import ChunkCache, parse_size
from core.tasks import TaskManager


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    yield from isolated_mount_env(tmp_path, monkeypatch)


def _key(data: bytes) -> str:
    return "sha256-" + hashlib.sha256(data).hexdigest()


def test_cache_round_trip_budget_and_damage(tmp_path):
    c = ChunkCache(str(tmp_path), max_bytes=300_000, memory_bytes=1 << 20)
    blobs = [os.urandom(50_000) for _ in range(10)]
    for b in blobs:
        assert c.put(_key(b), b)
        time.sleep(0.01)  # distinct mtimes for LRU order
    u = c.usage()
    assert u["bytes"] <= 300_000 and c.evicted > 0
    fresh = ChunkCache(str(tmp_path), max_bytes=300_000)  # no memory copy
    assert fresh.get(_key(blobs[-1])) == blobs[-1]
    assert fresh.get(_key(blobs[0])) is None  # the oldest were evicted
    # a damaged file is detected, dropped and reported as a miss
    path, off, _size = fresh.location(_key(blobs[-2]))
    with open(path, "r+b") as f:
        f.seek(off)
        first = f.read(1)
        f.seek(off)
        f.write(bytes([first[0] ^ 0xFF]))  # always a different byte
    assert fresh.get(_key(blobs[-2])) is None and fresh.corrupt == 1
    assert not os.path.exists(path)
    # a crash leftover (temp file) is never served
    assert not any(n.startswith(".tmp-") for _d, _s, ns in os.walk(tmp_path) for n in ns)
    assert fresh.prune()["removedChunks"] > 0 and fresh.usage()["chunks"] == 0
    assert parse_size("4G") == 4 << 30 and parse_size("512MiB") == 512 << 20


def _rewrite_pack(path: str, *, rows=None, magic: bytes | None = None, flip_at: int | None = None):
    """Edit a pack in place: its header rows (same header length), its
    magic, or one byte of its data."""
    with open(path, "r+b") as f:
        head = f.read(12)
        n = int.from_bytes(head[8:12], "little")
        if rows is not None:
            body = json.dumps(rows, separators=(",", ":")).encode()
            assert len(body) <= n
            f.seek(12)
            f.write(body + b" " * (n - len(body)))
        if magic is not None:
            f.seek(0)
            f.write(magic)
        if flip_at is not None:
            f.seek(flip_at)
            b = f.read(1)
            f.seek(flip_at)
            f.write(bytes([b[0] ^ 0xFF]))


def _pack_rows(path: str) -> list:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    n = int.from_bytes(head[8:12], "little")
    return json.loads(head[12:12 + n])


@pytest.mark.parametrize("layout", ["private", "shared", "swappable"])
def test_loaded_chunks_checked_by_crc32_in_a_private_cache_by_digest_otherwise(tmp_path, layout):
    """A private cache (owned by us, writable by no one else, in directories
    no one else can swap it out of) checks a chunk loaded from disk against
    the crc32 its pack recorded; any other cache checks it against its
    digest. Which check ran is told apart by damaging only the one or only
    the other."""
    parent = tmp_path / "volume"
    parent.mkdir()
    root = parent / "cache"
    root.mkdir(mode=0o700)
    if layout == "shared":
        os.chmod(root, 0o777)  # e.g. a --cache-dir others write to
    elif layout == "swappable":
        os.chmod(parent, 0o777)  # others could rename the cache dir away (no sticky bit)
    shared = layout != "private"
    data = [os.urandom(70_000) for _ in range(2)]
    ChunkCache(str(root)).put_many([(_key(d), d) for d in data])
    fresh = ChunkCache(str(root), memory_bytes=1 << 20)
    assert fresh.private is (not shared)
    path, off0, _ = fresh.location(_key(data[0]))
    rows = _pack_rows(path)
    assert [r[3] for r in rows] == [zlib.crc32(d) for d in data]  # what the pack records

    # 1. The recorded crc32 of chunk 0 is wrong, its bytes are right.
    rows[0][3] ^= 1
    _rewrite_pack(path, rows=rows)
    got = ChunkCache(str(root)).get(_key(data[0]))
    assert got == (data[0] if shared else None)

    # 2. Chunk 1's bytes are changed and its crc32 made to match them: a
    # forgery only whoever can write the cache could make.
    ChunkCache(str(root)).put_many([(_key(d), d) for d in data])
    path, _, _ = ChunkCache(str(root)).location(_key(data[1]))
    rows = _pack_rows(path)
    forged = bytearray(data[1])
    forged[0] ^= 0xFF
    rows[1][3] = zlib.crc32(forged)
    _rewrite_pack(path, rows=rows, flip_at=rows[1][1])
    c = ChunkCache(str(root))
    got = c.get(_key(data[1]))
    if shared:
        assert got is None and c.corrupt == 1 and not os.path.exists(path)
    else:  # trusted by design: only this user (or root) could have written it
        assert got == bytes(forged)


def test_a_cache_dir_of_an_older_build_is_rebuilt_never_read(tmp_path, caplog):
    """A cache root without this build's format marker that holds packs of
    the first format (SGZPACK1: rows of [key, offset, size]) or the old
    one-file-per-chunk ``chunks/`` layout was written by an older build: it
    is emptied once, with one log line, and none of it is served; the cache
    then works as new."""
    data = [os.urandom(50_000) for _ in range(2)]
    c = ChunkCache(str(tmp_path))
    c.put_many([(_key(d), d) for d in data])
    path, _, _ = c.location(_key(data[0]))
    rows = _pack_rows(path)
    _rewrite_pack(path, rows=[r[:3] for r in rows], magic=b"SGZPACK1")
    old_chunk = tmp_path / "chunks" / "ab" / _key(data[1])
    old_chunk.parent.mkdir(parents=True)
    old_chunk.write_bytes(data[1])
    os.unlink(tmp_path / "FORMAT")  # what an older build left: no marker
    caplog.clear()
    with caplog.at_level("INFO", logger="core.cache"):
        new = ChunkCache(str(tmp_path), memory_bytes=0)
        again = ChunkCache(str(tmp_path), memory_bytes=0)  # rebuilt once, not per open
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "older" in lines[0] and str(tmp_path) in lines[0]
    assert not os.path.exists(path) and not (tmp_path / "chunks").exists()
    assert new.get(_key(data[0])) is None and again.get(_key(data[1])) is None
    assert new.usage()["chunks"] == 0 and new.corrupt == 0
    assert new.put(_key(data[0]), data[0])
    assert ChunkCache(str(tmp_path), memory_bytes=0).get(_key(data[0])) == data[0]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_background_waits_for_prioritized_and_silence(backend):
    events = []

    async def main():
        tm = TaskManager(silence=0.3, max_concurrent=2)

        async def reader():
            async with tm.prioritized():
                events.append(("read-start", time.monotonic()))
                await anyio.sleep(0.3)
            events.append(("read-end", time.monotonic()))

        async def bg(n):
            async with tm.background():
                events.append((f"bg{n}", time.monotonic()))
                assert tm.prioritized_running == 0
                assert tm.background_running <= 2
                await anyio.sleep(0.05)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reader)
                await anyio.sleep(0.01)
                for n in range(4):
                    tg.start_soon(bg, n)

    anyio.run(main, backend=backend)
    read_end = dict(events)["read-end"]
    bg_times = [t for name, t in events if name.startswith("bg")]
    assert len(bg_times) == 4
    assert min(bg_times) >= read_end + 0.25  # waited for the silence period


def test_full_cache_disk_degrades_to_network(mount_env):
    small = mount_env.tmp / "tiny-cache"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(small)],
                   check=True, timeout=30)
    try:
        mp = mount_env.mountpoint()
        mount_env.mount(f"oci:{FIXTURES}:mini-esgz-64k", mp, layer=0, prefetch=False,
                        background_fetch=False, cache_dir=str(small))
        with open(os.path.join(mp, "data/random.bin"), "rb") as f:
            assert len(f.read()) == 716803
        with open(os.path.join(mp, "data/text.txt"), "rb") as f:
            assert len(f.read()) == 307211
        # cache files are written after the readers are answered: wait (bounded)
        for _ in range(100):
            st = mount_env.status(mp)["layers"][0]["stats"]
            if st["cache"]["writeErrors"] >= 1:
                break
            time.sleep(0.1)
        assert st["cache"]["writeErrors"] >= 1 and "not writable" in st["cache"]["warning"]
        assert st["errors"] == 0
    finally:
        from core import mount as core_mount

        for m in core_mount.list_mounts():
            core_mount.unmount(m["mountpoint"], force=True)
        subprocess.run(["umount", str(small)], capture_output=True, timeout=30)
