"""The app's exit status: an uncaught exception in the app must not end
``stargz-tui tui`` with status 0 (issue 18/19: a crash used to look like a
normal quit)."""

from __future__ import annotations

from app_support import app_env  # noqa: F401 - fixture
from textual.app import App

from stargz_tui.app import StargzApp
from stargz_tui.commands.app import run_app


class _RaisingInHandler(StargzApp):
    """The real app, whose key handler raises (what an unexpected bug does)."""

    def on_mount(self) -> None:
        super().on_mount()
        self.call_after_refresh(self.simulate_key, "f9")

    def on_key(self, event) -> None:
        if event.key == "f9":
            raise RuntimeError("a bug in a handler")


class _Quits(App):
    def on_mount(self) -> None:
        self.call_after_refresh(self.exit)


def test_uncaught_exception_exits_non_zero(app_env, capsys):  # noqa: F811
    assert run_app(_RaisingInHandler(), headless=True) == 1
    # Textual reports the exception on the way out
    assert "a bug in a handler" in capsys.readouterr().err


def test_a_normal_quit_exits_zero(app_env):  # noqa: F811
    assert run_app(_Quits(), headless=True) == 0
