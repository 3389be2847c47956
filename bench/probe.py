"""In-process measurements run in a fresh interpreter (one per sample):

    python -m bench.probe resolve REGISTRY_URL REPO DIGEST SIZE TOC_DIGEST [--mem]
    python -m bench.probe tocref  REGISTRY_URL REPO DIGEST SIZE
    python -m bench.probe bgfetch REGISTRY_URL REPO DIGEST SIZE TOC_DIGEST CACHE_DIR
    python -m bench.probe decode  BLOB_PATH DIGEST FILE_PATH

Each prints one JSON line.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

import anyio


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def resolve(url, repo, digest, size, toc_digest, mem=False) -> dict:
    from core.estargz import load_layer_index

    from .httpsource import open_source

    src, how = await open_source(url, repo, digest, size)
    # Warm the connection so the figure is the resolve, not the TCP handshake.
    await src.read_range(0, 1)
    gc.collect()
    if mem:
        import tracemalloc

        tracemalloc.start()
    rss0 = _rss()
    t0 = time.perf_counter()
    ix = await load_layer_index(src, expected_toc_digest=toc_digest, require_toc_digest=True)
    dt = time.perf_counter() - t0
    gc.collect()
    out = {"seconds": dt, "entries": len(ix), "source": how, "rss_delta": _rss() - rss0,
           "maxrss_kb": 0}
    if mem:
        import tracemalloc

        cur, peak = tracemalloc.get_traced_memory()
        out.update(retained=cur, peak=peak)
        tracemalloc.stop()
    import resource

    out["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    await src.aclose()
    del ix
    return out


async def tocref(url, repo, digest, size) -> dict:
    """The reference: download the TOC region alone, then ``json.loads`` it."""
    import tarfile

    import httpx
    from isal import isal_zlib

    from core.estargz.footer import MAX_FOOTER_SIZE, parse_footer

    blob = f"{url}/v2/{repo}/blobs/{digest}"
    async with httpx.AsyncClient(timeout=120) as c:
        r = await c.get(blob, headers={"Range": f"bytes={size - MAX_FOOTER_SIZE}-{size - 1}"})
        footer = parse_footer(r.content, size)
        end = size - footer.footer_size
        t0 = time.perf_counter()
        r = await c.get(blob, headers={"Range": f"bytes={footer.toc_offset}-{end - 1}"})
        region = r.content
        t1 = time.perf_counter()
    # Plain inflate of the gzip member (tar header, JSON, padding), the JSON
    # cut out of it: none of our checks or bounds, the least work json.loads
    # can start from.
    member = isal_zlib.decompressobj(31).decompress(region)
    size = tarfile.TarInfo.frombuf(member[:512], "utf-8", "surrogateescape").size
    raw = member[512 : 512 + size]
    del member
    t2 = time.perf_counter()
    toc = json.loads(raw)
    t3 = time.perf_counter()
    return {"download": t1 - t0, "inflate": t2 - t1, "json_loads": t3 - t2,
            "toc_bytes": len(region), "toc_json_bytes": len(raw),
            "entries": len(toc.get("entries", []))}


async def bgfetch(url, repo, digest, size, toc_digest, cache_dir) -> dict:
    from core.cache import ChunkCache
    from core.estargz import load_layer_index
    from core.layer import LayerReader
    from core.options import Tuning
    from core.tasks import TaskManager

    from .httpsource import open_source

    src, how = await open_source(url, repo, digest, size)
    ix = await load_layer_index(src, expected_toc_digest=toc_digest)
    tuning = Tuning.from_env()  # the bench is an edge: the knobs from its environment
    cache = ChunkCache(cache_dir, memory_bytes=tuning.memory_cache, direct=tuning.cache_direct)
    reader = LayerReader(ix, src, cache, TaskManager(silence=0))
    async with anyio.create_task_group() as tg:
        await reader.start(tg, prefetch=False, background=False)
        t0 = time.perf_counter()
        await reader.background_fetch()
        dt = time.perf_counter() - t0
        tg.cancel_scope.cancel()
    st = reader.stats()
    await src.aclose()
    return {"seconds": dt, "source": how, "chunks_cached": st["chunksCached"],
            "chunks_total": st["chunksTotal"], "requests": st["requests"],
            "bytes_fetched": st["bytesFetched"]}


async def decode(blob_path, digest, file_path) -> dict:
    """What a cold read can reach on this machine at best: the work the
    daemon does for every chunk it fetches (``decode_chunk``: inflate, then
    sha256 against the TOC) over every chunk of ``file_path``, the
    compressed bytes already in memory, on as many threads as there are
    cores, and nothing else (no network, no FUSE, no cache writes)."""
    from concurrent.futures import ThreadPoolExecutor

    from core.estargz import load_layer_index
    from core.estargz.chunks import decode_chunk, decompress_chunk
    from core.source import LocalBlobSource

    src = LocalBlobSource(blob_path, digest)
    ix = await load_layer_index(src)
    entry = ix.lookup(file_path)
    chunks = ix.chunks(entry)
    with open(blob_path, "rb") as f:
        blob = f.read()
    work = [(bytes(blob[c.offset:c.end]), c) for c in chunks]
    del blob
    total = sum(c.chunk_size for c in chunks)
    cores = os.cpu_count() or 1

    def rate(fn) -> tuple[float, float]:
        c0 = time.process_time()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(cores) as ex:
            got = sum(map(len, ex.map(lambda w: fn(ix.format, *w), work)))
        dt = time.perf_counter() - t0
        if got != total:
            raise RuntimeError(f"decoded {got} bytes of {total}")
        return total / dt / 1e6, time.process_time() - c0

    rate(decode_chunk)  # warm up: first-touch page faults out of the figure
    mb_s, cpu = rate(decode_chunk)
    inflate_mb_s, _ = rate(decompress_chunk)
    await src.aclose()
    return {"mb_s": mb_s, "inflate_mb_s": inflate_mb_s, "cpu_seconds": cpu, "threads": cores,
            "bytes": total, "chunks": len(chunks)}


def main(argv: list[str]) -> int:
    cmd, rest = argv[0], argv[1:]
    mem = "--mem" in rest
    rest = [a for a in rest if a != "--mem"]
    if cmd == "resolve":
        url, repo, digest, size, toc = rest
        out = anyio.run(resolve, url, repo, digest, int(size), toc, mem)
    elif cmd == "tocref":
        url, repo, digest, size = rest
        out = anyio.run(tocref, url, repo, digest, int(size))
    elif cmd == "bgfetch":
        url, repo, digest, size, toc, cache = rest
        out = anyio.run(bgfetch, url, repo, digest, int(size), toc, cache)
    elif cmd == "decode":
        blob, digest, file_path = rest
        out = anyio.run(decode, blob, digest, file_path)
    else:
        raise SystemExit(f"unknown probe {cmd}")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
