"""The chunk cache (budget, damage, ENOSPC) and the background task manager."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

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
