"""Mounts: every mount with live stats (refreshed every second) and actions."""

from __future__ import annotations

import os
import subprocess

import anyio.to_thread
from rich.text import Text
from textual import work
from textual.app import ComposeResult, SuspendNotSupported
from textual.binding import Binding
from textual.widgets import DataTable, Header, Static

from core.browse import human_size

from ..services import one_line
from ..text import plain, printable
from ..widgets import KeyBar, set_table_columns
from .base import BaseScreen

REFRESH_SECONDS = 1.0
COLUMNS = [("mountpoint", "mp"), ("image", "image"), ("kind", "kind"), ("state", "state"),
           ("fetched", "fetched"), ("chunks", "chunks"), ("prefetch", "prefetch"),
           ("background", "bg"), ("errors", "errors")]
# narrow terminals: the image, kind and fetch progress move to the detail pane
COLUMNS_NARROW = [c for c in COLUMNS if c[1] in ("mp", "state", "fetched", "chunks", "errors")]
WIDE = 140      # every column fits from here (narrower: the key ones)
MP_NARROW = 36  # mountpoint characters shown in a narrow table (the detail pane has all)
MP_WIDE = 48
IMAGE_WIDE = 44


def _tail(text: str, width: int) -> str:
    """``text`` cut to ``width`` keeping its end (the distinctive part of a
    path or reference)."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


class MountsScreen(BaseScreen):
    BINDINGS = [
        Binding("n", "new_mount", "Mount", id="new_mount"),
        Binding("u", "unmount", "Unmount", id="unmount"),
        Binding("F", "force_unmount", "Force unmount", id="force_unmount"),
        Binding("c", "copy_path", "Copy path", id="copy_path"),
        Binding("s", "shell", "Shell", id="shell"),
    ]

    def __init__(self):
        super().__init__()
        self.mounts: list[dict] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="mounts-head")
        yield DataTable(id="mounts", cursor_type="row", zebra_stripes=True)
        yield Static(id="mount-detail")
        yield KeyBar()

    def on_mount(self) -> None:
        self.sub_title = "mounts"
        t = self.query_one("#mounts", DataTable)
        self._set_columns()
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
        keys = [str(k.value) for k in t.columns]
        narrow = len(keys) < len(COLUMNS)
        for m in mounts:
            total = m.get("chunksTotal") or 0
            cached = m.get("chunksCached") or 0
            state = m.get("state", "?")
            errors = (m.get("digestErrors") or 0) + (m.get("readErrors") or 0)
            mp = _tail(printable(m["mountpoint"]), MP_NARROW if narrow else MP_WIDE)
            cells = {
                "mp": Text(mp), "image": Text(_tail(printable(m.get("image", "")), IMAGE_WIDE)), "kind": plain(m.get("kind") or ""),
                # restarts by the mount service: the cell says how many
                "state": plain(state + (f" ↻{m['restarts']}" if m.get("restarts") else ""),
                               "green" if state == "serving" else "bold red"),
                "fetched": human_size(m.get("bytesFetched") or 0),
                "chunks": f"{cached}/{total}" + (f" {100 * cached // total}%" if total else ""),
                "prefetch": Text("done", "green") if m.get("prefetchDone") else Text("…", "cyan"),
                "bg": Text("done", "green") if m.get("backgroundFetchDone") else Text("…", "cyan"),
                "errors": Text(str(errors), "bold red") if errors else "0",
            }
            t.add_row(*(cells[k] for k in keys), key=m["mountpoint"])
        if row is not None and row < t.row_count:
            t.move_cursor(row=row)
        head = self.query_one("#mounts-head", Static)
        if err is not None:
            head.update(plain(f"Cannot list mounts: {one_line(err)}", "red"))
        elif self.services.mount_manager() is not None:
            head.update(Text(f"{len(mounts)} mount{'s' if len(mounts) != 1 else ''} · "
                             "refreshed every second", "dim"))
        self._detail()

    def _set_columns(self) -> bool:
        cols = COLUMNS_NARROW if self.app.size.width < WIDE else COLUMNS
        return set_table_columns(self.query_one("#mounts", DataTable), cols)

    def on_resize(self) -> None:
        if self._set_columns():
            self._show(self.mounts, None)

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
        t.append("image ", "bold")
        t.append(printable(f"{m.get('image', '')} ({m.get('kind') or '?'}) "))
        t.append("prefetch " + ("done" if m.get("prefetchDone") else "…") + " · background "
                 + ("done" if m.get("backgroundFetchDone") else "…") + "\n", "dim")
        if m.get("reason"):
            t.append(f"{printable(m['reason'])}\n", "red")
        if m.get("restarts") or m.get("lastError"):
            t.append(f"restarted {m.get('restarts', 0)} time(s) by the mount service", "yellow")
            if m.get("lastError"):
                t.append(printable(f" · last error: {m['lastError']}"), "yellow")
            t.append("\n")
        if m.get("record"):
            t.append(printable(f"recording: {m.get('recorded', 0)} file(s) to {m['record']}") + "\n",
                     "magenta")
        for lay in m.get("layers") or []:
            st = lay.get("stats") or {}
            t.append(f"layer {lay['index']} ", "bold")
            t.append(printable(f"{(lay.get('digest') or 'resolving')[:19]} pid {lay.get('pid')} "
                               f"{lay.get('state')} "))
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
        """Force-unmounting detaches the mount under its users: ask first."""
        m = self._current()
        if m is None:
            return
        from .modals import ConfirmScreen

        mp = m["mountpoint"]

        def answered(yes: bool | None) -> None:
            if yes:
                self.do_unmount(mp, True)

        self.app.push_screen(ConfirmScreen(
            f"Force-unmount {printable(mp)}? Processes using it lose it (lazy detach).",
            "Force unmount"), answered)

    @work(group="task")
    async def do_unmount(self, mountpoint: str, force: bool) -> None:
        try:
            await anyio.to_thread.run_sync(self.services.unmount, mountpoint, force)
        except Exception as e:  # noqa: BLE001 - one sentence
            # the core's advice is for the CLI; here the key does it
            msg = one_line(e).replace("use --force", f"press {self._force_key()} to force-unmount")
            self.notify(printable(msg), severity="error", timeout=10, markup=False)
        else:
            self.notify(printable(f"Unmounted {mountpoint}."), markup=False)
        self.refresh_mounts()

    def action_copy_path(self) -> None:
        m = self._current()
        if m is not None:
            self.app.copy_to_clipboard(m["mountpoint"])
            self.notify(printable(f"Copied {m['mountpoint']}."), markup=False)

    def _force_key(self) -> str:
        for _node, b, _on, _tip in self.active_bindings.values():
            if b.action == "force_unmount":
                return self.app.get_key_display(b)
        return "F"

    def action_shell(self) -> None:
        """Suspend the app and run $SHELL in the mountpoint; back on exit."""
        m = self._current()
        if m is None:
            return
        mp = m["mountpoint"]
        shell = os.environ.get("SHELL") or "/bin/sh"
        try:
            with self.app.suspend():
                print(f"stargz-tui: {printable(shell)} in {printable(mp)}; exit to return.",
                      flush=True)
                subprocess.call([shell], cwd=mp)
        except SuspendNotSupported:
            self.notify(printable(f"This terminal cannot suspend the app: cd {mp}"),
                        severity="warning", timeout=10, markup=False)
        except OSError as e:
            self.notify(printable(f"Cannot run {shell}: {one_line(e)}"), severity="error",
                        timeout=8, markup=False)
        self.refresh_mounts()
