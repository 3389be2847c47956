"""The merged-mount daemon: one process serves an image's whole merged tree.

:mod:`core.mount` starts one per merged mount, through the same starters
and under the same contract as a layer daemon (:mod:`core.daemon`): its
whole configuration is one :class:`core.options.DaemonConfig` with
``merged`` set, read from the channel; it reports ``ok {json}`` (the image's
``manifestDigest`` and ``layers``, ``[{"index", "digest"}]`` bottom first)
or ``error MESSAGE`` on it; it logs to ``log``; it answers the same control
socket (``ping``, ``stats``, ``chunkmap``, ``shutdown``; ``stats`` adds
``layers``: each layer's own stats, bottom first; ``chunkmap`` takes
``"layer": N``), and SIGTERM/SIGINT unmount.

It resolves the image from ``image_file`` when the mount saved it there,
else from the registry (then saves it, with its verified config, for a
restart without the registry); every layer (footer + TOC, verified against
the manifest) at once, with the manifest, config and TOCs taken from the
cache dir's records first (:mod:`core.records`: a restore after a reboot
needs no registry); gives each layer a :class:`core.layer.LayerReader` over
one shared :class:`core.cache.ChunkCache` and mounts
:class:`core.mergedfs.MergedFS` read-only (``ro,nosuid,nodev``). One
process per image: a fault (a crash, ``kill -9``) takes down that image's
mount only, never another's.

``python -m core.mergeddaemon IMAGE MOUNTPOINT [--cache-dir DIR] ...`` serves
an image in the foreground without a record (prints ``ready`` once mounted,
or one line ``stargz-tui: ...`` on stderr and exits 1). This module never
imports ``stargz_tui``.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from . import daemon as layer_daemon
from .daemon import Daemon, cache_and_tasks, id_mapper, run_daemon
from .errors import MountError
from .options import DaemonConfig

log = logging.getLogger("core.mergeddaemon")


class MergedDaemon(Daemon):
    """A :class:`core.daemon.Daemon` serving every layer of its image merged."""

    def __init__(self, config: DaemonConfig, channel: int | None = None, *,
                 foreground: bool = False):
        super().__init__(config, channel)
        self.foreground = foreground
        self.readers: list = []

    def title(self) -> str:
        return f"image {self.args.mountpoint}"

    def _report(self, line: str) -> None:
        if not self.foreground:
            super()._report(line)
        elif line.startswith("ok"):
            print("ready", flush=True)
        elif line.startswith("error"):
            print(f"stargz-tui: {line[5:].strip()}", file=sys.stderr, flush=True)

    def stats(self) -> dict:
        per = [r.stats() for r in self.readers]
        out = {"pid": os.getpid(), "mountpoint": self.args.mountpoint,
               "image": self.args.image, "startedAt": self.started,
               "openFiles": self.fs.open_files if self.fs else 0}
        for st in per:  # the counters summed; the per-layer view under "layers"
            for k, v in st.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    out[k] = out.get(k, 0) + v
        out["prefetchDone"] = all(st.get("prefetchDone", False) for st in per)
        out["backgroundFetchDone"] = all(st.get("backgroundFetchDone", False) for st in per)
        recorders = (self.fs.recorders if self.fs is not None else None) or []
        for i, st in enumerate(per):
            if recorders:
                st["recorded"] = recorders[i].count
            if self.image is not None:
                st["layer"], st["digest"] = i, self.image.layers[i].digest
        out["recorded"] = sum(r.count for r in recorders)
        out["layers"] = per
        return out

    def _chunkmap(self, req: dict) -> bytes:
        try:
            return self.readers[int(req.get("layer") or 0)].cached_map()
        except (IndexError, TypeError, ValueError):
            return b""

    async def _build(self, dumped, records):
        """Resolve every layer and make the merged filesystem over them."""
        from .mergedfs import MergedFS
        from .resolver import Resolver

        a = self.args
        if not self.image.layers:
            raise MountError(f"{a.image} has no layers")
        n = len(self.image.layers)
        self.resolver = Resolver(timeout=a.resolve_timeout, records=records,
                                 max_layers=max(8, 2 * n))
        layers = await self._resolve_all(check_config=dumped is None)
        for lay in layers:
            for w in lay.warnings:
                log.warning(w)
        cache, self.tasks = cache_and_tasks(a)
        self.readers = [self._reader(lay, desc, cache, self.tasks)
                        for lay, desc in zip(layers, self.image.layers, strict=True)]
        recorders = None
        if a.record:
            from .record import Recorder

            recorders = [Recorder(a.record, lay.index.path_of, layer=i,
                                  manifest_digest=self.image.manifest_digest)
                         for i, lay in enumerate(layers)]
        kw = {} if a.attr_timeout is None else {"timeout": a.attr_timeout}
        return MergedFS([(lay.index, rd) for lay, rd in zip(layers, self.readers, strict=True)],
                        idmap=id_mapper(a), recorders=recorders, **kw)

    def _serving(self) -> str:
        return (f"{self.args.image} merged ({len(self.readers)} layers, "
                f"{sum(len(rd.index) for rd in self.readers)} entries) at {self.args.mountpoint}")

    async def _serve(self, tg) -> None:
        """Start every reader's background work, then report ``ok``."""
        import anyio

        a = self.args
        for rd in self.readers:
            await rd.start(tg, prefetch=a.prefetch, background=a.background_fetch)
        if a.wait_prefetch:
            with anyio.move_on_after(max(60.0, a.resolve_timeout * 4)):
                for rd in self.readers:
                    await rd.wait_prefetch()
        self._report("ok " + json.dumps({
            "manifestDigest": self.image.manifest_digest,
            "layers": [{"index": d.index, "digest": d.digest} for d in self.image.layers]}))

    async def _resolve_all(self, check_config: bool) -> list:
        """Every layer resolved at once; meanwhile the config is checked (and
        the image saved) unless it came from the image file. The first
        failure is raised as it is (not in an ExceptionGroup)."""
        import anyio

        failed: list[BaseException] = []
        out: list = [None] * len(self.image.layers)

        async def one(i, desc) -> None:
            try:
                out[i] = await self.resolver.resolve(self.store, desc,
                                                     allow_unverified=self.args.allow_unverified)
            except Exception as e:  # noqa: BLE001 - raised below
                failed.append(e)
                tg.cancel_scope.cancel()

        async def check() -> None:
            try:
                await self._check_config()
            except Exception as e:  # noqa: BLE001 - raised below
                failed.append(e)
                tg.cancel_scope.cancel()

        async with anyio.create_task_group() as tg:
            if check_config:
                tg.start_soon(check)
            for i, desc in enumerate(self.image.layers):
                tg.start_soon(one, i, desc)
        if failed:
            raise failed[0]
        return out


def run_channel(fd: int) -> int:
    """:func:`core.daemon.run_channel` serving a merged config (core.starter)."""
    return layer_daemon.run_channel(fd, MergedDaemon)


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m core.mergeddaemon",
                                description="Serve an image's merged tree from one process.")
    p.add_argument("image", nargs="?")
    p.add_argument("mountpoint", nargs="?")
    p.add_argument("--channel-fd", type=int,
                   help="started by core.starter: the DaemonConfig (JSON) in, readiness out")
    p.add_argument("--for", dest="what", metavar="TEXT",
                   help="what it serves, shown in ps (ignored: the config says it)")
    p.add_argument("--cache-dir")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--background-fetch", action="store_true")
    p.add_argument("--allow-other", action="store_true")
    p.add_argument("--allow-unverified", action="store_true")
    p.add_argument("--insecure-registry", action="append", default=[], dest="insecure")
    p.add_argument("--resolve-timeout", type=float, default=30.0)
    p.add_argument("--log")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.channel_fd is not None:
        try:
            return run_channel(a.channel_fd)
        except MountError as e:
            print(f"core.mergeddaemon: {e}", file=sys.stderr)
            return 1
    if not a.image or not a.mountpoint:
        p.error("IMAGE and MOUNTPOINT are required without --channel-fd")
    # without --log nothing is logged: stderr carries the one error line
    logging.basicConfig(filename=a.log or os.devnull, level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from .options import absolute_image

    config = DaemonConfig(
        image=absolute_image(a.image, os.getcwd()), layer="0", merged=True,
        mountpoint=os.path.abspath(a.mountpoint), control="", log=a.log or "",
        cache_dir=a.cache_dir, prefetch=not a.no_prefetch, background_fetch=a.background_fetch,
        allow_other=a.allow_other, allow_unverified=a.allow_unverified,
        insecure_registries=tuple(a.insecure), resolve_timeout=a.resolve_timeout)
    return run_daemon(MergedDaemon(config, foreground=True))


if __name__ == "__main__":
    sys.exit(main())
