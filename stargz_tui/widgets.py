"""Small widgets shared by the screens."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from core.browse import CHUNK_CACHED, CHUNK_FAILED, CHUNK_MISSING, CHUNK_PREFETCH, chunk_map

# state -> (glyph, style)
CHUNK_GLYPHS = {
    CHUNK_CACHED: ("█", "green"),
    CHUNK_PREFETCH: ("▓", "cyan"),
    CHUNK_MISSING: ("░", "grey50"),
    CHUNK_FAILED: ("█", "bold red"),
}
MARKER_STYLE = {"added": "green", "modified": "yellow", "removed": "red strike"}
MARKER_GLYPH = {"added": "+", "modified": "~", "removed": "-"}


def legend() -> Text:
    t = Text()
    for state, label in ((CHUNK_CACHED, "cached"), (CHUNK_PREFETCH, "prefetch"),
                         (CHUNK_MISSING, "not cached"), (CHUNK_FAILED, "failed")):
        g, style = CHUNK_GLYPHS[state]
        t.append(g, style)
        t.append(f" {label}  ")
    return t


class ChunkMap(Widget):
    """A one-line bar of chunk states, bucketed to the widget's width."""

    DEFAULT_CSS = """
    ChunkMap { height: 1; }
    """

    states: reactive[tuple[str, ...]] = reactive((), layout=False)

    def __init__(self, label: str = "", **kw):
        super().__init__(**kw)
        self.label = label

    def set_states(self, states) -> None:
        self.states = tuple(states)

    def render(self) -> Text:
        t = Text(no_wrap=True, overflow="crop")
        if self.label:
            t.append(self.label, "bold")
        width = max(1, self.size.width - len(self.label))
        if not self.states:
            t.append("no chunks", "dim")
            return t
        for s in chunk_map(list(self.states), width):
            g, style = CHUNK_GLYPHS[s]
            t.append(g, style)
        return t


class KeyBar(Widget):
    """The footer: the screen's keys on one line, cut to fit the width.

    Built from public APIs only (``Screen.active_bindings`` and its
    ``bindings_updated_signal``). Each action shows once (its first key, as
    remapped by ``[keys]`` in app.toml); when the line is too narrow the last
    keys are dropped, never ``? Help``, which lists them all.
    """

    DEFAULT_CSS = """
    KeyBar {
        dock: bottom; height: 1; background: $footer-background;
        color: $footer-description-foreground;
    }
    KeyBar > .keybar--key { color: $footer-key-foreground; text-style: bold; }
    KeyBar > .keybar--disabled { color: $text-disabled; }
    """
    COMPONENT_CLASSES = {"keybar--key", "keybar--disabled"}

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)

    def _bindings_changed(self, _screen) -> None:
        self.refresh()

    def keys(self) -> list[tuple[str, str, bool]]:
        """``(key, description, enabled)`` of each action shown, in order."""
        out: dict[str, tuple[str, str, bool]] = {}
        for _node, b, enabled, _tip in self.screen.active_bindings.values():
            if not b.show or not b.description:
                continue
            action = b.action
            if action not in out:
                out[action] = (self.app.get_key_display(b), b.description, enabled)
        help_key = [v for a, v in out.items() if a == "app.help" or a == "help"]
        rest = [v for a, v in out.items() if a not in ("app.help", "help")]
        return rest + help_key

    def render(self) -> Text:
        key_style = self.get_component_rich_style("keybar--key")
        off_style = self.get_component_rich_style("keybar--disabled")
        items = self.keys()
        width = self.size.width
        parts = [(f" {k} ", f"{d} ", on) for k, d, on in items]
        # drop keys before the last (help) until the line fits
        while len(parts) > 1 and sum(len(a) + len(b) for a, b, _ in parts) > width:
            del parts[-2]
        t = Text(no_wrap=True, overflow="crop")
        for key, desc, on in parts:
            t.append(key, key_style if on else off_style)
            t.append(desc, None if on else off_style)
        return t


def set_table_columns(table, cols) -> bool:
    """Give ``table`` the columns ``cols`` (``(label, key)`` pairs) unless it
    has them already; True when they changed (and the table was emptied)."""
    if [str(c.label) for c in table.columns.values()] == [label for label, _ in cols]:
        return False
    table.clear(columns=True)
    for label, key in cols:
        table.add_column(label, key=key)
    return True
