"""Helpers for the app tests: an isolated environment and bounded waits."""

from __future__ import annotations

import gzip
import hashlib
import html
import io
import json
import os
import re
import shutil
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "estargz-oci"
LAYOUT_REF = "oci:tests/fixtures/estargz-oci"  # relative: renders the same everywhere
WAIT = 30.0


@pytest.fixture
def app_env(tmp_path, monkeypatch):
    """Private config, cache, state and runtime dirs; cwd at the repo root."""
    for name in ("CONFIG", "CACHE", "STATE", "RUNTIME"):
        d = tmp_path / name.lower()
        d.mkdir(mode=0o700)
        monkeypatch.setenv(f"STARGZ_TUI_{name}_DIR", str(d))
    monkeypatch.chdir(ROOT)
    return tmp_path


async def wait_for(pilot, pred, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        await pilot.pause(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def screen_named(app, name: str):
    return app.screen if type(app.screen).__name__ == name else None


async def open_image_screen(pilot, app):
    """Wait until the image screen shows every layer loaded."""
    def ready():
        s = screen_named(app, "ImageScreen")
        if s is not None and s.session is not None and all(v is not None for v in s.session.views):
            return s
        return None

    screen = await wait_for(pilot, ready, "the image screen with its layers")
    await wait_for(pilot, lambda: not screen.query_one("#loading").display, "loading to finish")
    return screen


async def open_layer_screen(pilot, app):
    def ready():
        s = screen_named(app, "LayerScreen")
        if s is not None and s.browser is not None and s.query_one("#toc").root.children:
            return s
        return None

    screen = await wait_for(pilot, ready, "the layer screen's tree")
    await wait_for(pilot, lambda: len(screen.layer_states) == screen.index.num_chunks,
                   "the layer chunk map")
    return screen


async def open_layer_session(pilot, app, layer_no: int = 0, keys=(), expand=(),
                             cursor: str | None = None):
    """Image screen -> layer ``layer_no`` -> press ``keys``, expand ``expand``
    paths and put the cursor on ``cursor``; returns the layer screen. Shared by
    the snapshot tests and scripts/screenshots.py."""
    from textual.widgets import Tree

    await open_image_screen(pilot, app)
    for _ in range(layer_no):
        await pilot.press("down")
    await pilot.press("enter")
    layer = await open_layer_screen(pilot, app)
    for k in keys:
        await pilot.press(k)
        await pilot.pause(0.3)
    tree = layer.query_one("#toc", Tree)
    for path in expand:
        node = await wait_for(pilot, lambda p=path: find_node(tree, p), path)
        node.expand()
        await pilot.pause()
    if cursor:
        node = await wait_for(pilot, lambda: find_node(tree, cursor), cursor)
        tree.move_cursor(node)
        await wait_for(pilot, lambda: layer.current and layer.current.path == cursor, cursor)
    await pilot.pause(0.2)
    return layer


def tree_labels(tree) -> list[str]:
    """Visible tree lines as plain text (depth-first over expanded nodes)."""
    out = []

    def walk(node, depth):
        for c in node.children:
            out.append("  " * depth + str(c.label.plain if hasattr(c.label, "plain") else c.label))
            if c.is_expanded:
                walk(c, depth + 1)

    walk(tree.root, 0)
    return out


def find_node(tree, path: str):
    for node in _iter_nodes(tree.root):
        if getattr(node.data, "path", None) == path:
            return node
    return None


def _iter_nodes(node):
    for c in node.children:
        yield c
        yield from _iter_nodes(c)


def ground_truth(tag: str, path: str) -> bytes:
    """A file's bytes from the plain gzip image (read with tarfile)."""
    index = json.loads((FIXTURES / "index.json").read_text())
    man = next(m for m in index["manifests"]
               if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    manifest = json.loads(_blob(man["digest"]).read_bytes())
    found = None
    for layer in manifest["layers"]:
        with tarfile.open(_blob(layer["digest"]), "r:gz") as tf:
            for m in tf.getmembers():
                if m.name.lstrip("./") == path and m.isfile():
                    found = tf.extractfile(m).read()
    assert found is not None, f"{path} not in {tag}"
    return found


def _blob(digest: str, layout: Path = FIXTURES) -> Path:
    algo, _, h = digest.partition(":")
    return layout / "blobs" / algo / h


async def corrupt_layout(dest: Path, tag: str, path: str) -> Path:
    """Copy the fixture layout to ``dest`` and flip one byte inside the
    compressed data of the first chunk of ``path`` in layer 0 of ``tag``."""
    from core.estargz import load_layer_index
    from core.source import LocalBlobSource

    shutil.copytree(FIXTURES, dest)
    index = json.loads((dest / "index.json").read_text())
    man = next(m for m in index["manifests"]
               if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    layer = json.loads(_blob(man["digest"], dest).read_bytes())["layers"][0]
    blob = _blob(layer["digest"], dest)
    ix = await load_layer_index(LocalBlobSource(blob, layer["digest"]))
    chunk = ix.chunks(ix.lookup(path))[0]
    pos = chunk.offset + (chunk.end - chunk.offset) // 2
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))
    return dest


def big_layout(dest: Path, n_files: int = 100_000, flat: int = 20_000) -> str:
    """An OCI layout whose single eStargz layer's TOC has ``n_files`` empty
    files (``flat`` of them in one directory). Only the TOC is real data:
    empty files have no chunks, so the blob is the TOC member plus footer."""
    from core.estargz.footer import estargz_footer

    entries = [{"name": "flat/", "type": "dir", "mode": 0o755}]
    entries += [{"name": f"flat/f{i:06d}", "type": "reg", "size": 0, "mode": 0o644}
                for i in range(flat)]
    per = 1000
    rest = n_files - flat
    for d in range(rest // per):
        entries.append({"name": f"tree/d{d:04d}/", "type": "dir", "mode": 0o755})
        entries += [{"name": f"tree/d{d:04d}/f{i:04d}", "type": "reg", "size": 0, "mode": 0o644}
                    for i in range(per)]
    toc = json.dumps({"version": 1, "entries": entries}).encode()
    ti = tarfile.TarInfo("stargz.index.json")
    ti.size = len(toc)
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        tf.addfile(ti, io.BytesIO(toc))
    toc_member = gzip.compress(tbuf.getvalue(), mtime=0)
    blob = toc_member + estargz_footer(0)
    dest.mkdir(parents=True)
    (dest / "blobs" / "sha256").mkdir(parents=True)

    def put(data: bytes) -> str:
        h = hashlib.sha256(data).hexdigest()
        (dest / "blobs" / "sha256" / h).write_bytes(data)
        return "sha256:" + h

    diff = "sha256:" + hashlib.sha256(b"").hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [diff]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": put(blob), "size": len(blob)}],
    }).encode()
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest),
        "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": "big"}}]}))
    return f"oci:{dest}:big"


_SVG_TEXT = re.compile(r'<text [^>]*?x="([\d.]+)"[^>]*?clip-path="url\(#[^)]*?-line-(\d+)\)">(.*?)</text>',
                       re.S)


def screen_text(app) -> str:
    """What the terminal shows right now, as plain text lines (read back from
    Textual's SVG screenshot, which places each run of text at its column)."""
    rows: dict[int, dict[int, str]] = {}
    for x, line, text in _SVG_TEXT.findall(app.export_screenshot()):
        col = round(float(x) / 12.2)
        rows.setdefault(int(line), {})[col] = html.unescape(text).replace("\xa0", " ")
    out = []
    for n in range(max(rows, default=-1) + 1):
        buf: list[str] = []
        for col, text in sorted(rows.get(n, {}).items()):
            if len(buf) < col:
                buf.extend(" " * (col - len(buf)))
            buf[col:col + len(text)] = list(text)
        out.append("".join(buf).rstrip("\n").rstrip())
    return "\n".join(out)
