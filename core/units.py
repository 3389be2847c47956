"""Human-readable sizes and counts, shared by the CLI and the app."""

from __future__ import annotations


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
