"""Layer: the TOC as a lazy tree, a detail pane with chunks, chunk maps.

The tree marks each file with what the optimize loop knows about it (issue
16): ``▓ prefetch`` when its data sits before the layer's
``.prefetch.landmark`` (a mount fetches it first), ``● recorded`` when a
recording mount (``mount --record``) serving this layer has recorded it
being opened. The record files are read again every RECORD_SECONDS while
the screen is open (and on ``R``); a legend line under the chunk legend
says what every mark means.
"""

from __future__ import annotations

import asyncio

from rich.table import Table
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Header, Input, Static, Tree
from textual.widgets.tree import TreeNode

from core import browse

from .. import search
from ..services import is_plain
from ..text import plain, printable
from ..widgets import MARKER_GLYPH, MARKER_STYLE, ChunkMap, KeyBar, legend
from .base import BaseScreen

BATCH = 500          # tree children added per expansion step
MAX_MATCHES = 5000   # search results kept (the tree shows them and their parents)
RECORD_SECONDS = 2.0  # how often the recording mounts' record files are read again
PREFETCH_MARK = "▓ prefetch"
RECORDED_MARK = "● recorded"
# The `t` key's cycle: (what the notification says, the types shown).
TYPE_CYCLE: list[tuple[str, frozenset[str] | None]] = [
    ("all", None), ("files", frozenset({"reg"})), ("dirs", frozenset({"dir"})),
    ("symlinks", frozenset({"symlink"})), ("hardlinks", frozenset({"hardlink"})),
    ("devices and fifos", frozenset({"char", "block", "fifo"})),
]


class More:
    """A placeholder node: select it to load the next batch of a directory."""

    def __init__(self, path: str, offset: int, total: int):
        self.path, self.offset, self.total = path, offset, total


class LayerScreen(BaseScreen):
    BINDINGS = [
        Binding("slash", "search", "Search", id="search", key_display="/"),
        Binding("t", "cycle_type", "Type", id="type_filter"),
        Binding("m", "toggle_merged", "Merged", id="merged"),
        Binding("o", "view", "View", id="view"),
        Binding("x", "extract", "Extract", id="extract"),
        Binding("v", "verify", "Verify", id="verify_layer"),
        Binding("c", "copy_digest", "Copy digest", id="copy_entry"),
        Binding("w", "wasted", "Wasted", id="wasted"),
        Binding("R", "refresh_recording", "Recorded", id="refresh_recording", show=False),
        Binding("right_square_bracket", "next_layer", "Next layer", id="next_layer",
                show=False, key_display="]"),
        Binding("left_square_bracket", "prev_layer", "Prev layer", id="prev_layer",
                show=False, key_display="["),
    ]
    COMMAND_HELP = {
        "search": "Filter the tree: words, globs (*.txt), type:reg|dir|symlink|dev, size>1M",
        "toggle_merged": "Switch between this layer's TOC and the merged image view",
        "view": "Show a text file in place (fetches only its chunks)",
        "extract": "Write the selected file or directory to a local path",
        "verify": "Verify the TOC digest, then every chunk",
        "wasted": "Files of this layer that upper layers replace or remove",
        "refresh_recording": "Read the recording mounts' record files again now "
                             "(they are read every few seconds anyway)",
    }

    def __init__(self, session, n: int):
        super().__init__()
        self.session = session
        self.n = n
        self.view = session.views[n]
        self.index = self.view.index
        self.browser: browse.LayerBrowser | None = None
        self.merged = False
        self.query_text = ""
        self.type_pos = 0
        self.problems: list[str] = []  # partial/unknown search terms, shown in the head
        self.allowed: set[str] | None = None
        self.matches: set[str] = set()
        self.layer_states: list[str] = []
        self.wasted_bytes: int | None = None
        self.wasted_items: list[tuple[str, int]] = []
        self.current: browse.Node | None = None
        self.filled: set = set()  # ids of tree nodes whose children were added
        # layer number -> what recording mounts recorded from it (services.Recording);
        # a layer no recording mount serves is absent
        self.recordings: dict = {}

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="layer-top"):
            yield Static(id="layer-head")
            yield ChunkMap("chunks ", id="layer-map")
            yield Static(id="layer-status")
            yield Static(id="tree-legend")
        with Horizontal(id="layer-body"):
            yield Tree("/", id="toc")
            with Vertical(id="detail"):
                yield VerticalScroll(Static(id="entry-info"), id="entry-scroll")
                yield ChunkMap("file   ", id="entry-map")
                yield DataTable(id="chunks", cursor_type="row", zebra_stripes=True)
        yield Input(placeholder="search: words  *.glob  dir/name  type:reg|dir|symlink|dev  "
                                "size>1M  (all must match; Esc clears)", id="filter")
        yield KeyBar()

    def on_mount(self) -> None:
        d = self.session.image.layers[self.n]
        self.sub_title = printable(f"{self.session.ref_text} · layer {self.n}")
        self.query_one("#filter").display = False
        tree = self.query_one("#toc", Tree)
        tree.show_root = True
        tree.guide_depth = 3
        tree.root.data = browse.Node("", "/", self.n, 0, True)
        ct = self.query_one("#chunks", DataTable)
        ct.add_columns("#", "file offset", "size", "blob range", "state", "digest")
        self.update_head()
        self.query_one("#entry-info", Static).update(Text("Loading the TOC tree…", "dim"))
        self.query_one("#layer-status", Static).update(legend())
        self.update_tree_legend()
        self.prepare()
        self.set_interval(5.0, self.refresh_states)
        self.set_interval(RECORD_SECONDS, self.refresh_recording)
        tree.focus()
        del d

    # -- model -------------------------------------------------------------------------
    @work(exclusive=True, group="prepare")
    async def prepare(self) -> None:
        self.browser = await asyncio.to_thread(self.session.browser, self.n)
        self.reload_tree()
        # Layer-wide work (every chunk's cache state, wasted bytes) runs after
        # the tree is painted: on a 100k-entry layer its threads would hold
        # the GIL while the first frame renders.
        self.call_after_refresh(self._layer_wide)

    def _layer_wide(self) -> None:
        self.refresh_states()
        self.compute_wasted()
        self.refresh_recording()

    # -- recording mounts -------------------------------------------------------------
    @work(exclusive=True, group="recording", thread=True)
    def refresh_recording(self) -> None:
        svc = self.app.services
        try:
            mounts = svc.list_mounts()
        except Exception:  # noqa: BLE001 - a broken mount record must not break the tree
            mounts = []
        got = {}
        for n, d in enumerate(self.session.image.layers):
            rec = svc.recorded_files(mounts, d.digest) if mounts else None
            if rec is not None:
                got[n] = rec
        self.app.call_from_thread(self._set_recordings, got)

    def action_refresh_recording(self) -> None:
        self.refresh_recording()

    def _recorded_keys(self) -> set[tuple[int, str]]:
        return {(n, p) for n, rec in self.recordings.items() for p in rec.order}

    def _set_recordings(self, got: dict) -> None:
        if not self.is_attached:
            return
        before, totals = self._recorded_keys(), self._totals()
        self.recordings = got
        changed = before ^ self._recorded_keys()
        self.update_tree_legend()
        cur = self.current
        if cur is not None and (totals != self._totals() or (cur.layer_no, cur.path) in changed):
            self.show_entry(cur)  # ("opened #k of N": N grows too)
        if not changed or self.browser is None:
            return
        # relabel only the nodes whose mark changed (the tree may hold thousands)
        stack = list(self.query_one("#toc", Tree).root.children)
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            data = node.data
            if isinstance(data, browse.Node) and (data.layer_no, data.path) in changed:
                node.set_label(self.label(data))

    def _totals(self) -> dict[int, int]:
        return {n: len(rec.order) for n, rec in self.recordings.items()}

    def recorded_at(self, node: browse.Node) -> int | None:
        """This file's place in its layer's record (1 = opened first), or None."""
        rec = self.recordings.get(node.layer_no)
        return rec.order.get(node.path) if rec is not None else None

    def update_tree_legend(self) -> None:
        """What the tree's marks mean; the recorded count when this layer is
        served by a recording mount."""
        t = Text()
        if not is_plain(self.view):  # (a plain layer has no landmark and no mount)
            t.append(PREFETCH_MARK, "cyan")
            t.append(": before the landmark  ")
            rec = self.recordings.get(self.n)
            if rec is None:
                t.append(RECORDED_MARK, "dim magenta")
                t.append(": no recording mount  ", "dim")
            else:
                t.append(RECORDED_MARK, "bold magenta")
                t.append(f": {len(rec.order)} opened so far  ")
        for glyph, what in (("+", "added"), ("~", "modified"), ("-", "removed")):
            t.append(glyph, MARKER_STYLE[what])
            t.append(f" {what}  ")
        t.rstrip()
        self.query_one("#tree-legend", Static).update(t)

    @work(exclusive=True, group="wasted", thread=True)
    def compute_wasted(self) -> None:
        total, items = self.browser.wasted()
        self.app.call_from_thread(self._set_wasted, total, items)

    def _set_wasted(self, total, items) -> None:
        self.wasted_bytes, self.wasted_items = total, items
        self.update_head()

    @work(exclusive=True, group="states", thread=True)
    def refresh_states(self) -> None:
        states = self.app.services.chunk_states(self.session, self.n)
        self.app.call_from_thread(self._set_states, states)

    def _set_states(self, states) -> None:
        self.layer_states = states
        self.query_one("#layer-map", ChunkMap).set_states(states)
        self.update_status()
        if self.current is not None:
            self.show_chunks(self.current)

    def update_head(self) -> None:
        v, ix = self.view, self.index
        d = self.session.image.layers[self.n]
        t = Text()
        # the search's state first: it must not be cut off on a narrow screen
        if self.allowed is not None:
            n = len(self.matches)
            more = "+" if n >= MAX_MATCHES else ""
            t.append(f"filter: {n}{more} {'match' if n == 1 else 'matches'}", "bold yellow")
            if self.type_pos:
                t.append(f" ({TYPE_CYCLE[self.type_pos][0]})", "bold yellow")
            t.append(" · ")
        for p in self.problems:
            t.append(printable(p), "bold red")
            t.append(f" ({search.TYPE_HELP})" if "type" in p else "", "red")
            t.append(" · ")
        t.append(f"layer {self.n}/{len(self.session.image.layers) - 1} ", "bold")
        t.append(f"{printable(v.format_label)} ", "cyan")
        t.append(printable(browse.short_digest(d.digest)) + " ")
        if is_plain(v):
            t.append(f"· {v.entries} entries · {browse.human_size(d.size)}")
        else:
            t.append(f"TOC {v.toc_state}",
                     "green" if v.toc_state == browse.TOC_VERIFIED else "yellow")
            t.append(f" · {v.entries} entries · {ix.num_chunks} chunks · "
                     f"{browse.human_size(d.size)}")
        if self.wasted_bytes:
            t.append(f" · wasted {browse.human_size(self.wasted_bytes)}", "red")
        t.append(f" · view: {'merged' if self.merged else 'raw'}", "bold magenta")
        if is_plain(v):
            t.append(" · plain layer: no TOC, not lazily mountable", "yellow")
        self.query_one("#layer-head", Static).update(t)

    def update_status(self) -> None:
        if is_plain(self.view):
            self.query_one("#layer-status", Static).update(Text(
                "plain layer: indexed by streaming the blob; files are read the same way", "dim"))
            return
        t = legend()
        states = self.layer_states
        cached = sum(1 for s in states if s == browse.CHUNK_CACHED)
        failed = sum(1 for s in states if s == browse.CHUNK_FAILED)
        t.append(f"│ cached {cached}/{len(states)}")
        done, total = browse.prefetch_progress(self.index, states)
        if total:
            t.append(f" · prefetch {done}/{total} ({browse.human_size(self.index.prefetch_end)})")
        elif self.index.no_prefetch:
            t.append(" · no prefetch")
        if failed:
            t.append(f" · {failed} failed", "bold red")
        self.query_one("#layer-status", Static).update(t)

    # -- tree ----------------------------------------------------------------------------
    def label(self, node: browse.Node) -> Text:
        e = self.browser.entry(node)
        t = Text(no_wrap=True, overflow="ellipsis")
        mk = node.marker
        t.append(MARKER_GLYPH.get(mk, " ") + " ", MARKER_STYLE.get(mk, ""))
        name = node.name
        if e.is_whiteout:
            t.append(printable(e.whiteout_target), "red strike")
            t.append(" (whiteout)", "red")
            return t
        if e.is_opaque_marker:
            t.append("(opaque directory marker)", "magenta")
            return t
        style = "bold blue" if node.is_dir else {"symlink": "cyan", "hardlink": "cyan",
                                                   "char": "yellow", "block": "yellow",
                                                   "fifo": "yellow"}.get(e.type, "")
        if mk == browse.REMOVED:
            style += " strike"
        if node.path in self.matches:
            style += " reverse"
        t.append(printable(name) + ("/" if node.is_dir else ""), style.strip())
        if e.type == "symlink":
            t.append(f" → {printable(e.link_name)}", "dim cyan")
        elif e.type == "hardlink":
            t.append(f" ⇒ /{printable(e.link_name)}", "dim cyan")
        elif e.type == "reg":
            t.append(f"  {browse.human_size(e.size)}", "dim")
        if self.in_prefetch(node, e):
            t.append(f"  {PREFETCH_MARK}", "cyan")
        if self.recorded_at(node) is not None:
            t.append(f"  {RECORDED_MARK}", "bold magenta")
        if self.merged and node.layer_no != self.n:
            t.append(f"  L{node.layer_no}", "dim italic")
        return t

    def in_prefetch(self, node: browse.Node, e) -> bool:
        """Is this file's data in its layer's prefetch region (the files
        before the ``.prefetch.landmark``, fetched first by a mount)?"""
        if e.type != "reg" or not e.size:
            return False
        ix = self.session.views[node.layer_no].index
        end = ix.prefetch_end
        if not end:
            return False
        chunks = ix.chunks(e)
        return bool(chunks) and chunks[0].offset < end

    def reload_tree(self) -> None:
        tree = self.query_one("#toc", Tree)
        tree.clear()
        self.filled.clear()
        tree.root.data = browse.Node("", "/", self.n, 0, True)
        self.fill(tree.root, 0)
        tree.root.expand()
        if self.allowed is not None:
            self._expand_matches(tree.root)
        self.update_head()
        node = tree.root.children[0] if tree.root.children else None
        if node is not None:
            tree.move_cursor(node)
        # (moving to the line the cursor already was on sends no highlight:
        # show that entry here, so the detail pane never stays stale)
        if node is not None and isinstance(node.data, browse.Node):
            self.current = node.data
            self.show_entry(node.data)
        else:
            self.current = None
            self.query_one("#entry-info", Static).update(
                Text("Nothing matches." if self.allowed is not None else "Empty layer.", "dim"))

    def _expand_matches(self, node: TreeNode, depth: int = 0) -> None:
        """With a filter on, open every directory on the way to a match."""
        for child in node.children:
            data = child.data
            if isinstance(data, browse.Node) and data.is_dir and data.path in self.allowed:
                self.fill(child, 0)
                child.expand()
                if depth < 64:
                    self._expand_matches(child, depth + 1)

    def children_of(self, path: str) -> list[browse.Node]:
        kids = self.browser.children(path, merged=self.merged)
        if self.allowed is not None:
            kids = [k for k in kids if k.path in self.allowed or k.path in self.matches]
        return kids

    def fill(self, node: TreeNode, offset: int) -> None:
        data = node.data
        if offset == 0:
            if node.id in self.filled:
                return
            node.remove_children()
            self.filled.add(node.id)
        kids = self.children_of(data.path)
        for k in kids[offset : offset + BATCH]:
            if k.is_dir:
                node.add(self.label(k), data=k, allow_expand=True)
            else:
                node.add_leaf(self.label(k), data=k)
        rest = len(kids) - offset - BATCH
        if rest > 0:
            node.add_leaf(Text(f"  … {rest} more (Enter to load)", "dim italic"),
                          data=More(data.path, offset + BATCH, len(kids)))

    def on_tree_node_expanded(self, event: Tree.NodeExpanded) -> None:
        if isinstance(event.node.data, browse.Node) and self.browser is not None:
            self.fill(event.node, 0)

    def on_tree_node_selected(self, event: Tree.NodeSelected) -> None:
        data = event.node.data
        if isinstance(data, More):
            parent = event.node.parent
            event.node.remove()
            self.fill(parent, data.offset)

    def on_tree_node_highlighted(self, event: Tree.NodeHighlighted) -> None:
        data = event.node.data
        if isinstance(data, browse.Node) and self.browser is not None:
            self.current = data
            self.show_entry(data)

    # -- detail ------------------------------------------------------------------------
    def show_entry(self, node: browse.Node) -> None:
        e = self.browser.entry(node)
        ix = self.session.views[node.layer_no].index
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        for k, v in browse.entry_details(ix, e):
            grid.add_row(plain(k), plain(v))  # names, links, xattrs: the image's strings
        if node.marker:
            grid.add_row("change", Text(node.marker, MARKER_STYLE[node.marker]))
        if node.layer_no != self.n:
            grid.add_row("from", plain(f"layer {node.layer_no}"))
        if self.in_prefetch(node, e):
            grid.add_row("prefetch", Text("yes: before the prefetch landmark", "cyan"))
        k = self.recorded_at(node)
        if k is not None:
            rec = self.recordings[node.layer_no]
            grid.add_row("recorded", Text(f"yes: opened #{k} of {len(rec.order)} on a recording "
                                          "mount", "magenta"))
            grid.add_row("record", plain(", ".join(rec.sources)))
        self.query_one("#entry-info", Static).update(grid)
        self.show_chunks(node)

    def show_chunks(self, node: browse.Node) -> None:
        view = self.session.views[node.layer_no]
        ix = view.index
        e = ix.entry(node.entry_id)
        chunks = ix.chunks(e)
        states = self.app.services.chunk_states(self.session, node.layer_no, chunks)
        self.query_one("#entry-map", ChunkMap).set_states(states)
        ct = self.query_one("#chunks", DataTable)
        ct.clear()
        style = {browse.CHUNK_FAILED: "bold red", browse.CHUNK_CACHED: "green",
                 browse.CHUNK_PREFETCH: "cyan", browse.CHUNK_MISSING: "dim"}
        for i, (c, s) in enumerate(zip(chunks[:2000], states, strict=False)):
            ct.add_row(str(i), str(c.chunk_offset), browse.human_size(c.chunk_size),
                       f"{c.offset}-{c.end}", Text(s, style[s]),
                       plain(browse.short_digest(c.digest, 10)))

    # -- search ------------------------------------------------------------------------
    def action_search(self) -> None:
        f = self.query_one("#filter", Input)
        f.display = True
        f.focus()

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        self.query_text = event.value
        self.run_search()

    @on(Input.Submitted, "#filter")
    def filter_submitted(self, event: Input.Submitted) -> None:
        self.query_one("#toc", Tree).focus()

    def action_cycle_type(self) -> None:
        self.type_pos = (self.type_pos + 1) % len(TYPE_CYCLE)
        self.notify(f"Showing {TYPE_CYCLE[self.type_pos][0]}.", timeout=2)
        self.run_search(debounce=False)

    @work(exclusive=True, group="search")
    async def run_search(self, debounce: bool = True) -> None:
        if debounce:
            await asyncio.sleep(0.15)  # typing: search once it pauses
        if self.browser is None:
            return
        query = search.parse_query(self.query_text).with_types(TYPE_CYCLE[self.type_pos][1])
        self.problems = query.problems
        if query.empty:
            self.allowed = None
            self.matches = set()
        else:
            paths = await asyncio.to_thread(search.find, self.browser, query,
                                            merged=self.merged, limit=MAX_MATCHES)
            self.matches = set(paths)
            self.allowed = browse.ancestors_of(paths)
        if self.is_attached:  # (the screen may have gone while the thread ran)
            self.reload_tree()

    def clear_filter(self) -> bool:
        f = self.query_one("#filter", Input)
        if self.allowed is None and not f.display:
            return False
        with f.prevent(Input.Changed):  # (no search for the emptied input)
            f.value = ""
        f.display = False
        self.type_pos = 0
        self.problems = []
        self.query_text = ""
        self.allowed, self.matches = None, set()
        self.reload_tree()
        self.query_one("#toc", Tree).focus()
        return True

    def action_back(self) -> None:
        if any(w.is_running and w.group == "task" for w in self.workers):
            super().action_back()
            return
        if self.clear_filter():
            return
        super().action_back()

    # -- actions -------------------------------------------------------------------------
    def action_toggle_merged(self) -> None:
        if self.browser is None:
            return
        if not self.browser.can_merge:
            self.notify("The merged view needs every lower layer's TOC.", severity="warning")
            return
        self.merged = not self.merged
        if self.allowed is not None:
            self.run_search(debounce=False)  # the merged view has other paths
        else:
            self.reload_tree()

    def _entry(self):
        if self.current is None or self.browser is None:
            return None, None
        return self.current, self.browser.entry(self.current)

    def action_view(self) -> None:
        node, e = self._entry()
        if e is None:
            return
        if e.type not in ("reg", "hardlink"):
            self.notify(printable(f"/{e.path} is a {e.type}; only files can be viewed."),
                        severity="warning", markup=False)
            return
        from .modals import FileViewer

        self.app.push_screen(FileViewer(self.session, node))

    def action_extract(self) -> None:
        node, e = self._entry()
        if e is None:
            return
        if is_plain(self.session.views[node.layer_no]):
            self.notify("Extracting from a plain layer is not supported in the app: "
                        "use `stargz-tui cat IMAGE --layer N PATH`.", severity="warning",
                        timeout=8, markup=False)
            return
        from .modals import ExtractScreen

        self.app.push_screen(ExtractScreen(self.session, node))

    def action_verify(self) -> None:
        from .modals import VerifyScreen

        self.app.push_screen(VerifyScreen(self.session, self.n), lambda _r: self.refresh_states())

    def action_copy_digest(self) -> None:
        node, e = self._entry()
        digest = (e.digest if e is not None else None) or self.session.image.layers[self.n].digest
        self.app.copy_to_clipboard(digest)
        self.notify(printable(f"Copied {browse.short_digest(digest)}."), markup=False)

    def action_wasted(self) -> None:
        from .modals import TextModal

        if self.wasted_bytes is None:
            self.notify("Still computing wasted bytes.")
            return
        t = Table(box=None, padding=(0, 1), expand=True)
        t.add_column("size", justify="right", style="red")
        t.add_column("path")
        for p, s in self.wasted_items[:500]:
            t.add_row(browse.human_size(s), plain("/" + p))
        title = (f"Layer {self.n} wastes {browse.human_size(self.wasted_bytes)} on "
                 f"{len(self.wasted_items)} files that upper layers replace or remove")
        if not self.wasted_items:
            title = f"Layer {self.n} wastes nothing: no upper layer replaces its files"
        self.app.push_screen(TextModal(title, t))

    def _switch(self, step: int) -> None:
        k = self.n + step
        views = self.session.views
        if 0 <= k < len(views) and views[k] is not None and views[k].index is not None:
            self.app.switch_screen(LayerScreen(self.session, k))

    def action_next_layer(self) -> None:
        self._switch(1)

    def action_prev_layer(self) -> None:
        self._switch(-1)
