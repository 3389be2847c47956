"""Small widgets shared by the screens."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Footer
from textual.widgets._footer import FooterKey

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


class AppFooter(Footer):
    """Textual's footer, cheaper to (re)build: the same keys and looks.

    Textual rebuilds the footer on every bindings signal (focus moves, screen
    pushes) even when the keys it shows did not change, and every key it
    builds toggles its ``-compact`` class twice (its own default, then the
    footer's value), each a style update of the key. Here a key starts with
    the footer's value, and the footer is rebuilt only when what it shows
    changes.
    """

    _shown: tuple | None = None

    def compose(self):
        compact = self.compact
        for w in super().compose():
            # (the command palette's key is not bound to the footer's value)
            if isinstance(w, FooterKey) and not w.has_class("-command-palette"):
                w.set_reactive(FooterKey.compact, compact)
                w.set_class(compact, "-compact", update=False)
            yield w

    def _signature(self, screen) -> tuple:
        return tuple((b.key, b.description, enabled, tooltip, b.action)
                     for (_, b, enabled, tooltip) in screen.active_bindings.values() if b.show)

    def bindings_changed(self, screen) -> None:
        if self.is_attached and screen is self.screen and screen.app.app_focus:
            shown = self._signature(screen)
            if self._bindings_ready and shown == self._shown:
                return
            self._shown = shown
        super().bindings_changed(screen)
