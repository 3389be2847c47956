"""The core reads the environment at its edge only (issue 14 pt 2).

Two modules of ``core`` may look up environment variables:

* ``core/options.py``: the tuning knobs (``Tuning.from_env``: memory LRU,
  O_DIRECT packs, the FUSE poll window, bulk reads), read once by the process
  the user runs (CLI, app, bench) and passed down in typed options;
* ``core/paths.py``: where things live (state, runtime and cache dirs, the
  registries config, podman's and docker's credential files, the systemd user
  dir). These are conventions shared with other tools (XDG, ``DOCKER_CONFIG``,
  ``REGISTRY_AUTH_FILE``) rather than knobs of ours, and every process (the
  CLI, the service, a daemon) must agree on them, so one module answers them.

Every other module is handed what it needs. Copying the whole environment to
a child process (``dict(os.environ)``: the service and daemon starters) is not
a lookup and is allowed; proxies are found by httpx/urllib themselves.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

CORE = pathlib.Path(__file__).resolve().parent.parent / "core"
ROOT = str(CORE.parent)
EDGE = {"options.py", "paths.py"}


def _env_lookups(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in ("getenv", "getenvb", "environb"):
            found.append(f"{path.name}:{node.lineno} os.{node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr == "environ":
            up = parents.get(node)
            # dict(os.environ): the whole environment handed to a child process
            if isinstance(up, ast.Call) and isinstance(up.func, ast.Name) and up.func.id == "dict":
                continue
            found.append(f"{path.name}:{node.lineno} os.environ")
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                a.name in ("environ", "getenv") for a in node.names):
            found.append(f"{path.name}:{node.lineno} from os import environ/getenv")
    return found


def test_core_reads_the_environment_only_at_its_edge():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 40  # the whole core was walked
    offenders = [hit for f in files if f.relative_to(CORE).as_posix() not in EDGE
                 for hit in _env_lookups(f)]
    assert offenders == []


def test_the_edge_modules_do_read_it():
    # the check above sees real lookups: both edge modules have some
    assert _env_lookups(CORE / "options.py") and _env_lookups(CORE / "paths.py")


def test_an_unreadable_tuning_value_is_said_in_one_line_and_not_used():
    """A bad knob never stops a mount, and never passes silently."""
    r = subprocess.run(
        [sys.executable, "-c", "from core.options import Tuning; print(Tuning.from_env())"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env=dict(os.environ, STARGZ_TUI_MEMORY_CACHE="lots", STARGZ_TUI_FUSE_SPIN_US="fast"))
    assert r.returncode == 0, r.stderr
    assert "memory_cache=None" in r.stdout and "fuse_spin_us=50.0" in r.stdout
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and "Traceback" not in r.stderr
    assert "STARGZ_TUI_MEMORY_CACHE='lots'" in lines[0] and "STARGZ_TUI_FUSE_SPIN_US='fast'" in lines[1]
