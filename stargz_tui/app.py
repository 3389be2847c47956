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

    # -- navigation from anywhere (command palette) -------------------------------
    def action_open(self) -> None:
        """Back to the home screen, typing into its input."""
        from .screens.home import HomeScreen

        while len(self.screen_stack) > 2 and not isinstance(self.screen, HomeScreen):
            self.pop_screen()
        if isinstance(self.screen, HomeScreen):
            self.screen.action_focus_input()

    def action_mount(self) -> None:
        from .screens.modals import MountDialog

        session = getattr(self.screen, "session", None)
        image = session.ref_text if session is not None else (
            self.config.recent_images[0] if self.config.recent_images else "")
        self.push_screen(MountDialog(image))

    def action_unmount(self) -> None:
        from .screens.mounts import MountsScreen

        if isinstance(self.screen, MountsScreen):
            self.screen.action_unmount()
            return
        self.push_screen(MountsScreen())
        self.notify("Select a mount and press u (F forces).", timeout=5)

    # -- command palette ---------------------------------------------------------
    def get_system_commands(self, screen):
        """Each command once: Textual's own (without its widget-internals key
        panel: ``?`` is ours), the app's, then the current screen's keys."""
        titles: set[str] = set()

        def once(cmd: SystemCommand):
            if cmd.title.lower() not in titles:
                titles.add(cmd.title.lower())
                yield cmd

        for cmd in super().get_system_commands(screen):
            if cmd.title != "Keys":
                yield from once(cmd)
        yield from once(SystemCommand("Keys", "Every key of this screen, and how to remap them",
                                      self.action_help))
        yield from once(SystemCommand("Open image or registry",
                                      "Type an image reference or a registry (home screen)",
                                      self.action_open))
        yield from once(SystemCommand("Mount", "Mount an image, or one of its layers",
                                      self.action_mount))
        yield from once(SystemCommand("Unmount", "Unmount a mount (on the Mounts screen)",
                                      self.action_unmount))
        yield from once(SystemCommand("Mounts", "Show mounts with live statistics",
                                      self.action_mounts))
        yield from once(SystemCommand("Toggle dark/light theme", "Switch between dark and light",
                                      self.action_toggle_theme))
        # the screen's own keys only: a widget's (cursor moves, toggles) are not commands
        actions = {"quit", "help", "back", "mounts", "toggle_theme"}
        for binding in getattr(screen, "BINDINGS", []):
            if not isinstance(binding, Binding) or not binding.description:
                continue
            if binding.action in actions:
                continue
            actions.add(binding.action)
            help_text = getattr(screen, "COMMAND_HELP", {}).get(binding.action,
                                                                 binding.description)
            yield from once(SystemCommand(binding.description, help_text,
                                          partial(screen.run_action, binding.action)))
