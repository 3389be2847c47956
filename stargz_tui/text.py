"""Safe display of strings that come from images, registries or the user.

Contract: every string the app did not write itself (file names, link
targets, xattrs, config fields, history, tags, repository names, references,
mountpoints, error messages quoting any of them) reaches the screen through
:func:`plain` (a ``rich.text.Text``, never parsed as markup) with its control
characters escaped by :func:`printable` (``stargz_tui.textsafe.safe``,
the one escaping the CLI uses too), so ``[/]`` shows as ``[/]`` and an
ESC or OSC sequence cannot reach the terminal. Markup is only for the app's
own constant strings.
"""

from __future__ import annotations

from rich.text import Text

from .textsafe import safe as printable
from .textsafe import safe_text as printable_text

__all__ = ["multiline", "plain", "printable", "printable_text"]


def plain(value: object, style: str = "") -> Text:
    """A Text showing ``value`` literally (no markup), one printable line."""
    return Text(printable(value), style=style)


def multiline(value: object, style: str = "") -> Text:
    """Like :func:`plain`, but keeps line breaks (for JSON and long text)."""
    return Text("\n".join(printable(line) for line in str(value).split("\n")), style=style)
