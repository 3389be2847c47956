"""The merged view of an image's layers, as overlayfs would show it.

Layers are given bottom first. A name in an upper layer hides the same name
below; ``.wh.NAME`` hides NAME in lower layers; a directory holding
``.wh..wh..opq`` hides everything lower layers have under it; a non-directory
hides whatever lower layers have beneath its path. Whiteouts apply to lower
layers only, never to entries of their own layer.
"""

from __future__ import annotations

from collections.abc import Iterator

from .estargz.toc import DIR, WHITEOUT_OPAQUE, WHITEOUT_PREFIX, Entry, LayerIndex


class MergedTree:
    def __init__(self, layers: list[LayerIndex]):
        self.layers = layers

    def _descend(self, ix: LayerIndex, parts: list[str]):
        """Walk ``parts`` in one layer. Returns ``(entry_or_None, hides_lower)``:
        the entry at the path in this layer, and whether this layer hides the
        path in all layers below it."""
        cur = 0
        opaque = False
        for k, part in enumerate(parts):
            e = ix.child(cur, part)
            last = k == len(parts) - 1
            if e is None:
                if ix.child(cur, WHITEOUT_PREFIX + part) is not None:
                    return None, True
                return None, opaque
            if last:
                return e, True
            if e.type_code != DIR:
                return None, True
            cur = e.id
            if ix.child(cur, WHITEOUT_OPAQUE) is not None:
                opaque = True
        return ix.root, False

    def lookup(self, path: str) -> tuple[int, Entry] | None:
        """The layer number and entry that ``path`` shows in the merged view."""
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if not parts:
            return (len(self.layers) - 1, self.layers[-1].root) if self.layers else None
        for i in range(len(self.layers) - 1, -1, -1):
            e, hides = self._descend(self.layers[i], parts)
            if e is not None:
                return i, e
            if hides:
                return None
        return None

    def children(self, path: str = "") -> list[tuple[str, int, Entry]]:
        """``(name, layer_no, entry)`` of a merged directory, sorted by name."""
        parts = [p for p in path.split("/") if p not in ("", ".")]
        result: dict[str, tuple[int, Entry]] = {}
        hidden: set[str] = set()
        for i in range(len(self.layers) - 1, -1, -1):
            ix = self.layers[i]
            d, hides = self._descend(ix, parts) if parts else (ix.root, False)
            if d is not None:
                if d.type_code != DIR:
                    break
                layer_wh = []
                opaque = False
                for c in ix.children(d):
                    name = c.name
                    if name == WHITEOUT_OPAQUE:
                        opaque = True
                    elif name.startswith(WHITEOUT_PREFIX):
                        layer_wh.append(name[len(WHITEOUT_PREFIX):])
                    elif name not in result and name not in hidden:
                        result[name] = (i, c)
                hidden.update(layer_wh)
                if opaque:
                    break
            elif hides:
                break
        return [(n, li, e) for n, (li, e) in sorted(result.items())]

    def walk(self, path: str = "") -> Iterator[tuple[str, int, Entry]]:
        """Every merged entry below ``path`` (depth first, names sorted)."""
        stack = [path.strip("/")]
        while stack:
            base = stack.pop()
            kids = self.children(base)
            for name, li, e in kids:
                p = f"{base}/{name}" if base else name
                yield p, li, e
            for name, _li, e in reversed(kids):
                if e.type_code == DIR:
                    stack.append(f"{base}/{name}" if base else name)


def layer_status(layers: list[LayerIndex], n: int) -> dict[str, str]:
    """dive-style markers for layer ``n`` against the merged view of the layers
    below it: path -> ``added``, ``modified`` or ``removed`` (whiteouts)."""
    below = MergedTree(layers[:n])
    ix = layers[n]
    out: dict[str, str] = {}
    for e in ix.iter_entries():
        if e.id == 0:
            continue
        p = e.path
        if e.is_opaque_marker:
            continue
        if e.is_whiteout:
            parent = p.rsplit("/", 1)[0] if "/" in p else ""
            target = (parent + "/" if parent else "") + e.whiteout_target
            out[target] = "removed"
            continue
        out[p] = "modified" if below.lookup(p) is not None else "added"
    return out
