"""Things every screen shares: error notifications and a cancel key.

Notifications never parse markup (``markup=False``): they quote names and
messages from images and registries (see stargz_tui/text.py).
"""

from __future__ import annotations

from textual.binding import Binding
from textual.screen import Screen

from ..services import one_line
from ..text import printable


class BaseScreen(Screen):
    BINDINGS = [Binding("escape", "back", "Back", id="back")]

    @property
    def services(self):
        return self.app.services

    def fail(self, err: BaseException, what: str = "") -> None:
        msg = printable(one_line(err))
        self.notify(f"{what}: {msg}" if what else msg, severity="error", timeout=8, markup=False)

    def action_back(self) -> None:
        busy = [w for w in self.workers if w.is_running and w.group == "task"]
        if busy:
            for w in busy:
                w.cancel()
            self.notify("Cancelled.")
            return
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
