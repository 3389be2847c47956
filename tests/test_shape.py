"""The shape rules of issue 15 that import-linter cannot check, read from the source:

* no class in ``core`` is above :data:`MAX_CLASS_LINES` lines or has more than
  :data:`MAX_METHODS` methods unless its docstring or the comment right above
  it says ``Not split:`` and why (properties are the class's fields, not
  counted as methods);
* docs/CONTRACTS.md's module map names every module of ``core`` and
  ``stargz_tui``, and nothing else;
* no module in ``core`` or ``stargz_tui`` uses another module's private
  names: ``from x import _y``, ``x._y`` where ``x`` is an imported module,
  ``C._y`` where ``C`` was imported from another module, or an import of a
  private module (``textual.widgets._footer``).

The allowlists below are the known exceptions, each with its reason.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_CLASS_LINES = 400
MAX_METHODS = 20
REASON_MARK = "Not split:"

# Underscored names that are documented public API.
PUBLIC_DESPITE_UNDERSCORE = {"os._exit"}
PUBLIC_ATTRS = {"_replace", "_asdict", "_fields", "_make", "_exit"}  # namedtuple's, os._exit
# (module, what it uses) pairs allowed to reach a private name, with why.
# Empty: nothing of ours needs one (the launcher's C-module hand-off went
# with the mount service, issue 14).
PRIVATE_ACCESS_ALLOWED: dict[tuple[str, str], str] = {}


def _sources(*packages: str):
    for pkg in packages:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, pkg)):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    yield os.path.relpath(path, ROOT).replace(os.sep, "/"), path


def _parse(path: str) -> tuple[ast.Module, list[str]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return ast.parse(text, filename=path), text.splitlines()


def _module_name(rel: str) -> str:
    mod = rel[:-3].replace("/", ".")
    return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_property(fn) -> bool:
    for d in fn.decorator_list:
        if isinstance(d, ast.Name) and d.id in ("property", "cached_property"):
            return True
        if isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter", "cached_property"):
            return True
    return False


def _comment_above(lines: list[str], node: ast.ClassDef) -> str:
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
    above = []
    i = first - 1
    while i >= 0 and lines[i].lstrip().startswith("#"):
        above.append(lines[i].lstrip()[1:].strip())
        i -= 1
    return " ".join(reversed(above))


def oversized_classes(packages=("core",)) -> list[str]:
    """``path:Class (N lines, M methods)`` of every class over the limits without
    a ``Not split:`` reason."""
    found = []
    for rel, path in _sources(*packages):
        tree, lines = _parse(path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            size = node.end_lineno - node.lineno + 1
            methods = sum(isinstance(b, ast.FunctionDef | ast.AsyncFunctionDef)
                          and not _is_property(b) for b in node.body)
            if size <= MAX_CLASS_LINES and methods <= MAX_METHODS:
                continue
            reason = (ast.get_docstring(node) or "") + " " + _comment_above(lines, node)
            if REASON_MARK in reason:
                continue
            found.append(f"{rel}:{node.name} ({size} lines, {methods} methods)")
    return found


def _resolve(module: str, level: int, here: str, is_package: bool) -> str:
    if not level:
        return module
    parts = here.split(".")
    if not is_package:
        parts = parts[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join([*parts, module] if module else parts)


def _is_module(dotted: str) -> bool:
    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _all_private_uses(packages=("core", "stargz_tui")) -> tuple[tuple[str, int, str], ...]:
    """(path, line, what) of every use of another module's private name."""
    found = []
    for rel, path in _sources(*packages):
        tree, _ = _parse(path)
        here = _module_name(rel)
        is_pkg = rel.endswith("__init__.py")
        modules: dict[str, str] = {}   # local name -> module it is bound to
        imported: dict[str, str] = {}  # local name -> "module.Name" of an imported non-module

        def hit(node, what, rel=rel):
            if what not in PUBLIC_DESPITE_UNDERSCORE:
                found.append((rel, node.lineno, what))

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if any(_private(p) for p in a.name.split(".")):
                        hit(node, f"import {a.name}")
                    if a.asname:
                        modules[a.asname] = a.name
                    else:
                        modules[a.name.split(".")[0]] = a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(node.module or "", node.level, here, is_pkg)
                if src == "__future__":
                    continue
                if any(_private(p) for p in src.split(".")):
                    hit(node, f"from {src} import ...")
                for a in node.names:
                    if _private(a.name):
                        hit(node, f"from {src} import {a.name}")
                    local = a.asname or a.name
                    if _is_module(f"{src}.{a.name}"):
                        modules[local] = f"{src}.{a.name}"
                    else:
                        imported[local] = f"{src}.{a.name}"
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            chain, base = [], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if not isinstance(base, ast.Name):
                continue
            if base.id in modules:
                owner = ".".join([modules[base.id], *reversed(chain)])
            elif base.id in imported and not chain:
                owner = imported[base.id]
            else:
                continue
            if owner != here:
                hit(node, f"{owner}.{node.attr}")
        # obj._y on anything but self/cls/a module: _y must be this module's own
        # (a def, a class attribute, a self._y assignment, __slots__), else it
        # is another module's object's private attribute
        own = _own_private_names(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr)
                    and node.attr not in own and node.attr not in PUBLIC_ATTRS
                    and not (isinstance(node.value, ast.Name)
                             and (node.value.id in ("self", "cls") or node.value.id in modules
                                  or node.value.id in imported))):
                hit(node, f"<object>.{node.attr}")
    return tuple(found)


def _own_private_names(tree: ast.Module) -> set[str]:
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            own.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            own.add(node.value)  # __slots__ entries, getattr(obj, "_y") of our own
    return {n for n in own if _private(n)}


def private_uses(allowed=None) -> list[str]:
    """``path:line: what`` of each use not in ``allowed`` (default: the allowlist)."""
    allowed = PRIVATE_ACCESS_ALLOWED if allowed is None else allowed
    return [f"{rel}:{line}: {what}" for rel, line, what in _all_private_uses()
            if (rel, what) not in allowed]


def test_no_oversized_class_without_a_reason():
    over = oversized_classes()
    assert not over, (f"classes above {MAX_CLASS_LINES} lines or {MAX_METHODS} methods without "
                      f"a '{REASON_MARK}' reason at their top:\n  " + "\n  ".join(over))


def test_no_private_names_across_modules():
    uses = private_uses()
    assert not uses, "private names used across modules:\n  " + "\n  ".join(uses)


def _module_map() -> set[str]:
    """Module names in the module column of docs/CONTRACTS.md's map table."""
    names = set()
    with open(os.path.join(ROOT, "docs", "CONTRACTS.md"), encoding="utf-8") as f:
        for line in f:
            cells = line.split("|")
            if line.startswith("| ") and len(cells) > 3:
                names.update(re.findall(r"`((?:core|stargz_tui)(?:\.\w+)*)`", cells[2]))
    return names


def test_module_map_matches_the_tree():
    tree = {_module_name(rel) for rel, _ in _sources("core", "stargz_tui")
            if not rel.endswith(("__init__.py", "__main__.py"))}
    mapped = _module_map()
    assert not tree - mapped, ("modules without a row in docs/CONTRACTS.md's module map "
                               f"(add one: what it owns, what it may import): {sorted(tree - mapped)}")
    assert not mapped - tree, f"rows for modules that do not exist: {sorted(mapped - tree)}"


def test_private_access_allowlist_is_used():
    """An allowlist entry nothing needs any more is stale: remove it."""
    uses = private_uses(allowed={})
    stale = [entry for entry in PRIVATE_ACCESS_ALLOWED
             if not any(u.startswith(entry[0] + ":") and u.endswith(": " + entry[1])
                        for u in uses)]
    assert not stale, f"allowlist entries nothing needs any more: {stale}"


