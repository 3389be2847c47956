"""Safe display of strings that come from images, registries or the user.

Contract: every string the app did not write itself (file names, link
targets, xattrs, config fields, history, tags, repository names, references,
mountpoints, error messages quoting any of them) reaches the screen through
:func:`plain` (a ``rich.text.Text``, never parsed as markup) with its control
characters escaped by :func:`printable`, so ``[/]`` shows as ``[/]`` and an
ESC or OSC sequence cannot reach the terminal. Markup is only for the app's
own constant strings.
"""

from __future__ import annotations

import re

from rich.text import Text

# C0 controls, DEL and C1 controls: each would move the cursor, end a line,
# or start an escape sequence if written to the terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}


def _escape(m: re.Match) -> str:
    c = m.group()
    return _NAMED.get(c) or f"\\x{ord(c):02x}"


def printable(value: object) -> str:
    """``value`` as one printable line: control characters become visible
    escapes (``\\n``, ``\\e``, ``\\x07``)."""
    return _CONTROL.sub(_escape, str(value))


_CONTROL_BUT_LAYOUT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable_text(value: str) -> str:
    """A file's text for a viewer: lines and tabs kept, every other control
    character (ESC starting a terminal sequence, CR, BEL, ...) made visible."""
    return _CONTROL_BUT_LAYOUT.sub(_escape, value)


def plain(value: object, style: str = "") -> Text:
    """A Text showing ``value`` literally (no markup), one printable line."""
    return Text(printable(value), style=style)


def multiline(value: object, style: str = "") -> Text:
    """Like :func:`plain`, but keeps line breaks (for JSON and long text)."""
    return Text("\n".join(printable(line) for line in str(value).split("\n")), style=style)
