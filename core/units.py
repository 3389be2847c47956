"""Human-readable sizes and counts, shared by the CLI and the app, and the
size syntax users type (``4G``). Standard library only."""

from __future__ import annotations

import re


def parse_size(text: str | int | None) -> int | None:
    """``"4G"``, ``"512MiB"``, ``"1000000"`` -> bytes (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)(i?b?)", s)
    if not m:
        raise ValueError(f"invalid size {text!r} (use e.g. 512M, 4G, 1000000)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * mult)


def human_size(n: int | None) -> str:
    """``1536`` -> ``1.5 KiB``; None -> ``-``."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1, "layer"`` -> ``1 layer``; ``0, "match", "matches"`` -> ``0 matches``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"
