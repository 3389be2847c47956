"""Home: enter an image or a registry; recent and configured registries.

The list has the focus, so the app's keys (``q``, ``M``, ``?``) act; ``/``
(or Tab) moves to the input to type a reference, Escape leaves it.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.widgets import Header, Input, OptionList, Static
from textual.widgets.option_list import Option

from ..text import plain
from ..widgets import KeyBar
from .base import BaseScreen


class HomeScreen(BaseScreen):
    BINDINGS = [
        Binding("slash", "focus_input", "Enter reference", id="open", key_display="/"),
        Binding("L", "login", "Login", id="login"),
        Binding("delete", "forget", "Forget", id="forget", show=False),
        Binding("escape", "leave_input", "Leave the input", show=False),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="home"):
            yield Static("[b]stargz-tui[/b]  lazily pulled images: eStargz · zstd:chunked · stargz",
                         id="home-title")
            yield Input(placeholder="image (ghcr.io/org/app:tag, oci:DIR:TAG) or registry (localhost:5000)",
                        id="target")
            yield OptionList(id="recent")
        yield KeyBar()

    def on_mount(self) -> None:
        self.sub_title = "home"
        self.refresh_list()
        self.query_one("#recent", OptionList).focus()

    def on_screen_resume(self) -> None:
        self.refresh_list()

    def refresh_list(self) -> None:
        cfg = self.app.config
        ol = self.query_one("#recent", OptionList)
        ol.clear_options()
        regs = list(dict.fromkeys(cfg.recent_registries + cfg.registries + self._auth_registries()))
        if regs:
            ol.add_option(Option("[b]Registries[/b]", disabled=True))
            for r in regs:
                ol.add_option(Option(plain(f"  ⌂ {r}"), id=f"reg:{r}"))
        if cfg.recent_images:
            ol.add_option(Option("[b]Recent images[/b]", disabled=True))
            for r in cfg.recent_images:
                ol.add_option(Option(plain(f"  ◆ {r}"), id=f"img:{r}"))
        if not regs and not cfg.recent_images:
            ol.add_option(Option("[dim]Nothing recent yet: press / to type a reference, "
                                 "then Enter.[/dim]", disabled=True))

    def _auth_registries(self) -> list[str]:
        return self.app.services.known_registries()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.app.open_target(event.value)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        oid = event.option.id or ""
        kind, _, value = oid.partition(":")
        if kind == "reg":
            from .repos import ReposScreen

            self.app.push_screen(ReposScreen(value))
        elif kind == "img":
            from .image import ImageScreen

            self.app.push_screen(ImageScreen(value))

    def action_focus_input(self) -> None:
        self.query_one("#target", Input).focus()

    def action_leave_input(self) -> None:
        self.query_one("#recent", OptionList).focus()

    def action_forget(self) -> None:
        ol = self.query_one("#recent", OptionList)
        if ol.highlighted is None:
            return
        oid = ol.get_option_at_index(ol.highlighted).id or ""
        kind, _, value = oid.partition(":")
        cfg = self.app.config
        for lst in (cfg.recent_images, cfg.recent_registries):
            if value in lst:
                lst.remove(value)
        cfg.save()
        self.refresh_list()

    def action_login(self) -> None:
        from .modals import LoginScreen

        ol = self.query_one("#recent", OptionList)
        value = ""
        if ol.highlighted is not None:
            oid = ol.get_option_at_index(ol.highlighted).id or ""
            if oid.startswith("reg:"):
                value = oid[4:]
        self.app.push_screen(LoginScreen(value or self.query_one("#target", Input).value))
