"""Serve one image's merged tree from one process (issue 17, B11/B12).

    python -m core.mergeddaemon IMAGE MOUNTPOINT [--cache-dir DIR] [--no-prefetch]
                                [--background-fetch] [--allow-other] [--allow-unverified]
                                [--insecure-registry HOST] [--log FILE]

Resolves every layer of IMAGE (footer + TOC, each verified against the
manifest as ``core.daemon`` does), gives each a
:class:`core.layer.LayerReader` over one shared :class:`core.cache.ChunkCache`,
and mounts :class:`core.mergedfs.MergedFS` at MOUNTPOINT read-only
(``ro,nosuid,nodev``). Prints ``ready`` on stdout once mounted, or one line
``stargz-tui: ...`` on stderr and exits 1 when the image cannot be served;
SIGTERM/SIGINT unmount and exit 0.

It is the one-process-per-image design the bench measures beside today's
daemon per layer + kernel overlay (``core.mount``); ``core.mount`` does not
start it yet, so records, the control socket, ``stargz-tui mounts`` and the
resident server's fork do not know it. This module never imports
``stargz_tui``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

log = logging.getLogger("core.mergeddaemon")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core.mergeddaemon",
                                description="Serve an image's merged tree from one process.")
    p.add_argument("image")
    p.add_argument("mountpoint")
    p.add_argument("--cache-dir")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--background-fetch", action="store_true")
    p.add_argument("--allow-other", action="store_true")
    p.add_argument("--allow-unverified", action="store_true")
    p.add_argument("--insecure-registry", action="append", default=[], dest="insecure")
    p.add_argument("--resolve-timeout", type=float, default=30.0)
    p.add_argument("--log")
    return p


async def serve(a: argparse.Namespace) -> None:
    import anyio
    import pyfuse3

    from . import fuseloop
    from .cache import ChunkCache
    from .image import open_image
    from .layer import LayerReader
    from .mergedfs import MergedFS
    from .resolver import Resolver
    from .tasks import TaskManager

    opts = {"insecure_registries": a.insecure} if a.insecure else {}
    with anyio.fail_after(a.resolve_timeout + 5):
        image = await open_image(a.image, **opts)
    resolver = Resolver(timeout=a.resolve_timeout, max_layers=max(8, 2 * len(image.layers)))
    resolved: list = [None] * len(image.layers)

    async def resolve(i, desc) -> None:
        resolved[i] = await resolver.resolve(image.store, desc,
                                             allow_unverified=a.allow_unverified)

    async with anyio.create_task_group() as tg:  # all layers at once
        for i, desc in enumerate(image.layers):
            tg.start_soon(resolve, i, desc)
    cache = ChunkCache(a.cache_dir)
    tasks = TaskManager()
    readers = [LayerReader(r.index, r.source, cache, tasks, name=f"layer {i}")
               for i, r in enumerate(resolved)]
    fs = MergedFS([(r.index, rd) for r, rd in zip(resolved, readers, strict=True)])
    options = set(pyfuse3.default_options)
    options |= {"fsname=stargz-merged", "subtype=stargz", "ro", "nosuid", "nodev"}
    if a.allow_other:
        options.add("allow_other")
    pyfuse3.init(fs, a.mountpoint, options)
    try:
        async with anyio.create_task_group() as tg:
            for rd in readers:
                await rd.start(tg, prefetch=not a.no_prefetch, background=a.background_fetch)

            async def signals() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        pyfuse3.terminate()
                        return

            tg.start_soon(signals)
            log.info("serving %s (%d layers) at %s", a.image, len(readers), a.mountpoint)
            print("ready", flush=True)
            fuseloop.install()
            await pyfuse3.main()
            tg.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        await resolver.aclose()


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(filename=a.log, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import anyio

    from .errors import CoreError

    try:
        anyio.run(serve, a, backend="trio")  # pyfuse3's loop runs under trio
    except CoreError as e:
        print(f"stargz-tui: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # pyfuse3.init: libfuse said why on stderr
        print(f"stargz-tui: cannot mount {a.mountpoint}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
