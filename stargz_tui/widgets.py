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
