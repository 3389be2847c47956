"""Things every screen shares: error notifications and a cancel key."""

from __future__ import annotations

from textual.binding import Binding
from textual.screen import Screen

from ..services import one_line


class BaseScreen(Screen):
    BINDINGS = [Binding("escape", "back", "Back", id="back")]

    @property
    def services(self):
        return self.app.services

    def fail(self, err: BaseException, what: str = "") -> None:
        msg = one_line(err)
        self.notify(f"{what}: {msg}" if what else msg, severity="error", timeout=8)

    def action_back(self) -> None:
        busy = [w for w in self.workers if w.is_running and w.group == "task"]
        if busy:
            for w in busy:
                w.cancel()
            self.notify("Cancelled.")
            return
        if len(self.app.screen_stack) > 2:
            self.app.pop_screen()
