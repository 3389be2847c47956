"""The lazy read path: partial reads from the disk cache, verification of
cache files once per process, damaged cache files refetched, read-ahead of
out-of-order (kernel read-ahead) requests."""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile

import anyio
import pytest

from core.cache import ChunkCache
from core.estargz import load_layer_index
from core.estargz.writer import build_estargz
from core.layer import LayerReader
from core.source import LocalBlobSource
from core.tasks import TaskManager

CHUNK = 64 << 10


@pytest.fixture(scope="module")
def layer(tmp_path_factory):
    d = tmp_path_factory.mktemp("layer")
    rnd = random.Random(7)
    files = {
        "big.bin": rnd.randbytes(10 * CHUNK + 1234),
        "text.txt": b"".join(b"line %d of some text\n" % i for i in range(40000)),
        "small": b"tiny file\n",
    }
    tar = str(d / "layer.tar")
    with tarfile.open(tar, "w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    out = str(d / "layer.esgz")
    res = build_estargz(tar, out, chunk_size=CHUNK)
    return out, res, files


def _reader(layer, cache_dir, **kw):
    path, res, _files = layer

    async def open_():
        src = LocalBlobSource(path, res.blob_digest)
        ix = await load_layer_index(src, expected_toc_digest=res.toc_digest)
        return ix, src

    ix, src = anyio.run(open_)
    cache = ChunkCache(str(cache_dir), memory_bytes=kw.pop("memory_bytes", 0))
    return LayerReader(ix, src, cache, TaskManager(silence=0), **kw), cache


def _run(reader, fn):
    async def main():
        async with anyio.create_task_group() as tg:
            await reader.start(tg, prefetch=False, background=False)
            out = await fn()
            tg.cancel_scope.cancel()
        return out

    return anyio.run(main)


def _chunk_files(cache: ChunkCache) -> list[str]:
    return [os.path.join(d, n) for d, _s, ns in os.walk(cache.pack_dir) for n in ns
            if not n.startswith(".tmp-")]


RANGES = [(0, 1), (0, 4096), (CHUNK - 100, 200), (CHUNK, CHUNK), (3 * CHUNK + 5, 2 * CHUNK + 17),
          (10 * CHUNK, 5000), (10 * CHUNK + 1000, 1 << 20), (123457, 131072)]


def test_partial_reads_from_the_disk_cache(layer, tmp_path):
    _path, _res, files = layer
    reader, cache = _reader(layer, tmp_path)
    ix = reader.index
    big = ix.lookup("big.bin")

    async def warm():
        for name in files:
            e = ix.lookup(name)
            assert await reader.read(e.id, 0, e.size + 10) == files[name]

    _run(reader, warm)
    assert reader.requests > 0 and _chunk_files(cache)
    # Written by this cache object: verified, so ranges come straight from the files.
    keys = [reader._keys[c.index] for c in ix.chunks(big)]
    assert all(cache.is_verified(k) for k in keys)
    c0 = ix.chunks(big)[2]
    k0 = reader._keys[c0.index]
    assert cache.read_range(k0, 100, 50, c0.chunk_size) == files["big.bin"][c0.chunk_offset + 100:][:50]
    assert cache.read_range(k0, 0, 10, c0.chunk_size + 1) is None  # another size: not served

    # A fresh process (fresh cache object, no memory copies): every range right,
    # nothing fetched; each chunk file is verified on first use, then preaded.
    reader2, cache2 = _reader(layer, tmp_path)
    assert not any(cache2.is_verified(k) for k in keys)

    async def partial():
        out = []
        for off, size in RANGES:
            out.append(await reader2.read(big.id, off, size))
            out.append(await reader2.read(big.id, off, size))  # again: verified now
        return out

    got = _run(reader2, partial)
    want = [files["big.bin"][off:off + size] for off, size in RANGES for _ in (0, 1)]
    assert got == want
    assert reader2.requests == 0 and reader2.bytes_fetched == 0
    assert cache2.corrupt == 0
    assert cache2.is_verified(keys[0]) and cache2.is_verified(keys[10])


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_damaged_cache_file_is_detected_and_refetched(layer, tmp_path, damage):
    _path, _res, files = layer
    reader, cache = _reader(layer, tmp_path)
    ix = reader.index
    big = ix.lookup("big.bin")
    _run(reader, lambda: reader.read(big.id, 0, big.size))
    c = ix.chunks(big)[3]
    victim, off, size = cache.location(reader._keys[c.index])
    assert size == c.chunk_size
    with open(victim, "r+b") as f:
        if damage == "flip":
            f.seek(off + 777)
            b = f.read(1)
            f.seek(off + 777)
            f.write(bytes([b[0] ^ 0x01]))
        elif damage == "truncate":
            f.truncate(off + CHUNK // 2)
        else:  # the pack's header: the whole pack is dropped when the index is read
            f.seek(3)
            f.write(b"X")

    reader2, cache2 = _reader(layer, tmp_path)

    async def reads():
        # a small range inside the damaged chunk, then the whole file
        a = await reader2.read(big.id, c.chunk_offset + 700, 100)
        return a, await reader2.read(big.id, 0, big.size)

    a, whole = _run(reader2, reads)
    assert a == files["big.bin"][c.chunk_offset + 700:c.chunk_offset + 800]
    assert whole == files["big.bin"]
    assert cache2.corrupt == 1
    assert reader2.requests >= 1  # refetched from the blob
    assert not os.path.exists(victim)  # the damaged pack is gone
    path, off, size = cache2.location(reader2._keys[c.index])
    with open(path, "rb") as f:  # and the cached chunk is right again
        f.seek(off)
        assert hashlib.sha256(f.read(size)).hexdigest() == c.digest.split(":")[1]


def test_out_of_order_sequential_reads_trigger_read_ahead(layer, tmp_path):
    """Kernel read-ahead sends several requests at once; they may arrive out
    of order and still count as a sequential stream."""
    _path, _res, files = layer
    reader, cache = _reader(layer, tmp_path, window=CHUNK, readahead=1, readahead_bytes=4 * CHUNK)
    ix = reader.index
    big = ix.lookup("big.bin")
    order = [0, 2 * CHUNK, CHUNK, 4 * CHUNK, 3 * CHUNK]

    async def reads():
        out = {}
        for off in order:
            out[off] = await reader.read(big.id, off, CHUNK, stream=1)
        for _ in range(1000):  # let read-ahead land (bounded)
            if not reader._inflight and reader._ncached >= 8:
                break
            await anyio.sleep(0.01)
        return out

    got = _run(reader, reads)
    assert all(got[o] == files["big.bin"][o:o + CHUNK] for o in order)
    # read-ahead went past what was read
    assert reader._ncached > len(order)


def test_cache_range_reads_survive_eviction_and_prune(tmp_path):
    c = ChunkCache(str(tmp_path), memory_bytes=0)
    data = os.urandom(100_000)
    key = "sha256-" + hashlib.sha256(data).hexdigest()
    assert c.put(key, data)
    assert c.read_range(key, 10, 20, len(data)) == data[10:30]
    assert c.read_range(key, len(data) - 5, 10, len(data)) is None  # past the end
    c.prune()
    assert not c.is_verified(key) and c.read_range(key, 0, 10, len(data)) is None
    assert c.get(key) is None
    assert c.put(key, data) and c.read_range(key, 0, 10, len(data)) == data[:10]


@pytest.mark.parametrize("size", [256 << 10, (1 << 20) + 4095, (4 << 20) + 1])
def test_big_chunks_written_bypassing_the_page_cache_read_back_exactly(tmp_path, size):
    c = ChunkCache(str(tmp_path), memory_bytes=0)
    data = os.urandom(size)
    key = "sha256-" + hashlib.sha256(data).hexdigest()
    assert c.put(key, data)
    path, off, got = c.location(key)
    assert got == size and os.path.getsize(path) == off + size
    assert c.read_range(key, size - 7, 7, size) == data[-7:]
    assert ChunkCache(str(tmp_path), memory_bytes=0).get(key) == data  # a fresh process verifies it
    assert not [n for _d, _s, ns in os.walk(tmp_path) for n in ns if n.startswith(".tmp-")]


@pytest.mark.parametrize("damage", [False, True])
def test_sequential_reads_load_ahead_from_the_disk_cache(layer, tmp_path, damage):
    """A sequential reader of cached chunks gets them loaded ahead (one
    direct read per run of chunks in a pack), each checked once per process;
    a damaged one is detected and fetched again."""
    _path, _res, files = layer
    reader, cache = _reader(layer, tmp_path)
    ix = reader.index
    big = ix.lookup("big.bin")
    _run(reader, lambda: reader.read(big.id, 0, big.size))
    victim = None
    if damage:
        c = ix.chunks(big)[5]
        victim, off, _size = cache.location(reader._keys[c.index])
        with open(victim, "r+b") as f:
            f.seek(off + 10)
            b = f.read(1)
            f.seek(off + 10)
            f.write(bytes([b[0] ^ 0x40]))

    reader2, cache2 = _reader(layer, tmp_path)  # fresh process, no memory cache
    seen = {}

    async def reads():
        out = []
        for off in range(0, big.size, CHUNK):
            out.append(await reader2.read_buffer(big.id, off, CHUNK, stream=7))
            seen["window"] = max(seen.get("window", 0), len(reader2._win))
        for _ in range(1000):  # let a refetched chunk's cache write land (bounded)
            if not reader2._inflight:
                break
            await anyio.sleep(0.01)
        whole = b"".join(bytes(x) for x in out)
        views = [x for x in out if isinstance(x, memoryview)]
        reader2.forget_stream(7)  # the window's buffers go (views still held stay valid)
        assert not reader2._win
        return whole, b"".join(bytes(v) for v in views), views

    whole, again, views = _run(reader2, reads)
    assert whole == files["big.bin"]
    assert views and again == b"".join(bytes(v) for v in views)
    assert seen["window"] > 1  # chunks came through the read-ahead window
    if damage:  # the damaged pack is gone; the chunk was fetched and stored again
        assert cache2.corrupt == 1 and reader2.requests >= 1
        assert not os.path.exists(victim)
        assert cache2.is_verified(reader2._keys[ix.chunks(big)[5].index])
    else:
        assert cache2.corrupt == 0 and reader2.requests == 0
        assert all(cache2.is_verified(reader2._keys[c.index]) for c in ix.chunks(big)[1:])


def test_small_random_reads_are_not_a_stream(layer, tmp_path):
    """4 KiB reads at random offsets (FADV_RANDOM readers) read no more than
    they need: no read-ahead, no loads into the read-ahead window; every
    answer is right and comes from the disk cache once it holds the file."""
    _path, _res, files = layer
    reader, _cache = _reader(layer, tmp_path)
    ix = reader.index
    big = ix.lookup("big.bin")
    _run(reader, lambda: reader.read(big.id, 0, big.size))
    reader2, cache2 = _reader(layer, tmp_path)
    rnd = random.Random(3)
    offs = [rnd.randrange(big.size // 4096) * 4096 for _ in range(200)]

    async def reads():
        out = [await reader2.read(big.id, o, 4096, stream=9) for o in offs]
        return out, dict(reader2._ahead_to), dict(reader2._disk_to), len(reader2._win)

    got, ahead, disk, win = _run(reader2, reads)
    assert got == [files["big.bin"][o:o + 4096] for o in offs]
    assert not ahead and not disk and win == 0
    assert reader2.requests == 0 and cache2.corrupt == 0


def test_memory_cache_default_and_idle_release(tmp_path, monkeypatch):
    # the variable is read once at the edge (core.options.Tuning) and the
    # cache is handed the figure (core reads no environment: test_env_edge.py)
    from core.cache import default_memory_bytes
    from core.options import Tuning

    monkeypatch.setenv("STARGZ_TUI_MEMORY_CACHE", "3M")
    assert ChunkCache(str(tmp_path), memory_bytes=Tuning.from_env().memory_cache
                      ).memory_bytes == 3 << 20
    monkeypatch.delenv("STARGZ_TUI_MEMORY_CACHE")
    assert Tuning.from_env().memory_cache is None

    assert 64 << 20 <= default_memory_bytes() <= 256 << 20
    c = ChunkCache(str(tmp_path), memory_bytes=1 << 20)
    data = os.urandom(1000)
    key = "sha256-" + hashlib.sha256(data).hexdigest()
    c.remember(key, data)
    assert not c.release_memory_if_idle(60)  # just used
    assert c.get_memory(key) == data
    assert c.release_memory_if_idle(0) and c.get_memory(key) is None
    assert c.stats()["memoryBytes"] == 0


def test_a_cache_dir_of_an_older_build_is_rebuilt_and_reads_are_right(layer, tmp_path, caplog):
    """A cache dir an older build wrote (no format marker; packs of the first
    format, the old ``chunks/`` layout, here holding wrong bytes under a real
    key) is rebuilt when a reader opens it, with one log line: nothing of it
    is served, every read is right (fetched again) and stored anew."""
    _path, _res, files = layer
    reader, cache = _reader(layer, tmp_path)
    ix = reader.index

    async def read_all(r):
        return {n: await r.read(ix.lookup(n).id, 0, ix.lookup(n).size) for n in files}

    assert _run(reader, lambda: read_all(reader)) == files
    packs = _chunk_files(cache)
    assert packs
    os.unlink(tmp_path / "FORMAT")
    for p in packs:
        with open(p, "r+b") as f:
            f.write(b"SGZPACK1")
    key = reader._keys[ix.chunks(ix.lookup("big.bin"))[0].index]
    old = tmp_path / "chunks" / key[7:9]
    old.mkdir(parents=True)
    (old / key).write_bytes(b"\0" * CHUNK)

    with caplog.at_level("INFO", logger="core.cache"):
        reader2, cache2 = _reader(layer, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "core.cache"]
    assert len(lines) == 1 and "older" in lines[0]
    assert not any(os.path.exists(p) for p in packs) and not (tmp_path / "chunks").exists()
    assert _run(reader2, lambda: read_all(reader2)) == files
    assert reader2.requests > 0 and cache2.corrupt == 0 and _chunk_files(cache2)
    assert cache2.is_verified(key)
