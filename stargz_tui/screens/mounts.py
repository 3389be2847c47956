"""Mounts: every mount with live stats (refreshed every second) and actions."""

from __future__ import annotations

import anyio.to_thread
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Header, Static

from core.browse import human_size

from ..text import plain, printable
from ..widgets import AppFooter
from .base import BaseScreen

REFRESH_SECONDS = 1.0


class MountsScreen(BaseScreen):
    BINDINGS = [
        Binding("n", "new_mount", "Mount", id="new_mount"),
        Binding("u", "unmount", "Unmount", id="unmount"),
        Binding("F", "force_unmount", "Force unmount", id="force_unmount"),
        Binding("c", "copy_path", "Copy path", id="copy_path"),
        Binding("s", "shell_hint", "Shell", id="shell_hint"),
    ]

    def __init__(self):
        super().__init__()
        self.mounts: list[dict] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="mounts-head")
        yield DataTable(id="mounts", cursor_type="row", zebra_stripes=True)
        yield Static(id="mount-detail")
        yield AppFooter()

    def on_mount(self) -> None:
        self.sub_title = "mounts"
        t = self.query_one("#mounts", DataTable)
        for label, key in (("mountpoint", "mp"), ("image", "image"), ("kind", "kind"),
                           ("state", "state"), ("fetched", "fetched"), ("chunks", "chunks"),
                           ("prefetch", "prefetch"), ("background", "bg"), ("errors", "errors")):
            t.add_column(label, key=key)
        if self.services.mount_manager() is None:
            self.query_one("#mounts-head", Static).update(
                Text("The mount manager is not available in this build.", "yellow"))
        self.refresh_mounts()
        self.set_interval(REFRESH_SECONDS, self.refresh_mounts)
        t.focus()

    @work(exclusive=True, group="refresh", thread=True)
    def refresh_mounts(self) -> None:
        try:
            mounts = self.services.list_mounts()
            err = None
        except Exception as e:  # noqa: BLE001 - one sentence in the header
            mounts, err = [], e
        self.app.call_from_thread(self._show, mounts, err)

    def _show(self, mounts: list[dict], err) -> None:
        self.mounts = mounts
        t = self.query_one("#mounts", DataTable)
        row = t.cursor_row
        t.clear()
        for m in mounts:
            total = m.get("chunksTotal") or 0
            cached = m.get("chunksCached") or 0
            state = m.get("state", "?")
            errors = (m.get("digestErrors") or 0) + (m.get("readErrors") or 0)
            t.add_row(
                plain(m["mountpoint"]), plain(m.get("image", "")), plain(m.get("kind") or ""),
                plain(state, "green" if state == "serving" else "bold red"),
                human_size(m.get("bytesFetched") or 0),
                f"{cached}/{total}" + (f" {100 * cached // total}%" if total else ""),
                Text("done", "green") if m.get("prefetchDone") else Text("…", "cyan"),
                Text("done", "green") if m.get("backgroundFetchDone") else Text("…", "cyan"),
                Text(str(errors), "bold red") if errors else "0",
                key=m["mountpoint"],
            )
        if row is not None and row < t.row_count:
            t.move_cursor(row=row)
        head = self.query_one("#mounts-head", Static)
        if err is not None:
            from ..services import one_line

            head.update(plain(f"Cannot list mounts: {one_line(err)}", "red"))
        elif self.services.mount_manager() is not None:
            head.update(Text(f"{len(mounts)} mount{'s' if len(mounts) != 1 else ''} · "
                             "refreshed every second", "dim"))
        self._detail()

    def _current(self) -> dict | None:
        t = self.query_one("#mounts", DataTable)
        if not self.mounts or t.cursor_row is None or t.cursor_row >= len(self.mounts):
            return None
        return self.mounts[t.cursor_row]

    def on_data_table_row_highlighted(self, _event) -> None:
        self._detail()

    def _detail(self) -> None:
        m = self._current()
        d = self.query_one("#mount-detail", Static)
        if m is None:
            d.update(Text("No mounts. Press n to mount an image or a layer.", "dim")
                     if not self.mounts else "")
            return
        t = Text()
        if m.get("reason"):
            t.append(f"{printable(m['reason'])}\n", "red")
        for lay in m.get("layers") or []:
            st = lay.get("stats") or {}
            t.append(f"layer {lay['index']} ", "bold")
            t.append(printable(f"{lay['digest'][:19]} pid {lay.get('pid')} {lay.get('state')} "))
            t.append(f"fetched {human_size(st.get('bytesFetched') or 0)} in "
                     f"{st.get('requests', 0)} requests · cached "
                     f"{st.get('chunksCached', 0)}/{st.get('chunksTotal', 0)}")
            if st.get("lastError"):
                t.append(f" · {printable(st['lastError'])}", "red")
            t.append("\n")
        d.update(t)

    # -- actions ---------------------------------------------------------------------
    def action_new_mount(self) -> None:
        from .modals import MountDialog

        image = ""
        if self.app.config.recent_images:
            image = self.app.config.recent_images[0]
        self.app.push_screen(MountDialog(image), lambda _r: self.refresh_mounts())

    def action_unmount(self) -> None:
        m = self._current()
        if m is not None:
            self.do_unmount(m["mountpoint"], False)

    def action_force_unmount(self) -> None:
        m = self._current()
        if m is not None:
            self.do_unmount(m["mountpoint"], True)

    @work(group="task")
    async def do_unmount(self, mountpoint: str, force: bool) -> None:
        try:
            await anyio.to_thread.run_sync(self.services.unmount, mountpoint, force)
        except Exception as e:  # noqa: BLE001 - one sentence
            self.fail(e)
        else:
            self.notify(printable(f"Unmounted {mountpoint}."), markup=False)
        self.refresh_mounts()

    def action_copy_path(self) -> None:
        m = self._current()
        if m is not None:
            self.app.copy_to_clipboard(m["mountpoint"])
            self.notify(printable(f"Copied {m['mountpoint']}."), markup=False)

    def action_shell_hint(self) -> None:
        m = self._current()
        if m is not None:
            self.notify(printable(f"cd {m['mountpoint']}   (unmount with: stargz-tui unmount "
                                  f"{m['mountpoint']})"), timeout=10, markup=False)
