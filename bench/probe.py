"""In-process measurements run in a fresh interpreter (one per sample):

    python -m bench.probe resolve REGISTRY_URL REPO DIGEST SIZE TOC_DIGEST [--mem]
    python -m bench.probe tocref  REGISTRY_URL REPO DIGEST SIZE
    python -m bench.probe bgfetch REGISTRY_URL REPO DIGEST SIZE TOC_DIGEST CACHE_DIR

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
    import httpx

    from core.estargz.footer import MAX_FOOTER_SIZE, parse_footer
    from core.estargz.loader import _inflate_gzip_toc

    blob = f"{url}/v2/{repo}/blobs/{digest}"
    async with httpx.AsyncClient(timeout=120) as c:
        r = await c.get(blob, headers={"Range": f"bytes={size - MAX_FOOTER_SIZE}-{size - 1}"})
        footer = parse_footer(r.content, size)
        end = size - footer.footer_size
        t0 = time.perf_counter()
        r = await c.get(blob, headers={"Range": f"bytes={footer.toc_offset}-{end - 1}"})
        region = r.content
        t1 = time.perf_counter()
    raw = _inflate_gzip_toc(region)
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
    from core.tasks import TaskManager

    from .httpsource import open_source

    src, how = await open_source(url, repo, digest, size)
    ix = await load_layer_index(src, expected_toc_digest=toc_digest)
    cache = ChunkCache(cache_dir)
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
    else:
        raise SystemExit(f"unknown probe {cmd}")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
