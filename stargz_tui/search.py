"""The layer screen's search language, and the search itself.

``parse_query(text)`` never raises: every term is a word, a glob, a ``type:``
or a ``size`` term; a term that is partial or unknown (``type:``,
``type:bogus``, ``size>``, ``size>12Q``) is kept in ``Query.problems`` (one short
phrase each, for the screen to show; ``TYPE_HELP`` lists the types) and
ignored for matching.

Terms (all of them must match — they are ANDed):

- ``word``: a case-insensitive substring of the path (``/etc/os-release``),
  so ``a01/b02`` finds that directory and everything under it;
- a glob (a term with ``*``, ``?`` or ``[...]``): ``*.txt``, ``f0[0-3]``
  match the name; a glob with ``/`` (``usr/*/mod_*``) matches the path's
  last components (a leading ``/`` anchors it at the root);
- ``type:T[,T...]`` (``t:`` too): ``reg``/``file``/``f``, ``dir``/``d``,
  ``symlink``/``link``/``l``, ``hardlink``/``h``, ``char``, ``block``,
  ``fifo``, ``dev`` (char, block and fifo);
- ``size>N``, ``size<N`` (also ``>N``, ``<N``, ``>=``, ``<=``): N in bytes
  or with ``K``, ``M``, ``G`` (``1.5M``, ``10KiB``).

``find(browser, query, merged=...)`` walks the raw layer (its TOC) or the
merged view (removed files included) and returns matching paths.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

TYPE_ALIASES: dict[str, frozenset[str]] = {
    "reg": frozenset({"reg"}), "file": frozenset({"reg"}), "f": frozenset({"reg"}),
    "dir": frozenset({"dir"}), "d": frozenset({"dir"}),
    "symlink": frozenset({"symlink"}), "link": frozenset({"symlink"}),
    "l": frozenset({"symlink"}),
    "hardlink": frozenset({"hardlink"}), "h": frozenset({"hardlink"}),
    "char": frozenset({"char"}), "block": frozenset({"block"}), "fifo": frozenset({"fifo"}),
    "dev": frozenset({"char", "block", "fifo"}),
}
TYPE_HELP = "reg, dir, symlink, hardlink, dev, char, block, fifo"
_GLOB_CHARS = re.compile(r"[*?\[]")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$")
_SIZE_TERM = re.compile(r"^(?:size)?(>=|<=|>|<)(.*)$")
_MULT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int | None:
    """``1M`` -> 1048576; None when it is no size."""
    m = _SIZE.match(text.strip().lower())
    if not m:
        return None
    return int(float(m.group(1)) * _MULT[m.group(2)])


@dataclass
class Query:
    words: list[str] = field(default_factory=list)          # lower-case substrings
    names: list[str] = field(default_factory=list)          # globs on the name
    paths: list[re.Pattern] = field(default_factory=list)   # globs on the path's end
    types: frozenset[str] | None = None
    min_size: int = 0
    max_size: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Nothing to filter on (problems alone filter nothing)."""
        return not (self.words or self.names or self.paths or self.types
                    or self.min_size or self.max_size is not None)

    def with_types(self, types: frozenset[str] | None) -> Query:
        """This query, with ``types`` when it names none itself (the ``t`` key)."""
        if self.types is not None or not types:
            return self
        q = Query(**{**self.__dict__})
        q.types = types
        return q

    def matches(self, path: str, name: str, type_: str, size: int) -> bool:
        if self.types is not None and type_ not in self.types:
            return False
        if size < self.min_size or (self.max_size is not None and size > self.max_size):
            return False
        low = "/" + path.lower()
        if any(w not in low for w in self.words):
            return False
        lname = name.lower()
        if any(not fnmatch.fnmatchcase(lname, g) for g in self.names):
            return False
        return all(p.search(low) for p in self.paths)


def _path_glob(term: str) -> re.Pattern:
    """A glob with '/' matching the end of a path at a component boundary."""
    anchored = term.startswith("/")
    body = fnmatch.translate(term.strip("/"))  # '(?s:...)\\Z'
    body = body.replace(".*", "[^/]*")         # '*' stays inside one component
    prefix = "^/" if anchored else "/"
    return re.compile(prefix + body)


def parse_query(text: str) -> Query:
    q = Query()
    types: set[str] | None = None
    for tok in text.split():
        low = tok.lower()
        if low.startswith(("type:", "t:")):
            value = low.split(":", 1)[1]
            if not value:
                q.problems.append(f"{tok} needs a type")
                continue
            want: set[str] = set()
            for part in value.split(","):
                kinds = TYPE_ALIASES.get(part)
                if kinds is None:
                    q.problems.append(f"unknown type {part!r}")
                    want = set()
                    break
                want |= kinds
            if want:
                types = want if types is None else types & want
            continue
        m = _SIZE_TERM.match(low)
        if m and (low.startswith("size") or m.group(2)):
            op, value = m.groups()
            n = parse_size(value) if value else None
            if n is None:
                q.problems.append(f"{tok} needs a size (1.5M)")
                continue
            if op == ">":
                q.min_size = max(q.min_size, n + 1)
            elif op == ">=":
                q.min_size = max(q.min_size, n)
            elif op == "<":
                q.max_size = n - 1 if q.max_size is None else min(q.max_size, n - 1)
            else:
                q.max_size = n if q.max_size is None else min(q.max_size, n)
            continue
        if low.startswith("size") and low[4:5] in ("", ":", "="):
            q.problems.append(f"{tok}: write size>N or size<N")
            continue
        if _GLOB_CHARS.search(low):
            if "/" in low:
                q.paths.append(_path_glob(low))
            else:
                q.names.append(low)
        else:
            q.words.append(low)
    if types is not None:
        q.types = frozenset(types)
    return q


def find(browser, query: Query, *, merged: bool = False, limit: int = 5000) -> list[str]:
    """Paths matching ``query`` in the raw layer or the merged view (depth
    first, names sorted), at most ``limit``. Blocking: run it in a thread."""
    out: list[str] = []
    if merged and browser.can_merge:
        stack = [""]
        while stack and len(out) < limit:
            base = stack.pop()
            kids = browser.children(base, merged=True)
            for node in kids:
                e = browser.entry(node)
                if query.matches(node.path, node.name, e.type, e.size):
                    out.append(node.path)
                    if len(out) >= limit:
                        break
            stack.extend(n.path for n in reversed(kids) if n.is_dir)
        return out
    ix = browser.index
    estack = [("", ix.root)]
    while estack and len(out) < limit:
        base, d = estack.pop()
        kids = ix.children(d)
        dirs = []
        for e in kids:
            name = e.name
            path = f"{base}/{name}" if base else name
            type_ = e.type
            if query.matches(path, name, type_, e.size):
                out.append(path)
                if len(out) >= limit:
                    break
            if type_ == "dir":
                dirs.append((path, e))
        estack.extend(reversed(dirs))
    return out
