"""The thin layer the screens call. It holds sessions (an opened image and its
layers) and forwards to ``core``; it knows no formats or protocols itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from core import browse
from core.errors import CoreError
from core.image import Image, OCILayoutStore, open_image
from core.reference import parse_reference

# Seconds the layer-wide chunk states sleep between slices (browse.STATES_SLICE chunks).
STATES_PAUSE = 0.002


@dataclass
class ImageSession:
    """An opened image and what the app has learned about its layers."""

    ref_text: str
    image: Image
    views: list[browse.LayerView | None] = field(default_factory=list)
    _browsers: dict[int, browse.LayerBrowser] = field(default_factory=dict)

    @property
    def indexes(self):
        return [v.index if v is not None else None for v in self.views]

    def source(self, n: int):
        d = self.image.layers[n]
        return self.image.store.blob_source(d.digest, d.size)

    def browser(self, n: int) -> browse.LayerBrowser:
        b = self._browsers.get(n)
        if b is None:
            b = self._browsers[n] = browse.LayerBrowser(self.indexes, n)
        return b


class Services:
    def __init__(self, config=None, cache=None, tuning=None):
        from core.options import Tuning

        self.config = config
        # the app's edge: the knobs are read from its environment once, here
        self.tuning = tuning if tuning is not None else Tuning.from_env()
        self.cache = cache if cache is not None else browse.default_cache(
            self.tuning.memory_cache, self.tuning.cache_direct)
        self._mounts = None
        self._mount_caches: dict[str, object] = {}

    def _cache_for(self, session: ImageSession, n: int):
        """The cache holding layer ``n``'s chunks: the one of a mount serving
        it with its own ``--cache-dir``, else the shared one."""
        mod = self.mount_manager()
        try:
            dirs = mod.layer_cache_dirs(session.image.layers[n].digest)
        except (OSError, CoreError):
            dirs = []
        shared = getattr(self.cache, "root", None)
        for d in dirs:
            if os.path.abspath(d) == shared:
                continue
            cache = self._mount_caches.get(d)
            if cache is None:
                from core.cache import ChunkCache

                try:
                    cache = self._mount_caches[d] = ChunkCache(
                        d, memory_bytes=self.tuning.memory_cache, direct=self.tuning.cache_direct)
                except OSError:
                    continue
            return cache
        return self.cache

    # -- targets -------------------------------------------------------------
    @staticmethod
    def classify(text: str) -> str:
        """``image`` or ``registry`` for what the user typed."""
        text = text.strip()
        if text.startswith("oci:"):
            ref = parse_reference(text)
            return "image" if (ref.tag or ref.digest) else "registry"
        if "/" in text or "@" in text:
            return "image"
        host = text.split(":")[0]
        return "registry" if ("." in host or host == "localhost") else "image"

    # -- images --------------------------------------------------------------
    async def open_image(self, ref_text: str, platform: str | None = None) -> ImageSession:
        image = await open_image(ref_text, platform=platform,
                                 bulk_reads=self.tuning.bulk_reads)
        if self.config is not None:
            self.config.remember_image(ref_text)
        return ImageSession(ref_text=ref_text, image=image, views=[None] * len(image.layers))

    async def load_layer(self, session: ImageSession, n: int) -> browse.LayerView:
        view = await browse.open_layer(session.image, session.image.layers[n],
                                       self._cache_for(session, n))
        old = session.views[n]
        if old is not None:
            view.failed_chunks = old.failed_chunks
            view.verified = old.verified
        session.views[n] = view
        session._browsers.clear()
        return view

    @staticmethod
    def can_index(view: browse.LayerView | None) -> bool:
        """A plain tar/gzip/zstd layer not indexed yet (it can be, by
        streaming its blob once: :meth:`index_plain_layer`)."""
        return view is not None and view.index is None and view.format in PLAIN_FORMATS

    async def index_plain_layer(self, session: ImageSession, n: int, progress=None):
        """Stream a plain layer's blob once and index it for this session
        (``progress(done, total)`` in compressed bytes; cancellable)."""
        from core.estargz.plain import build_plain_index

        view = session.views[n]
        ix = await build_plain_index(session.source(n), view.format, progress)
        view.index = ix
        view.error = None
        session._browsers.clear()
        return view

    def chunk_sink(self, session: ImageSession, n: int):
        """What viewing or extracting from layer ``n`` passes as ``on_chunk``:
        the verified chunks it fetches go to the cache the chunk map reads."""
        view = session.views[n]
        if view is None or view.index is None or is_plain(view):
            return None
        return browse.cache_filler(view.index, self._cache_for(session, n))

    def chunk_states(self, session: ImageSession, n: int, chunks=None) -> list[str]:
        view = session.views[n]
        if view is None or view.index is None or is_plain(view):
            return []  # (a plain layer's "chunks" are tar offsets: nothing is cached)
        cache = self._cache_for(session, n)
        if chunks is None:
            # (from the screens' worker threads: paced, so the UI's event loop
            # keeps the GIL most of the time on a layer of a million chunks)
            return browse.layer_chunk_states(view.index, cache=cache, failed=view.failed_chunks,
                                             pause=STATES_PAUSE)
        return browse.chunk_states(view.index, chunks, cache=cache, failed=view.failed_chunks)

    # -- registries ----------------------------------------------------------
    async def list_repositories(self, registry: str, last: str | None = None):
        """``(names, more)``: one page of the catalog after ``last``."""
        if registry.startswith("oci:"):
            ref = parse_reference(registry)
            OCILayoutStore(ref.layout_dir)
            return [f"oci:{ref.layout_dir}"], False
        from core import registry as reg

        page = await reg.list_repositories(registry, last=last)
        if self.config is not None:  # (only a registry that answered is remembered)
            self.config.remember_registry(registry)
        return page

    async def list_tags(self, repository: str, last: str | None = None):
        if repository.startswith("oci:"):
            ref = parse_reference(repository)
            return sorted(OCILayoutStore(ref.layout_dir).tags()), False
        from core import registry as reg

        return await reg.list_tags(repository, last=last)

    async def login(self, registry: str, user: str, password: str) -> None:
        """Check the credentials against the registry and store them (keyring)."""
        from core import registry as reg

        await reg.login(registry, user, password)

    @staticmethod
    def known_registries() -> list[str]:
        """Registries with stored credentials (keyring, auth files), for the
        home screen; empty when the auth files cannot be read."""
        from core.registry import credentials

        try:
            return list(credentials.known_registries())
        except Exception:  # noqa: BLE001 - a broken auth file must not break the home screen
            return []

    @staticmethod
    async def plain_file_text(ix, source, entry, limit: int) -> tuple[str, bool]:
        """The start of a plain layer's file as text, streaming the blob up to
        it: ``(text, cut)`` with at most ``limit`` bytes decoded."""
        from core.estargz.plain import iter_plain_file

        buf = bytearray()
        async for piece in iter_plain_file(ix, source, entry):
            buf += piece
            if len(buf) > limit:
                break
        return bytes(buf[:limit]).decode("utf-8", "replace"), len(buf) > limit

    @staticmethod
    def repo_ref(registry: str, name: str) -> str:
        """The repository reference for a catalog name."""
        return name if name.startswith("oci:") else f"{registry.rstrip('/')}/{name}"

    @staticmethod
    def image_ref(repository: str, tag: str) -> str:
        return f"{repository}:{tag}"

    # -- mounts --------------------------------------------------------------
    # core.mount is imported when first needed: the app starts without it
    def mount_manager(self):
        from core import mount

        return mount

    # The app is a client of the mount service (core.service), as the CLI is:
    # its mounts are forked and supervised there. Without a service (none can
    # be started, or STARGZ_TUI_SERVER=off) the same core API runs here.
    @staticmethod
    def _service(start: bool):
        from core.service import client

        return client.for_mode(os.environ.get("STARGZ_TUI_SERVER"), start)

    def list_mounts(self) -> list[dict]:
        """Every mount with live stats, restarts and last error (blocking:
        call from a thread)."""
        svc = self._service(False)
        if svc is None:
            return self.mount_manager().list_mounts()
        from core.service import protocol

        return svc.call(protocol.List())

    def find_layer_mount(self, mounts: list[dict], digest: str) -> dict | None:
        return self.mount_manager().find_layer_mount(mounts, digest)

    @staticmethod
    def recorded_files(mounts: list[dict], digest: str) -> Recording | None:
        """What the serving recording mounts of layer ``digest`` (of
        ``mounts``, as :meth:`list_mounts` gives them) recorded so far from
        that layer; None when no such mount is serving. Blocking (reads the
        record files): call from a thread.

        A merged mount's daemons share one record file and tag each line
        with the image layer that served it (``layerIndex``, see
        core.record), so only this layer's lines count; a line without a
        layer counts only in a one-layer mount."""
        from core.record import read_record

        out: Recording | None = None
        for m in mounts:
            path = m.get("record")
            if not path or m.get("state") != "serving":
                continue
            layers = [lay for lay in m.get("layers") or [] if isinstance(lay, dict)]
            ours = {lay.get("index") for lay in layers if lay.get("digest") == digest}
            if not ours:
                continue
            try:
                entries = read_record(path)
            except CoreError:
                continue  # (removed or unreadable: the mount screen says so)
            if out is None:
                out = Recording()
            out.sources.append(path)
            for e in entries:
                if e.layer in ours or (e.layer is None and len(layers) == 1):
                    out.order.setdefault(e.path, len(out.order) + 1)
        return out

    async def mount(self, image: str, mountpoint: str, layer: str | int | None = None,
                    record: str | None = None) -> dict:
        """``record``: a recording mount appending each file opened to that file."""
        import anyio.to_thread

        from core.options import MountOptions

        extra = {"record": record} if record else {}
        opts = MountOptions.build(image, mountpoint, layer=layer, **extra)
        return await anyio.to_thread.run_sync(self._mount_blocking, opts)

    def _mount_blocking(self, opts) -> dict:
        svc = self._service(True)
        if svc is None:
            return self.mount_manager().mount(opts)
        from core.service import protocol

        return svc.call(protocol.Mount(options=opts), timeout=opts.timeout + 60)

    def unmount(self, mountpoint: str, force: bool = False) -> dict:
        """Blocking: call from a thread."""
        svc = self._service(False)
        if svc is None:
            return self.mount_manager().unmount(mountpoint, force=force)
        from core.service import protocol

        return svc.call(protocol.Unmount(mountpoint=os.path.abspath(mountpoint), force=force))


@dataclass
class Recording:
    """The files recording mounts recorded from one layer: path -> its place
    (1-based) in the order they were first opened; the record files read."""

    order: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)


PLAIN_FORMATS = ("gzip", "zstd", "tar")


def is_plain(view: browse.LayerView | None) -> bool:
    """An indexed plain layer: browsable, but not lazily (no TOC, no chunks)."""
    return view is not None and view.index is not None and view.index.format in PLAIN_FORMATS


def one_line(err: BaseException) -> str:
    """A one-sentence message for a notification (never a traceback)."""
    if isinstance(err, CoreError):
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, OSError):
        msg = err.strerror or str(err)
        return f"{msg}: {err.filename}" if err.filename else msg
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
