"""The Textual app: registries -> repositories and tags -> image -> layer."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from textual.app import App, SystemCommand
from textual.binding import Binding

from .config import AppConfig
from .services import Services
from .text import printable

LIGHT_THEME = "textual-light"
DARK_THEME = "textual-dark"


class StargzApp(App):
    """stargz-tui: inspect, verify and mount lazily pulled images."""

    TITLE = "stargz-tui"
    # absolute: Textual resolves a relative path against a subclass's module
    CSS_PATH = str(Path(__file__).with_name("app.tcss"))
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (110, "-wide")]
    BINDINGS = [
        Binding("question_mark", "help", "Help", id="help", key_display="?"),
        Binding("M", "mounts", "Mounts", id="mounts"),
        Binding("ctrl+t", "toggle_theme", "Theme", id="theme", show=False),
        Binding("q", "quit", "Quit", id="quit"),
    ]

    def __init__(self, target: str | None = None, *, config: AppConfig | None = None,
                 services: Services | None = None, theme: str | None = None):
        super().__init__()
        self.config = config if config is not None else AppConfig.load()
        self.services = services if services is not None else Services(self.config)
        self.target = target
        self._initial_theme = theme or self.config.theme

    def on_mount(self) -> None:
        from .screens.home import HomeScreen

        if self._initial_theme in self.available_themes:
            self.theme = self._initial_theme
        if self.config.keys:
            self.set_keymap(self.config.keys)
        if self.config.error:
            self.notify(printable(self.config.error), severity="warning", markup=False)
        self.push_screen(HomeScreen())
        if self.target:
            self.open_target(self.target)

    # -- navigation ------------------------------------------------------------
    def open_target(self, text: str) -> None:
        from .screens.image import ImageScreen
        from .screens.repos import ReposScreen

        text = text.strip()
        if not text:
            return
        if self.services.classify(text) == "registry":
            self.push_screen(ReposScreen(text))
        else:
            self.push_screen(ImageScreen(text))

    def action_help(self) -> None:
        from .screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))

    def action_mounts(self) -> None:
        from .screens.mounts import MountsScreen

        if not isinstance(self.screen, MountsScreen):
            self.push_screen(MountsScreen())

    def action_toggle_theme(self) -> None:
        self.theme = LIGHT_THEME if self.theme == DARK_THEME else DARK_THEME

    def watch_theme(self, theme: str) -> None:
        if self.config.theme != theme:
            self.config.theme = theme
            self.config.save()

    # -- command palette ---------------------------------------------------------
    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("Mounts", "Show mounts with live statistics", self.action_mounts)
        yield SystemCommand("Toggle dark/light theme", "Switch between dark and light",
                            self.action_toggle_theme)
        seen = set()
        for node in (screen, *screen.query("*")):
            for binding in getattr(node, "BINDINGS", []):
                if not isinstance(binding, Binding) or not binding.description:
                    continue
                if binding.action in seen or binding.action in ("quit", "help"):
                    continue
                seen.add(binding.action)
                help_text = getattr(node, "COMMAND_HELP", {}).get(binding.action, binding.description)
                yield SystemCommand(binding.description, help_text,
                                    partial(node.run_action, binding.action))
