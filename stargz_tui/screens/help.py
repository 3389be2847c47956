"""Help: every key of the screen underneath, and how to change them."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from ..text import plain

INTRO = """[b]stargz-tui[/b] — browse lazily pulled images (eStargz, zstd:chunked, stargz).
Home → registry → repository → tag → image → layer → file.  Ctrl+P opens the command palette.
"""

TREE_HELP = """[b]Layer tree[/b]  markers: [green]+ added[/]  [yellow]~ modified[/]  [red]- removed[/] (against the layers below)
Search with [b]/[/b]: words match names; [b]type:reg|dir|symlink|dev[/b], [b]size>1M[/b] filter; the tree stays navigable.
Chunk map: [green]█[/] cached  [cyan]▓[/] prefetch region  [grey50]░[/] not cached  [bold red]█[/] failed verification.
"""


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def __init__(self, under):
        super().__init__()
        self.under = under

    def compose(self) -> ComposeResult:
        t = Table(box=None, padding=(0, 2), title="Keys", title_justify="left")
        t.add_column("key", style="bold cyan", no_wrap=True)
        t.add_column("action")
        t.add_column("binding id (app.toml [keys])", style="dim")
        seen = set()
        for node in (self.under, self.app):
            for b in getattr(node, "BINDINGS", []):
                if not isinstance(b, Binding) or not b.description or b.action in seen:
                    continue
                seen.add(b.action)
                keys = self.app.get_key_display(b)
                # keys come from the user's app.toml: shown as text, never markup
                t.add_row(plain(keys), plain(b.description), plain(b.id or ""))
        t.add_row("ctrl+p", "Command palette", "")
        t.add_row("ctrl+t", "Dark / light theme", "theme")
        with VerticalScroll(id="help-box"):
            yield Static(INTRO)
            yield Static(t)
            yield Static(TREE_HELP)
            yield Static("[dim]Settings: app.toml in the user config dir (~/.config/stargz-tui on Linux); "
                         "$STARGZ_TUI_CONFIG_DIR overrides it.[/dim]", id="help-config")
