"""Modal screens: verify progress, file viewer, extract, login, text."""

from __future__ import annotations

import os

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, ProgressBar, Static, TextArea

from core import browse, verify
from core.errors import CoreError

from ..services import is_plain, one_line
from ..text import plain, printable, printable_text


class TaskModal(ModalScreen):
    """A modal running one cancellable task; Escape cancels it (or closes)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel / close", id="cancel")]

    def action_cancel(self) -> None:
        running = [w for w in self.workers if w.is_running]
        for w in running:
            w.cancel()
        if running:
            self.notify("Cancelled.")
        self.dismiss(None)


class VerifyScreen(TaskModal):
    """Verify a layer: the TOC against its annotation, then every chunk."""

    def __init__(self, session, n: int):
        super().__init__()
        self.session = session
        self.n = n

    def compose(self) -> ComposeResult:
        d = self.session.image.layers[self.n]
        with Vertical(classes="dialog", id="verify-box"):
            title = Text(f"Verify layer {self.n}", "bold")
            title.append_text(plain(f"  {browse.short_digest(d.digest)}"))
            yield Label(title)
            yield Static("TOC digest: checking…", id="verify-toc")
            yield ProgressBar(total=None, show_eta=False, id="verify-progress")
            yield Static("", id="verify-file")
            yield Static("", id="verify-result")
            yield Label("[dim]Esc cancels / closes[/dim]")

    def on_mount(self) -> None:
        self.run_verify()

    @work(exclusive=True, group="task")
    async def run_verify(self) -> None:
        toc = self.query_one("#verify-toc", Static)
        bar = self.query_one("#verify-progress", ProgressBar)
        result = self.query_one("#verify-result", Static)
        stage = self.query_one("#verify-file", Static)
        view = self.session.views[self.n]
        desc = self.session.image.layers[self.n]

        def progress(p: verify.VerifyProgress) -> None:
            bar.update(total=p.total, progress=p.done)
            stage.update(plain(f"{p.stage}: {browse.human_size(p.done)} of "
                               f"{browse.human_size(p.total)}", "dim"))

        # One pass over the blob: TOC digest, then every chunk and file digest,
        # the blob digest and the diffID (core/verify.py).
        res = await verify.verify_layer(self.session.image, desc, full=True, progress=progress,
                                        on_chunk=self.app.services.chunk_sink(self.session, self.n))
        toc_checks = [c for c in res.checks if c.name in ("toc-digest", "manifest-checksum")]
        bad_toc = [c for c in toc_checks if not c.ok and not c.skipped]
        if bad_toc:
            toc.update(plain(f"TOC digest: {bad_toc[0].message}", "bold red"))
            self.notify(printable(f"Layer {self.n}: {bad_toc[0].message}"), severity="error",
                        timeout=8, markup=False)
        elif res.toc_digest:
            toc.update(plain(f"TOC digest: verified ({browse.short_digest(res.toc_digest)})",
                             "green"))
        else:
            toc.update(Text("TOC digest: none (plain layer)", "dim"))
        if view is not None:
            view.failed_chunks = res.failed_chunks
            view.verified = "full" if res.ok else None
        stage.update("")
        problems = res.problems
        if problems:
            what = (f"{len(res.failed_chunks)} of {res.chunks_checked} chunks fail verification"
                    if res.failed_chunks else f"{len(problems)} checks fail")
            msg = f"Layer {self.n}: {what}"
            result.update(Text("\n".join(printable(m) for m in
                                         [msg] + [c.message for c in problems[:5]]), "bold red"))
            self.notify(msg + ".", severity="error", timeout=10, markup=False)
        else:
            msg = (f"Layer {self.n}: all {res.chunks_checked} chunks, the blob digest and "
                   "the diffID verified")
            result.update(Text(msg + ".", "bold green"))
            self.notify(msg + ".", markup=False)


class IndexLayerScreen(TaskModal):
    """Index a plain (tar/gzip/zstd) layer: stream its blob once, with
    progress; Escape cancels. Dismisses with True once the layer is indexed."""

    def __init__(self, session, n: int):
        super().__init__()
        self.session = session
        self.n = n

    def compose(self) -> ComposeResult:
        d = self.session.image.layers[self.n]
        view = self.session.views[self.n]
        with Vertical(classes="dialog", id="index-box"):
            title = Text(f"Layer {self.n}: plain {view.format_label}", "bold")
            title.append_text(plain(f"  {browse.short_digest(d.digest)}"))
            yield Label(title)
            yield Static(plain("No TOC: reading the whole blob once to list its files "
                               "(kept for this session; the layer cannot be mounted lazily)."))
            yield ProgressBar(total=d.size, show_eta=False, id="index-progress")
            yield Label("[dim]Esc cancels[/dim]")

    def on_mount(self) -> None:
        self.run_index()

    @work(exclusive=True, group="task")
    async def run_index(self) -> None:
        bar = self.query_one("#index-progress", ProgressBar)

        def progress(done: int, total: int) -> None:
            bar.update(total=total, progress=done)

        try:
            await self.app.services.index_plain_layer(self.session, self.n, progress)
        except CoreError as e:
            self.notify(printable(f"Layer {self.n}: {one_line(e)}"), severity="error",
                        timeout=8, markup=False)
            self.dismiss(False)
            return
        self.dismiss(True)


class FileViewer(ModalScreen):
    """Show a text file in place (only its chunks are fetched)."""

    BINDINGS = [Binding("escape,q", "dismiss", "Close", id="close_viewer")]

    def __init__(self, session, node: browse.Node):
        super().__init__()
        self.session = session
        self.node = node

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide", id="viewer-box"):
            yield Label(plain(f"/{self.node.path}", "bold"), id="viewer-title")
            yield TextArea("", read_only=True, show_line_numbers=True, id="viewer-text")
            yield Label("[dim]Esc closes[/dim]")

    def on_mount(self) -> None:
        self.load()

    @work(exclusive=True, group="task")
    async def load(self) -> None:
        ix = self.session.views[self.node.layer_no].index
        entry = ix.entry(self.node.entry_id)
        source = self.session.source(self.node.layer_no)
        area = self.query_one("#viewer-text", TextArea)
        try:
            if is_plain(self.session.views[self.node.layer_no]):
                text, cut = await self.app.services.plain_file_text(ix, source, entry,
                                                                   browse.TEXT_VIEW_LIMIT)
            else:
                sink = self.app.services.chunk_sink(self.session, self.node.layer_no)
                text, cut = await browse.read_text(ix, source, entry, on_chunk=sink)
        except CoreError as e:
            self.notify(printable(one_line(e)), severity="error", timeout=8, markup=False)
            self.dismiss(None)
            return
        area.load_text(printable_text(text))  # (a file's ESC must not reach the terminal)
        if cut:
            title = plain(f"/{self.node.path}", "bold")
            title.append(f" (first {browse.human_size(browse.TEXT_VIEW_LIMIT)})", "dim")
            self.query_one("#viewer-title", Label).update(title)
        area.focus()


class ExtractScreen(TaskModal):
    """Extract the selected file or directory to a local directory."""

    def __init__(self, session, node: browse.Node, dest: str | None = None):
        super().__init__()
        self.session = session
        self.node = node
        self.dest = dest or os.getcwd()

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="extract-box"):
            title = Text("Extract ", "bold")
            title.append_text(plain(f"/{self.node.path or ''}"))
            title.append("  into directory:")
            yield Label(title)
            yield Input(self.dest, id="extract-dest")
            yield ProgressBar(total=None, show_eta=False, id="extract-progress")
            yield Static("", id="extract-status")
            with Horizontal(classes="buttons"):
                yield Button("Extract", variant="primary", id="extract-go")
                yield Button("Cancel", id="extract-cancel")

    def on_mount(self) -> None:
        self.query_one("#extract-progress").display = False
        self.query_one("#extract-dest", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.run_extract(event.value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "extract-go":
            self.run_extract(self.query_one("#extract-dest", Input).value)
        else:
            self.action_cancel()

    @work(exclusive=True, group="task")
    async def run_extract(self, dest: str) -> None:
        dest = os.path.expanduser(dest.strip() or ".")
        bar = self.query_one("#extract-progress", ProgressBar)
        bar.display = True
        status = self.query_one("#extract-status", Static)
        ix = self.session.views[self.node.layer_no].index
        entry = ix.entry(self.node.entry_id)
        source = self.session.source(self.node.layer_no)

        def progress(done: int, total: int, path: str) -> None:
            bar.update(total=max(total, 1), progress=done)
            status.update(plain(f"/{path}", "dim"))

        try:
            sink = self.app.services.chunk_sink(self.session, self.node.layer_no)
            n = await browse.extract(ix, source, entry, dest, progress=progress, on_chunk=sink)
        except (CoreError, OSError) as e:
            status.update(plain(one_line(e), "red"))
            self.notify(printable(f"Extract failed: {one_line(e)}"), severity="error", timeout=8,
                        markup=False)
            return
        self.notify(printable(f"Extracted /{self.node.path} ({browse.human_size(n)}) into {dest}."),
                    markup=False)
        self.dismiss(dest)


class TextModal(ModalScreen):
    BINDINGS = [Binding("escape,q", "dismiss", "Close")]

    def __init__(self, title: str, body):
        super().__init__()
        self.title_text = title
        self.body = body

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label(plain(self.title_text, "bold"))
            yield VerticalScroll(Static(self.body))
            yield Label("[dim]Esc closes[/dim]")


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; dismisses with True only on an explicit yes."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, yes_label: str = "Yes"):
        super().__init__()
        self.question = question
        self.yes_label = yes_label

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="confirm-box"):
            yield Label(plain(self.question))
            with Horizontal(classes="buttons"):
                yield Button(f"{self.yes_label} (y)", variant="error", id="confirm-yes")
                yield Button("Cancel (n)", id="confirm-no")

    def on_mount(self) -> None:
        self.query_one("#confirm-no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm-yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class LoginScreen(ModalScreen):
    """Store credentials for a registry in the keyring (through core)."""

    BINDINGS = [Binding("escape", "dismiss", "Cancel")]

    def __init__(self, registry: str = ""):
        super().__init__()
        self.registry = registry

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="login-box"):
            yield Label("[b]Log in to a registry[/b]")
            yield Input(self.registry, placeholder="registry (ghcr.io, localhost:5000)", id="login-registry")
            yield Input(placeholder="user", id="login-user")
            yield Input(placeholder="password or token", password=True, id="login-password")
            yield Static("", id="login-error")
            with Horizontal(classes="buttons"):
                yield Button("Log in", variant="primary", id="login-go")
                yield Button("Cancel", id="login-cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "login-go":
            self.submit()
        else:
            self.dismiss(None)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.submit()

    @work(exclusive=True, group="task")
    async def submit(self) -> None:
        reg = self.query_one("#login-registry", Input).value.strip()
        user = self.query_one("#login-user", Input).value
        pw = self.query_one("#login-password", Input).value
        err = self.query_one("#login-error", Static)
        if not reg or not user:
            err.update(Text("Give a registry and a user.", "red"))
            return
        err.update(Text("Checking…", "dim"))
        try:
            await self.app.services.login(reg, user, pw)
        except Exception as e:  # noqa: BLE001 - shown in place, in one sentence
            err.update(plain(one_line(e), "red"))
            return
        self.app.config.remember_registry(reg)
        self.notify(printable(f"Logged in to {reg}."), markup=False)
        self.dismiss(reg)


class MountDialog(ModalScreen):
    """Mount a layer (or the merged image) at a chosen mountpoint; with a
    record file, a recording mount (``mount --record``: each file opened is
    appended to it, for ``optimize --record-in``)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, image: str = "", layer: int | None = None, mountpoint: str = "",
                 record: str = ""):
        super().__init__()
        self.image = image
        self.layer_no = layer
        self.mountpoint = mountpoint
        self.record = record

    def compose(self) -> ComposeResult:
        what = "the merged image" if self.layer_no is None else f"layer {self.layer_no}"
        with Vertical(classes="dialog", id="mount-box"):
            yield Label(f"[b]Mount {what}[/b]")
            yield Input(self.image, placeholder="image reference", id="mount-image")
            yield Input("" if self.layer_no is None else str(self.layer_no),
                        placeholder="layer index or digest (empty: merged image)", id="mount-layer")
            yield Input(self.mountpoint, placeholder="mountpoint (an existing directory)",
                        id="mount-point")
            yield Input(self.record, placeholder="record the files opened to (optional file)",
                        id="mount-record")
            yield Static("", id="mount-error")
            with Horizontal(classes="buttons"):
                yield Button("Mount", variant="primary", id="mount-go")
                yield Button("Cancel", id="mount-cancel")

    def on_mount(self) -> None:
        self.query_one("#mount-point" if self.image else "#mount-image", Input).focus()

    def action_cancel(self) -> None:
        for w in self.workers:
            w.cancel()
        self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "mount-go":
            self.submit()
        else:
            self.action_cancel()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.submit()

    @work(exclusive=True, group="task")
    async def submit(self) -> None:
        image = self.query_one("#mount-image", Input).value.strip()
        layer = self.query_one("#mount-layer", Input).value.strip() or None
        mp = os.path.expanduser(self.query_one("#mount-point", Input).value.strip())
        record = os.path.expanduser(self.query_one("#mount-record", Input).value.strip()) or None
        err = self.query_one("#mount-error", Static)
        if not image or not mp:
            err.update(Text("Give an image and a mountpoint.", "red"))
            return
        err.update(Text("Mounting… (Esc cancels)", "dim"))
        try:
            rec = await self.app.services.mount(image, mp, layer, record=record)
        except Exception as e:  # noqa: BLE001 - shown in place, in one sentence
            err.update(plain(one_line(e), "red"))
            return
        self.notify(printable(f"Mounted at {rec['mountpoint']}."), markup=False)
        self.dismiss(rec)
