"""Repositories and tags of a registry (or of an OCI layout)."""

from __future__ import annotations

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Header, Input, Label, LoadingIndicator, OptionList
from textual.widgets.option_list import Option

from ..text import plain, printable
from ..widgets import KeyBar
from .base import BaseScreen

MORE = "__more__"


class ReposScreen(BaseScreen):
    BINDINGS = [
        Binding("slash", "filter", "Filter", id="filter_repos", key_display="/"),
        Binding("r", "reload", "Reload", id="reload_repos"),
    ]

    def __init__(self, registry: str):
        super().__init__()
        self.registry = registry
        self.repos: list[str] = []
        self.repos_more = False
        self.tags: list[str] = []
        self.tags_more = False
        self.repo: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Input(placeholder="filter repositories and tags", id="repo-filter")
        with Horizontal(id="repos-body"):
            with Vertical(id="repos-pane"):
                yield Label("[b]Repositories[/b]", id="repos-label")
                yield OptionList(id="repos")
                yield LoadingIndicator(id="repos-loading")
            with Vertical(id="tags-pane"):
                yield Label("[b]Tags[/b]", id="tags-label")
                yield OptionList(id="tags")
                yield LoadingIndicator(id="tags-loading")
        yield KeyBar()

    def on_mount(self) -> None:
        self.sub_title = printable(self.registry)
        self.query_one("#tags-loading").display = False
        self.load_repos()
        self.query_one("#repos", OptionList).focus()

    # -- loading ------------------------------------------------------------------------
    @work(exclusive=True, group="repos")
    async def load_repos(self, more: bool = False) -> None:
        self.query_one("#repos-loading").display = True
        try:
            names, has_more = await self.services.list_repositories(
                self.registry, last=self.repos[-1] if more and self.repos else None)
        except Exception as e:  # noqa: BLE001 - one sentence
            self.fail(e)
            names, has_more = [], False
        finally:
            self.query_one("#repos-loading").display = False
        self.repos = (self.repos if more else []) + list(names)
        self.repos_more = has_more
        self.show_repos()
        if len(self.repos) == 1 and not more:
            self.select_repo(self.repos[0])

    @work(exclusive=True, group="tags")
    async def load_tags(self, more: bool = False) -> None:
        self.query_one("#tags-loading").display = True
        try:
            names, has_more = await self.services.list_tags(
                self.services.repo_ref(self.registry, self.repo), last=self.tags[-1] if more and self.tags else None)
        except Exception as e:  # noqa: BLE001 - one sentence
            self.fail(e)
            names, has_more = [], False
        finally:
            self.query_one("#tags-loading").display = False
        self.tags = (self.tags if more else []) + list(names)
        self.tags_more = has_more
        self.show_tags()

    def _filter(self) -> str:
        return self.query_one("#repo-filter", Input).value.strip().lower()

    def show_repos(self) -> None:
        ol = self.query_one("#repos", OptionList)
        keep = ol.highlighted
        ol.clear_options()
        f = self._filter()
        shown = [r for r in self.repos if f in r.lower()]
        ol.add_options([Option(plain(r), id=f"r:{r}") for r in shown])
        if self.repos_more:
            ol.add_option(Option("[dim italic]… load more[/]", id=MORE))
        label = Text("Repositories ", "bold")
        label.append(f"{len(shown)}/{len(self.repos)}{'+' if self.repos_more else ''}", "dim")
        self.query_one("#repos-label", Label).update(label)
        if keep is not None and keep < ol.option_count:
            ol.highlighted = keep
        elif shown:
            ol.highlighted = 0  # show the first repository's tags right away

    def show_tags(self) -> None:
        ol = self.query_one("#tags", OptionList)
        ol.clear_options()
        f = self._filter()
        shown = sorted(t for t in self.tags if f in t.lower()) if self.repo else []
        ol.add_options([Option(plain(t), id=f"t:{t}") for t in shown])
        if self.tags_more:
            ol.add_option(Option("[dim italic]… load more[/]", id=MORE))
        if ol.option_count:
            ol.highlighted = 0  # a cursor to show where Enter goes
        label = Text("Tags ", "bold")
        label.append_text(plain(f"{self.repo or ''} {len(shown)}/{len(self.tags)}"
                                f"{'+' if self.tags_more else ''}", "dim"))
        self.query_one("#tags-label", Label).update(label)

    def select_repo(self, repo: str) -> None:
        if repo == self.repo:
            return
        self.repo = repo
        self.tags = []
        self.load_tags()

    # -- events ---------------------------------------------------------------------------
    @on(Input.Changed, "#repo-filter")
    def filter_changed(self) -> None:
        self.show_repos()
        self.show_tags()

    @on(Input.Submitted, "#repo-filter")
    def filter_done(self) -> None:
        self.query_one("#repos", OptionList).focus()

    @on(OptionList.OptionHighlighted, "#repos")
    def repo_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        oid = event.option.id or ""
        if oid.startswith("r:"):
            self.select_repo(oid[2:])

    @on(OptionList.OptionSelected, "#repos")
    def repo_selected(self, event: OptionList.OptionSelected) -> None:
        oid = event.option.id or ""
        if oid == MORE:
            self.load_repos(more=True)
        elif oid.startswith("r:"):
            self.select_repo(oid[2:])
            self.query_one("#tags", OptionList).focus()

    @on(OptionList.OptionSelected, "#tags")
    def tag_selected(self, event: OptionList.OptionSelected) -> None:
        oid = event.option.id or ""
        if oid == MORE:
            self.load_tags(more=True)
        elif oid.startswith("t:") and self.repo:
            from .image import ImageScreen

            repo = self.services.repo_ref(self.registry, self.repo)
            self.app.push_screen(ImageScreen(self.services.image_ref(repo, oid[2:])))

    def action_filter(self) -> None:
        self.query_one("#repo-filter", Input).focus()

    def action_reload(self) -> None:
        self.repo = None
        self.load_repos()
