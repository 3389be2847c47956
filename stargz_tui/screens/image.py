"""Image: manifest / index, platform picker, config summary, layers table.

The layers table's ``landmark`` column says, per layer, what its TOC says
about prefetch (issue 16): ``after N`` for a ``.prefetch.landmark`` with N
compressed bytes before it (the landmark entry's offset: what a mount
fetches first), ``no prefetch`` for a ``.no.prefetch.landmark``, ``none``
without either, ``-`` for a layer without a TOC.
"""

from __future__ import annotations

import json

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import (
    DataTable,
    Header,
    LoadingIndicator,
    Select,
    Static,
    TabbedContent,
    TabPane,
)

from core import browse

from ..services import is_plain
from ..text import multiline, plain, printable
from ..widgets import KeyBar, set_table_columns
from .base import BaseScreen

# layers table columns: (label, key); narrower terminals keep the key ones
COLUMNS = [("#", "n"), ("digest", "digest"), ("size", "size"), ("format", "format"),
           ("TOC", "toc"), ("entries", "entries"), ("chunks", "chunks"),
           ("landmark", "landmark"), ("cached", "cached"), ("mounted", "mounted")]
COLUMNS_MEDIUM = [c for c in COLUMNS if c[1] != "entries"]
COLUMNS_NARROW = [c for c in COLUMNS_MEDIUM if c[1] != "landmark"]
WIDE = 110            # (the app's -wide breakpoint)
MEDIUM = 92           # the landmark column fits from here (not at 80)
CACHED_SECONDS = 2.0  # how often the cached column is brought up to date
TOC_STYLE = {browse.TOC_VERIFIED: "green", browse.TOC_MISMATCH: "bold red",
             browse.TOC_ABSENT: "yellow", browse.TOC_NONE: "dim"}


class ImageScreen(BaseScreen):
    BINDINGS = [
        Binding("enter", "open_layer", "Open layer", id="open_layer", show=False),
        Binding("v", "verify", "Verify", id="verify"),
        Binding("c", "copy_digest", "Copy digest", id="copy"),
        Binding("m", "mount_layer", "Mount layer", id="mount_layer"),
        Binding("i", "mount_image", "Mount image", id="mount_image"),
        Binding("o", "open_mount", "Open mount", id="open_mount"),
        Binding("p", "platform", "Platform", id="platform"),
        Binding("r", "reload", "Reload", id="reload"),
    ]

    def __init__(self, ref_text: str, platform: str | None = None):
        super().__init__()
        self.ref_text = ref_text
        self.platform = platform
        self.session = None
        self.mounts: list[dict] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="image-info")
        yield Select([], prompt="platform", id="platform", allow_blank=True)
        with TabbedContent(id="image-tabs"):
            with TabPane("Layers", id="tab-layers"):
                yield DataTable(id="layers", cursor_type="row", zebra_stripes=True)
            with TabPane("Config", id="tab-config"):
                yield VerticalScroll(Static(id="config"))
            with TabPane("History", id="tab-history"):
                yield DataTable(id="history", cursor_type="row")
            with TabPane("Manifest", id="tab-manifest"):
                yield VerticalScroll(Static(id="manifest"))
        yield LoadingIndicator(id="loading")
        yield KeyBar()

    def on_mount(self) -> None:
        self.sub_title = printable(self.ref_text)
        self.query_one("#platform").display = False
        self._set_columns()
        h = self.query_one("#history", DataTable)
        h.add_columns("#", "created by", "empty")
        self.load()
        self.refresh_mounts()
        self.set_interval(CACHED_SECONDS, self.refresh_cached)
        self.query_one("#layers", DataTable).focus()

    def on_screen_resume(self) -> None:
        if self.session is not None:
            self.refresh_layers()
        self.refresh_mounts()

    # -- loading ---------------------------------------------------------------------
    @work(exclusive=True, group="load")
    async def load(self) -> None:
        self.query_one("#loading").display = True
        try:
            self.session = await self.services.open_image(self.ref_text, self.platform)
        except Exception as e:  # noqa: BLE001 - shown as one sentence
            self.query_one("#loading").display = False
            self.query_one("#image-info", Static).update(plain(f"Cannot open {self.ref_text}", "red"))
            self.fail(e)
            return
        self.show_image()
        for n in range(len(self.session.image.layers)):
            await self.services.load_layer(self.session, n)
            self.refresh_layers()
        self.query_one("#loading").display = False
        bad = [v for v in self.session.views if v is not None and v.toc_state == browse.TOC_MISMATCH]
        if bad:
            self.notify(printable(f"Layer {bad[0].desc.index}: {bad[0].error}."), severity="error",
                        timeout=8, markup=False)

    def show_image(self) -> None:
        img = self.session.image
        info = Table.grid(padding=(0, 1))
        info.add_column(style="bold")
        info.add_column()
        info.add_row("image", plain(img.reference))
        if img.index_digest:
            info.add_row("index", plain(f"{img.index_digest}  ({len(img.platforms)} platforms)"))
        info.add_row("manifest", plain(f"{img.manifest_digest}  "
                                       f"{img.manifest_media_type.rsplit('.', 1)[-1]}"))
        total = sum(d.size for d in img.layers)
        n = len(img.layers)
        info.add_row("platform", plain(f"{img.os_arch}   {n} layer{'' if n == 1 else 's'}, "
                                       f"{browse.human_size(total)} compressed"))
        self.query_one("#image-info", Static).update(info)
        sel = self.query_one("#platform", Select)
        if len(img.platforms) > 1:
            sel.set_options([(plain(p), p) for p in img.platforms])
            sel.display = True
            if img.platform in img.platforms:
                sel.value = img.platform
        self.show_config()

    def show_config(self) -> None:
        img = self.session.image
        c = img.config.get("config") or {}
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()

        def cmd(v):
            return " ".join(json.dumps(x) if " " in x else x for x in v) if isinstance(v, list) else "-"

        # every value is the image author's: plain text, never markup
        grid.add_row("config", plain(img.config_digest))
        grid.add_row("created", plain(img.config.get("created", "-")))
        grid.add_row("entrypoint", plain(cmd(c.get("Entrypoint"))))
        grid.add_row("cmd", plain(cmd(c.get("Cmd"))))
        grid.add_row("workdir", plain(c.get("WorkingDir") or "/"))
        grid.add_row("user", plain(c.get("User") or "root"))
        for i, e in enumerate(c.get("Env") or []):
            grid.add_row("env" if i == 0 else "", plain(e))
        for i, p in enumerate(sorted((c.get("ExposedPorts") or {}).keys())):
            grid.add_row("ports" if i == 0 else "", plain(p))
        for i, (k, v) in enumerate(sorted((c.get("Labels") or {}).items())):
            grid.add_row("labels" if i == 0 else "", plain(f"{k}={v}"))
        self.query_one("#config", Static).update(grid)
        h = self.query_one("#history", DataTable)
        h.clear()
        for i, item in enumerate(img.config.get("history") or []):
            h.add_row(str(i), plain(str(item.get("created_by") or "").strip()[:200]),
                      "yes" if item.get("empty_layer") else "")
        self.query_one("#manifest", Static).update(
            multiline(json.dumps(img.manifest, indent=2, sort_keys=True)))

    def _set_columns(self) -> bool:
        """The layers table's columns for this width (narrow: the key ones);
        True when they changed (and the table was emptied)."""
        width = self.app.size.width
        cols = COLUMNS if width >= WIDE else COLUMNS_MEDIUM if width >= MEDIUM else COLUMNS_NARROW
        return set_table_columns(self.query_one("#layers", DataTable), cols)

    def on_resize(self) -> None:
        if self._set_columns() and self.session is not None:
            self.refresh_layers()

    def _row(self, n: int, mounted: set[str], narrow: bool) -> dict:
        d = self.session.image.layers[n]
        v = self.session.views[n]
        digest = browse.short_digest(d.digest)
        row = {"n": str(n), "digest": plain(digest.split(":", 1)[-1] if narrow else digest),
               "size": browse.human_size(d.size)}
        if v is None:
            return {**row, "format": "…", "toc": "…"}
        toc = Text(v.toc_state, TOC_STYLE.get(v.toc_state, ""))
        if v.failed_chunks:
            toc = Text(f"{len(v.failed_chunks)} bad chunks", "bold red")
        elif v.verified == "full":
            toc = Text("verified+data", "green")
        return {
            **row, "format": plain(v.format_label), "toc": toc,
            "entries": "-" if v.entries is None else str(v.entries),
            "chunks": "-" if v.chunks is None or is_plain(v) else str(v.chunks),
            "landmark": self._landmark_cell(v),
            "cached": self._cached_cell(v),
            "mounted": Text("yes", "green") if d.digest in mounted else Text("no", "dim"),
        }

    @staticmethod
    def _landmark_cell(v) -> Text:
        ix = v.index
        if ix is None or is_plain(v):
            return Text("-", "dim")
        if ix.prefetch_end is not None:
            return Text(f"after {browse.human_size(ix.prefetch_end)}", "cyan")
        return Text("no prefetch" if ix.no_prefetch else "none", "dim")

    @staticmethod
    def _cached_cell(v) -> str:
        pct = None if is_plain(v) else v.cached_percent
        return "-" if pct is None else f"{pct:.0f}%"

    def refresh_layers(self) -> None:
        t = self.query_one("#layers", DataTable)
        keep = t.cursor_row
        t.clear()
        mounted = self._mounted_digests()
        keys = [str(k.value) for k in t.columns]
        narrow = len(keys) < len(COLUMNS)
        for n in range(len(self.session.image.layers)):
            row = self._row(n, mounted, narrow)
            t.add_row(*(row.get(k, "") for k in keys), key=str(n))
        if keep is not None and keep < t.row_count:
            t.move_cursor(row=keep)

    # -- the cached column follows the chunk cache (a mount filling it) ----------------
    @work(exclusive=True, group="cached", thread=True)
    def refresh_cached(self) -> None:
        session = self.session
        # Not while a screen above this one (a layer's) shows: on a layer of a
        # million chunks each look holds the GIL for a good part of a second.
        if session is None or not self.is_current:
            return
        counts = {}
        for n, v in enumerate(session.views):
            if v is not None and v.index is not None and v.index.num_chunks:
                states = self.services.chunk_states(session, n)
                counts[n] = sum(1 for st in states if st == browse.CHUNK_CACHED)
        self.app.call_from_thread(self._set_cached, session, counts)

    def _set_cached(self, session, counts: dict[int, int]) -> None:
        if session is not self.session or not self.is_attached:
            return
        t = self.query_one("#layers", DataTable)
        for n, cached in counts.items():
            v = session.views[n]
            if v is None or v.cached_chunks == cached:
                continue
            v.cached_chunks = cached
            if "cached" in [str(k.value) for k in t.columns] and t.row_count > n:
                t.update_cell(str(n), "cached", self._cached_cell(v))

    def _mounted_digests(self) -> set[str]:
        return {lay.get("digest") for m in self.mounts for lay in m.get("layers") or []
                if isinstance(lay, dict) and m.get("state") == "serving"}

    @work(exclusive=True, group="mounts", thread=True)
    def refresh_mounts(self) -> None:
        try:
            mounts = self.services.list_mounts()
        except Exception:  # noqa: BLE001 - a broken mount record must not break the table
            mounts = []
        self.app.call_from_thread(self._set_mounts, mounts)

    def _set_mounts(self, mounts) -> None:
        changed = self._mounted_digests()
        self.mounts = mounts
        if self.session is not None and changed != self._mounted_digests():
            self.refresh_layers()

    # -- actions ------------------------------------------------------------------
    def _selected(self) -> int | None:
        if self.session is None:
            return None
        t = self.query_one("#layers", DataTable)
        if t.row_count == 0 or t.cursor_row is None:
            return None
        return t.cursor_row

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "layers":
            self.action_open_layer()

    def action_open_layer(self) -> None:
        n = self._selected()
        if n is None:
            return
        v = self.session.views[n]
        if v is None:
            self.notify("That layer is still loading.")
            return
        from .layer import LayerScreen

        if v.index is None and self.services.can_index(v):
            # a plain layer: stream it once (progress, Esc cancels), then browse
            from .modals import IndexLayerScreen

            def indexed(ok: bool | None) -> None:
                self.refresh_layers()
                if ok:
                    self.app.push_screen(LayerScreen(self.session, n))

            self.app.push_screen(IndexLayerScreen(self.session, n), indexed)
            return
        if v.index is None:
            self.notify(printable(f"Layer {n} cannot be browsed: {v.error}"), severity="warning",
                        timeout=8, markup=False)
            return
        self.app.push_screen(LayerScreen(self.session, n))

    def action_verify(self) -> None:
        n = self._selected()
        if n is None:
            return
        from .modals import VerifyScreen

        def done(_result) -> None:
            self.refresh_layers()

        self.app.push_screen(VerifyScreen(self.session, n), done)

    def action_mount_layer(self) -> None:
        n = self._selected()
        if n is not None:
            self._mount(n)

    def action_mount_image(self) -> None:
        if self.session is not None:
            self._mount(None)

    def action_open_mount(self) -> None:
        """Where the selected layer is mounted: copy the path, say it, and
        show it on the Mounts screen."""
        n = self._selected()
        if n is None:
            return
        m = self.services.find_layer_mount(self.mounts, self.session.image.layers[n].digest)
        if m is None:
            self.notify(f"Layer {n} is not mounted; press m to mount it.", severity="warning")
            return
        self.app.copy_to_clipboard(m["mountpoint"])
        self.notify(printable(f"Layer {n} is mounted at {m['mountpoint']} (path copied)."),
                    markup=False)
        self.app.action_mounts()

    def _mount(self, layer: int | None) -> None:
        from .modals import MountDialog

        self.app.push_screen(MountDialog(self.session.ref_text, layer),
                             lambda _r: self.refresh_mounts())

    def action_copy_digest(self) -> None:
        n = self._selected()
        if n is None:
            return
        d = self.session.image.layers[n].digest
        self.app.copy_to_clipboard(d)
        self.notify(printable(f"Copied {browse.short_digest(d)}."), markup=False)

    def action_platform(self) -> None:
        sel = self.query_one("#platform", Select)
        if sel.display:
            sel.focus()
        else:
            self.notify("This image has a single platform.")

    def on_select_changed(self, event: Select.Changed) -> None:
        if self.session is None or event.value in (Select.BLANK, None):
            return
        if event.value != self.session.image.platform:
            self.platform = str(event.value)
            self.load()

    def action_reload(self) -> None:
        self.load()
