"""Strings from images and registries made safe to print on a terminal.

A file name, config field, tag, repository name or error message that holds
ESC, OSC, CR, LF or any other control character would, printed raw, move the
cursor, set the terminal's title or fake a line of output (a newline in a
name looks like a second entry). :func:`safe` is the one function human
output uses for such data: it returns the text with every character that is
not printable written as a visible escape, Python style (``\\x1b``, ``\\n``,
``\\r``, ``\\t``, ``\\x7f``, ``\\u202e``); a backslash is doubled, so the escaped
form is never ambiguous (``a\\\\nb`` is the name with a backslash, ``a\\nb`` the
one with a newline). A byte that was not UTF-8 (kept as a lone surrogate by
``surrogateescape``) is shown as ``\\xNN``. Printable text, spaces included,
is returned unchanged. JSON output never goes through it: it stays exact.
"""

from __future__ import annotations

import re

# What can need escaping in ASCII text: C0 controls, backslash, DEL.
_ASCII_SPECIAL = re.compile(r"[\x00-\x1f\\\x7f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    if ch == " " or ch.isprintable():
        return ch
    n = ord(ch)
    if 0xDC80 <= n <= 0xDCFF:  # surrogateescape'd byte
        return f"\\x{n - 0xDC00:02x}"
    if n < 0x100:
        return f"\\x{n:02x}"
    if n < 0x10000:
        return f"\\u{n:04x}"
    return f"\\U{n:08x}"


def safe(text: object) -> str:
    """``text`` (``str()`` of it) with control and other non-printable
    characters as visible escapes; see the module docs."""
    s = text if isinstance(text, str) else str(text)
    if s.isascii() and _ASCII_SPECIAL.search(s) is None:
        return s
    return "".join(map(_escape, s))


def safe_text(text: str) -> str:
    """A file's text for a viewer: line breaks, tabs and backslashes kept as
    they are, every other non-printable character (ESC starting a terminal
    sequence, CR, BEL, bidi overrides...) written as a visible escape."""
    if text.isascii() and _ASCII_SPECIAL.search(text.replace("\\", "")) is None:
        return text
    return "".join(c if c in "\n\t\\" else _escape(c) for c in text)
