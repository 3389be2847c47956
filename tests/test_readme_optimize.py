"""The README's "Make an image start faster" commands run as written (issue
16: "a short section with the real commands"): both ``sh`` blocks, with
bash, in a directory whose ``./layout`` holds a one-layer eStargz image
``py`` made of this host's python3, its standard library and libraries
(bench.userland, as B9's fallback builds it), and its config's ``Cmd`` the
import workload. Only the mountpoint is moved under the test's tmp dir."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from fuse_helpers import ROOT, isolated_mount_env

from bench.userland import write_userland_layout

pytestmark = pytest.mark.fuse
PY = "/usr/bin/python3"


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    yield from isolated_mount_env(tmp_path, monkeypatch)


def _blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Make an image start faster", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def _inspect(ref: str) -> dict:
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "stargz-tui"),
                        "inspect", ref, "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_readme_optimize_commands_run_as_written(mount_env, tmp_path):
    blocks = _blocks()
    assert len(blocks) == 2 and "optimize" in blocks[0] and "--record" in blocks[1]
    ver = subprocess.run([PY, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    work = tmp_path / "work"
    work.mkdir()
    write_userland_layout(
        str(work / "layout"), programs=[PY, "/bin/sh"], trees=[f"/usr/lib/python{ver}"],
        config={"Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "LANG=C.UTF-8"],
                "Cmd": [PY, "-c", "import json, email, http.client, sqlite3"]},
        tag="py")
    mp = tmp_path / "mnt-py"
    mp.mkdir()
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    for block in blocks:
        script = block.replace("/mnt/py", str(mp))
        p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env,
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, (script, p.stdout[-2000:], p.stderr[-2000:])
    # what the commands made: records naming the modules imported, images with
    # a landmark behind them
    py = (work / "py.json").read_text()
    assert f"usr/lib/python{ver}/json/" in py and f"usr/lib/python{ver}/sqlite3/" in py
    sq = (work / "sqlite.json").read_text()
    assert f"usr/lib/python{ver}/sqlite3/" in sq and f"usr/lib/python{ver}/email/" not in sq
    assert "recording" in p.stdout or "recorded" in p.stdout  # (`mounts` showed the count)
    for tag in ("py-opt", "py-cmd", "py-opt2", "py-sqlite"):
        (layer,) = _inspect(f"oci:{work}/layout:{tag}")["layers"]
        assert layer["prefetchSize"], tag
