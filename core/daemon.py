"""The mount daemon: one process serves one layer over FUSE.

pyfuse3 supports one mount per process, so :mod:`core.mount` starts one
daemon per raw layer it mounts (a merged image gets one
:mod:`core.mergeddaemon`, a :class:`Daemon` serving every layer under the
same contract: :func:`run_channel` takes the class), through a starter (:mod:`core.starter`: a fresh
``python -m core.daemon --channel-fd N``, or a fork of the mount service).
Its whole configuration is one :class:`core.options.DaemonConfig`, read from
the channel (msgspec JSON up to EOF): no other flag, no environment knob.
The daemon resolves the image (from ``image_file`` when the mount saved it
there, else from the registry, then saves it there for a restart without
the registry) and the layer (footer + TOC, verified against the manifest
annotation), mounts it read-only (``ro,nosuid,nodev``; ``allow_other`` only
when asked), starts prefetch and background fetch, and answers JSON lines on
a Unix control socket (0600; a peer that is not our own uid is refused)::

    {"op": "ping"}                       -> {"ok": true, "pid": ...}
    {"op": "stats"}                      -> {"ok": true, "stats": {...}}
    {"op": "chunkmap"}                   -> {"ok": true, "map": "<hex, one char per chunk>"}
    {"op": "shutdown", "unmount": true}  -> {"ok": true}; the daemon exits

On the channel it reports readiness (``ok {json}``) or the reason it
failed (``error <message>``), one line; then it keeps serving until the
mount goes away, it is asked to shut down, or it gets SIGTERM/SIGINT (then it
unmounts). It logs to ``log``; ``debug`` adds a trace of every FUSE request.
This module never imports ``stargz_tui``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time

from .errors import MountError
from .options import DaemonConfig, decode_config

log = logging.getLogger("core.daemon")

# A mounted read fails with EIO after this long without its data. Above a
# normal chunk fetch (a window of at most 8 MiB: seconds) and above one whole
# registry request (core.registry.policy.DEFAULT_DEADLINE, 60 s), so it only
# fires when the registry keeps failing slowly (a trickle, a blackhole the
# registry's retries hit again); an application's read() then gets an
# error in 1.5 min instead of hanging for ever.
DEFAULT_READ_TIMEOUT = 90.0


class Daemon:
    def _registry_opts(self) -> dict:
        """The image store's options: insecure hosts, bulk reads (the tuning)."""
        out: dict = {"bulk_reads": self.args.tuning.bulk_reads}
        hosts = list(self.args.insecure_registries or ())
        if hosts:
            out["insecure_registries"] = hosts
        return out

    def __init__(self, config: DaemonConfig, channel: int | None = None):
        self.args = config
        self.ready_fd = channel
        self.started = time.time()
        self.unmount_on_exit = True
        self.fs = None
        self.reader = None
        self.resolver = None
        self.image = None
        self.desc = None
        self.store = None
        self.tasks = None

    # -- readiness -----------------------------------------------------
    def _report(self, line: str) -> None:
        """The one line to whoever started us (``ok {...}`` or ``error MSG``);
        the channel is closed after it."""
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, (line.replace("\n", " ") + "\n").encode())
        except OSError:
            pass
        with contextlib.suppress(OSError):
            os.close(self.ready_fd)
        self.ready_fd = None

    # -- control socket --------------------------------------------------
    def stats(self) -> dict:
        out = {
            "pid": os.getpid(),
            "mountpoint": self.args.mountpoint,
            "image": self.args.image,
            "layer": self.desc.index if self.desc else None,
            "digest": self.desc.digest if self.desc else None,
            "startedAt": self.started,
            "openFiles": self.fs.open_files if self.fs else 0,
        }
        if self.reader is not None:
            out.update(self.reader.stats())
        if self.resolver is not None:
            out["preResolved"] = self.resolver.pre_resolved
        if self.fs is not None and self.fs.recorder is not None:
            out["recorded"] = self.fs.recorder.count
        return out

    def _chunkmap(self, req: dict) -> bytes:
        return self.reader.cached_map() if self.reader else b""

    def title(self) -> str:
        """What it serves, as ps shows it."""
        return f"layer {self.args.layer} {self.args.mountpoint}"

    async def _handle(self, stream) -> None:
        import anyio
        import pyfuse3
        from anyio.abc import SocketAttribute
        from anyio.streams.buffered import BufferedByteReceiveStream

        from .peer import is_own_peer, peer_text

        buf = BufferedByteReceiveStream(stream)
        async with stream:
            raw = stream.extra(SocketAttribute.raw_socket, None)
            if raw is None or not is_own_peer(raw):
                # the socket is 0600 in a 0700 dir; this holds even if those were loosened
                log.warning("control socket: refused a connection from uid %s",
                            peer_text(raw) if raw is not None else "?")
                return
            for _ in range(1000):
                try:
                    with anyio.fail_after(30):
                        line = await buf.receive_until(b"\n", 65536)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound,
                        TimeoutError, anyio.BrokenResourceError, OSError):
                    return
                try:
                    req = json.loads(line)
                    op = req.get("op")
                except (ValueError, AttributeError):
                    req, op = {}, None
                if op == "ping":
                    resp = {"ok": True, "pid": os.getpid()}
                elif op == "stats":
                    resp = {"ok": True, "stats": self.stats()}
                elif op == "chunkmap":
                    resp = {"ok": True, "map": self._chunkmap(req).hex()}
                elif op == "shutdown":
                    self.unmount_on_exit = bool(req.get("unmount", True))
                    resp = {"ok": True}
                else:
                    resp = {"ok": False, "error": f"unknown op {op!r}"}
                try:
                    await stream.send((json.dumps(resp) + "\n").encode())
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return
                if op == "shutdown":
                    log.info("shutdown requested over the control socket")
                    pyfuse3.terminate()
                    return

    async def _serve_control(self, task_status) -> None:
        import anyio

        path = self.args.control
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            listener = await anyio.create_unix_listener(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        task_status.started()
        async with listener:
            await listener.serve(self._handle)

    async def _signals(self) -> None:
        import anyio
        import pyfuse3

        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for sig in sigs:
                log.info("signal %s: unmounting and exiting", sig)
                self.unmount_on_exit = True
                pyfuse3.terminate()
                return

    # -- main ----------------------------------------------------------
    async def run(self) -> int:
        """Open the image, build and mount the filesystem (:meth:`_build`),
        report ``ok`` once served (:meth:`_serve`), run the FUSE loop until
        told to stop. A failure to start is reported on the channel in one
        line and returns 1. :class:`core.mergeddaemon.MergedDaemon` runs the
        same steps over every layer of the image."""
        import anyio
        import pyfuse3

        from .errors import CoreError

        a = self.args
        try:
            dumped, records = await self._open_image()
            fs = await self._build(dumped, records)
            self._mount(fs)
            log.info("serving %s", self._serving())
        except TimeoutError:
            self._report(f"error opening {a.image} timed out")
            return 1
        except CoreError as e:
            self._report(f"error {e}")
            log.error("%s", e)
            return 1
        except Exception as e:  # noqa: BLE001 - reported to the parent, logged with traceback
            log.exception("daemon failed to start")
            self._report(f"error {type(e).__name__}: {e}")
            return 1
        try:
            async with anyio.create_task_group() as tg:
                if a.control:
                    await tg.start(self._serve_control)
                tg.start_soon(self._signals)
                await self._serve(tg)
                from . import fuseloop

                # poll /dev/fuse briefly before sleeping
                spin = fuseloop.install(a.tuning.fuse_spin_us / 1e6)
                log.info("FUSE loop polls %.0f µs before it sleeps", spin * 1e6)
                await pyfuse3.main()
                tg.cancel_scope.cancel()
        finally:
            log.info("stopping (unmount=%s)", self.unmount_on_exit)
            try:
                pyfuse3.close(unmount=self.unmount_on_exit)
            except Exception as e:  # noqa: BLE001
                log.warning("closing the FUSE session: %s", e)
            if a.control:
                with contextlib.suppress(OSError):
                    os.unlink(a.control)
            if self.resolver is not None:
                await self.resolver.aclose()
        return 0

    async def _open_image(self):
        """Set :attr:`image` and :attr:`store`: from the image file when the
        mount saved one, else resolved with the cache dir's records first (the
        manifest, config and TOCs come from there when they verify: a daemon
        restarted with the registry down still mounts, and asks the registry
        only for chunks). Returns (the image file's dump or None, the records)."""
        import anyio

        from .image import image_from_dump, open_image, open_store
        from .records import Records, recorded_store
        from .reference import parse_reference

        a = self.args
        dumped = read_image_file(a.image_file)
        ref = parse_reference(a.image)
        records = Records.for_cache_dir(a.cache_dir)
        store = recorded_store(open_store(ref, **self._registry_opts()), records)
        if dumped is not None:
            self.image = image_from_dump(dumped, store, ref)
        else:
            with anyio.fail_after(a.resolve_timeout + 5):
                # the config is checked while the layers resolve (_resolve_checking_config)
                self.image = await open_image(ref, store=store, platform=a.platform,
                                              with_config=False)
        self.store = self.image.store
        return dumped, records

    def _reader(self, layer, desc, cache, tasks):
        """The :class:`core.layer.LayerReader` of one resolved layer."""
        from .layer import LayerReader

        a = self.args
        return LayerReader(layer.index, layer.source, cache, tasks,
                           prefetch_size=a.prefetch_size,
                           read_timeout=DEFAULT_READ_TIMEOUT
                           if a.read_timeout is None else a.read_timeout,
                           name=f"layer {desc.index} {desc.digest[:19]}")

    def _mount(self, fs) -> None:
        """Mount ``fs`` read-only at the mountpoint."""
        import pyfuse3

        a = self.args
        self.fs = fs
        options = set(pyfuse3.default_options)
        options |= {f"fsname={a.fsname}", "subtype=stargz", "ro", "nosuid", "nodev"}
        if a.allow_other:
            options.add("allow_other")
        try:
            pyfuse3.init(fs, a.mountpoint, options)
        except RuntimeError as e:
            # libfuse prints the cause on stderr (our log), not in the exception
            from .fusecheck import fuse_failure_cause

            cause = fuse_failure_cause(a.log)
            raise MountError(f"cannot mount {a.mountpoint}: {cause or e}") from None
        fs.tune_kernel_after_init(a.mountpoint)  # bigger kernel reads (perf hook)

    async def _build(self, dumped, records):
        """Resolve this daemon's layer and make its filesystem."""
        from .fusefs import OPAQUE_XATTRS, LayerFS
        from .resolver import Resolver

        a = self.args
        self.desc = self.image.layer(a.layer)
        self.resolver = Resolver(timeout=a.resolve_timeout, records=records)
        layer = await self._resolve_checking_config(dumped is None)
        for w in layer.warnings:
            log.warning(w)
        cache, self.tasks = cache_and_tasks(a)
        desc = self.desc
        self.reader = self._reader(layer, desc, cache, self.tasks)
        recorder = None
        if a.record:
            from .record import Recorder

            recorder = Recorder(a.record, layer.index.path_of, layer=desc.index,
                                manifest_digest=self.image.manifest_digest)
        return LayerFS(layer.index, self.reader, attr_timeout=a.attr_timeout,
                       entry_timeout=a.attr_timeout, debug=a.debug, idmap=id_mapper(a),
                       opaque_xattrs=[x for x in OPAQUE_XATTRS if a.opaque_xattrs == "both"
                                      or x.startswith(a.opaque_xattrs.encode())],
                       recorder=recorder)

    def _serving(self) -> str:
        """What the log says is served, once mounted."""
        ix = self.reader.index
        return (f"{self.args.image} layer {self.desc.index} ({ix.format}, {len(ix)} entries, "
                f"{ix.num_chunks} chunks) at {self.args.mountpoint}")

    async def _serve(self, tg) -> None:
        """Start the reader's background work, then report ``ok``."""
        import anyio

        a = self.args
        await self.reader.start(tg, prefetch=a.prefetch, background=a.background_fetch)
        if a.pre_resolve and len(self.image.layers) > 1:
            others = [d for d in self.image.layers if d.digest != self.desc.digest]
            tg.start_soon(self._pre_resolve, others, self.tasks)
        if a.wait_prefetch:
            with anyio.move_on_after(max(60.0, a.resolve_timeout * 4)):
                await self.reader.wait_prefetch()
        self._report("ok " + json.dumps({
            "index": self.desc.index, "digest": self.desc.digest,
            "manifestDigest": self.image.manifest_digest}))

    async def _resolve_checking_config(self, check_config: bool):
        """Resolve the layer; meanwhile fetch and verify the image config
        (a mount serves no layer of an image whose config does not verify)."""
        import anyio

        failed: list[BaseException] = []

        async def check() -> None:
            try:
                await self._check_config()
            except Exception as e:  # noqa: BLE001 - raised below, after the resolve
                failed.append(e)

        layer = None
        async with anyio.create_task_group() as tg:
            if check_config:
                tg.start_soon(check)
            try:  # raised from here, not wrapped in the task group's ExceptionGroup
                layer = await self.resolver.resolve(self.store, self.desc,
                                                    allow_unverified=self.args.allow_unverified)
            except Exception as e:  # noqa: BLE001
                failed.insert(0, e)
                tg.cancel_scope.cancel()
        if failed:
            raise failed[0]
        return layer

    async def _check_config(self) -> None:
        """Fetch and verify the image config (raises when it does not verify,
        or names another platform); saved with the image in ``image_file``."""
        from .image import check_config_platform, dump_image, fetch_config

        config = await fetch_config(self.store, self.image.manifest, self.image.manifest_digest)
        if self.image.index is None:  # --platform on a single-platform image
            check_config_platform(config, self.args.platform)
        if self.args.image_file:  # kept for a restart without the registry
            write_image_file(self.args.image_file, dict(dump_image(self.image), config=config))

    async def _pre_resolve(self, others, tasks) -> None:
        await self.resolver.pre_resolve(self.store, others, tasks,
                                        allow_unverified=self.args.allow_unverified)
        log.info("pre-resolved %d other layers", self.resolver.pre_resolved)


def cache_and_tasks(config: DaemonConfig):
    """The chunk cache and task manager a daemon's readers share."""
    from .cache import ChunkCache
    from .tasks import DEFAULT_SILENCE, TaskManager

    cache = ChunkCache(config.cache_dir, max_bytes=config.cache_size,
                       memory_bytes=config.tuning.memory_cache,
                       direct=config.tuning.cache_direct)
    return cache, TaskManager(DEFAULT_SILENCE if config.silence is None else config.silence)


def id_mapper(config: DaemonConfig):
    """The image-to-shown id mapping a daemon's filesystem applies."""
    from .idmap import IdMapper, parse_ranges

    return IdMapper(parse_ranges(list(config.uid_map)), parse_ranges(list(config.gid_map)))


def read_image_file(path: str | None) -> dict | None:
    """The resolved image a mount saved (core.image.dump_image), or None."""
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("cannot read %s (%s); fetching the image", path, e)
        return None
    return data if isinstance(data, dict) else None


def write_image_file(path: str | None, dumped: dict) -> None:
    """Write the resolved image atomically (0600); a failure only costs a
    restart without the registry, so it is logged, not raised."""
    if not path:
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dumped, f)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot save the resolved image to %s: %s", path, e)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def read_channel(fd: int, limit: int = 1 << 20) -> bytes:
    """The config the starter wrote, up to EOF (its side shut for writing)."""
    buf = b""
    while len(buf) <= limit:
        piece = os.read(fd, 65536)
        if not piece:
            return buf
        buf += piece
    raise MountError("the daemon config is too large")


def run_channel(fd: int, daemon_class: type[Daemon] = Daemon) -> int:
    """Serve the config read from the channel ``fd`` (core.starter), reporting
    on the same fd. Called in a fresh interpreter (:func:`main`) or in a child
    forked from the mount service; ``daemon_class``: :class:`Daemon` or
    :class:`core.mergeddaemon.MergedDaemon`."""
    return serve_config(decode_config(read_channel(fd)), fd, daemon_class)


def serve_config(config: DaemonConfig, fd: int, daemon_class: type[Daemon] = Daemon) -> int:
    """Serve ``config`` (read from the channel ``fd``), reporting on ``fd``."""
    from .proctitle import set_title

    d = daemon_class(config, fd)
    # in ps: a daemon, not the mount service it may have been forked from
    set_title(f"stargz-tui-daemon {d.title()}")
    logfd = os.open(config.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    logging.basicConfig(
        level=logging.DEBUG if config.debug else logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        handlers=[logging.StreamHandler(os.fdopen(logfd, "a", buffering=1))], force=True)
    return run_daemon(d)


def run_daemon(d: Daemon) -> int:
    """Run ``d`` under trio (pyfuse3's loop); a crash is logged and reported."""
    import anyio

    # when the mount is unmounted from outside, pyfuse3.main() returns and
    # the session is already gone: do not unmount again
    try:
        rc = anyio.run(d.run, backend="trio")
    except BaseException:
        log.exception("daemon crashed")
        d._report("error the mount daemon crashed; see its log")
        raise
    return rc


def main(argv=None) -> int:
    """``python -m core.daemon --channel-fd N``: everything else comes over N."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m core.daemon",
                                description="Serve one lazily fetched image layer over FUSE "
                                            "(started by core.starter).")
    p.add_argument("--channel-fd", type=int, required=True,
                   help="socket: the DaemonConfig (JSON) in, readiness lines out")
    p.add_argument("--for", dest="what", metavar="TEXT",
                   help="what it serves, shown in ps (ignored: the config says it)")
    args = p.parse_args(argv)
    try:
        return run_channel(args.channel_fd)
    except MountError as e:
        print(f"core.daemon: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
