"""Help: every key of the screen underneath, and how to change them."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
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
Search with [b]/[/b]: every term must match — words (in the path), globs ([b]*.txt[/b], [b]f0\\[0-3][/b], [b]usr/*/lib[/b]),
[b]type:reg|dir|symlink|hardlink|dev[/b], [b]size>1M[/b] / [b]size<10K[/b]; [b]t[/b] cycles a type filter. The merged view ([b]m[/b]) searches the merged image.
Chunk map: [green]█[/] cached  [cyan]▓[/] prefetch region  [grey50]░[/] not cached  [bold red]█[/] failed verification.
"""


def help_rows(app, screen) -> list[tuple[str, str, str]]:
    """``(keys, description, binding id)`` for each action of ``screen`` and
    the app, once each, with the keys as bound now (``[keys]`` remaps
    included): read from the screen's live bindings, not the class lists."""
    rows: dict[str, list] = {}
    nodes = {id(screen), id(app)}
    for node, b, _enabled, _tip in screen.active_bindings.values():
        if id(node) not in nodes or not b.description:
            continue
        key = app.get_key_display(b)
        row = rows.setdefault(b.action, [[], b.description, b.id or ""])
        if key not in row[0]:
            row[0].append(key)
        row[2] = row[2] or b.id or ""
    palette = rows.setdefault("command_palette", [["^p"], "", ""])
    palette[1] = "Command palette"
    return [(", ".join(k), d, i) for k, d, i in rows.values()]


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def __init__(self, under):
        super().__init__()
        self.under = under

    def compose(self) -> ComposeResult:
        t = Table(box=None, padding=(0, 2), title="Keys", title_justify="left")
        t.add_column("key", style="bold cyan", no_wrap=True)
        t.add_column("action")
        t.add_column(Text("binding id (app.toml [keys])"), style="dim")
        for keys, desc, bid in help_rows(self.app, self.under):
            # keys come from the user's app.toml: shown as text, never markup
            t.add_row(plain(keys), plain(desc), plain(bid))
        with VerticalScroll(id="help-box"):
            yield Static(INTRO)
            yield Static(t)
            yield Static(TREE_HELP)
            yield Static("[dim]Settings: app.toml in the user config dir (~/.config/stargz-tui on Linux); "
                         "$STARGZ_TUI_CONFIG_DIR overrides it.[/dim]", id="help-config")
