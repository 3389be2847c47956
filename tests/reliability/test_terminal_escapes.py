"""Control characters from images and registries never reach the terminal raw
(issue 19, weak spot): ESC, OSC, CR, LF, other C0/C1 controls and DEL in file
names, link targets, config fields, tags and repository names are printed as
visible escapes by `ls`, `ls -l`, `inspect`, `tags`, `repos` and the error
lines (`cat` of such a path); `--json` keeps them exact.

The hostile image is an OCI layout built here; the hostile registry is a real
HTTP server on loopback that answers the catalog and tags lists with such
names (a real docker-registry refuses them, a hostile one need not)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rel_layers import BlobBuilder, write_layout

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OSC_TITLE = "\x1b]0;pwned\x07"
NAMES = {
    "osc": f"evil{OSC_TITLE}name.txt",
    "newline": "fake\n-rw-r--r--  0:0  0 2020-01-01 00:00 entry",
    "cr": "over\rwritten",
    "del-c1": "del\x7fc1\x9b31m",
    "tab-bs": "tab\tback\\slash",
}
LINK_TARGET = "\x1b[2J\x1b[Hcleared"
HOSTILE_TAG = "t\x1b[31mred"
REPOS = ["ok/repo", f"evil{OSC_TITLE}/x", "a\nfake-repo", "b\rc"]
TAGS = ["v1", f"x{OSC_TITLE}", "y\nfake-tag", "z\x9b2J"]
# what may appear in human output: printable text, spaces and the line ends
ALLOWED_CONTROLS = {"\n"}


def _raw_controls(text: str) -> set[str]:
    return {ch for ch in text if (ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F)
            and ch not in ALLOWED_CONTROLS}


def _cli(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "stargz_tui", *args], capture_output=True,
                       timeout=120, cwd=ROOT)
    out = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8", "replace"),
                                      r.stderr.decode("utf-8", "replace"))
    if check:
        assert r.returncode == 0, (args, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    return out


def _hostile_layout(root: str) -> str:
    b = BlobBuilder()
    entries = [{"name": "d/", "type": "dir", "mode": 0o755}]
    for name in NAMES.values():
        entries += b.add_file("d/" + name, b"x")
    entries.append({"name": "d/link", "type": "symlink", "mode": 0o777,
                    "linkName": LINK_TARGET})
    blob = b.finish({"version": 1, "entries": entries})
    config = {"architecture": "amd64", "os": "linux",
              "created": f"2024-01-01T00:00:00Z{OSC_TITLE}",
              "config": {"Env": [f"PATH=/bin{OSC_TITLE}", "FAKE=1\nEnv:        INJECTED=1"],
                         "WorkingDir": "/w\x1b[31m", "User": "r\roo\x7ft",
                         "Cmd": ["sh", "-c", "\x1b[2J"],
                         "Labels": {f"l{OSC_TITLE}": "v\nLabel:      fake=1"}},
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}

    def extra_tag(index, put):
        entry = dict(index["manifests"][0], annotations={
            "org.opencontainers.image.ref.name": HOSTILE_TAG})
        index["manifests"].append(entry)
        return index

    return write_layout(root, [blob], tag="t", config=config, index_override=extra_tag)


def test_control_characters_in_image_data_are_escaped(tmp_path, rel):
    ref = _hostile_layout(str(tmp_path / "layout"))
    layout = ref.rsplit(":", 1)[0]
    outputs = {
        "ls -R": _cli("ls", ref, "-R").stdout,
        "ls -lR": _cli("ls", ref, "-lR").stdout,
        "ls -l d": _cli("ls", "-l", ref, "d").stdout,
        "inspect": _cli("inspect", ref, check=False).stdout,
        "tags": _cli("tags", layout).stdout,
    }
    for what, text in outputs.items():
        assert not _raw_controls(text), (what, text)
    # one line per entry: a newline in a name does not fake one
    assert len(outputs["ls -R"].splitlines()) == 1 + len(NAMES) + 1
    assert len(outputs["ls -lR"].splitlines()) == 1 + len(NAMES) + 1
    assert "evil\\x1b]0;pwned\\x07name.txt" in outputs["ls -R"]
    assert "fake\\n-rw-r--r--" in outputs["ls -R"] and "over\\rwritten" in outputs["ls -R"]
    assert "del\\x7fc1\\x9b31m" in outputs["ls -R"] and "tab\\tback\\\\slash" in outputs["ls -R"]
    assert "-> \\x1b[2J\\x1b[Hcleared" in outputs["ls -l d"]
    ins = outputs["inspect"]
    assert "INJECTED" in ins and not any(line.startswith("Env:        INJECTED")
                                         for line in ins.splitlines())
    assert "/w\\x1b[31m" in ins and "PATH=/bin\\x1b]0;pwned\\x07" in ins
    assert "r\\roo\\x7ft" in ins and not any(line.startswith("Label:      fake")
                                            for line in ins.splitlines())
    assert "t\\x1b[31mred" in outputs["tags"] and "t\n" in outputs["tags"]
    # an error line that names a hostile path stays one escaped line
    err = _cli("cat", ref, "d/no\x1b]0;such\x07\nfile", check=False)
    assert err.returncode == 1 and not _raw_controls(err.stderr)
    assert len(err.stderr.strip().splitlines()) == 1 and "\\x1b]0;such\\x07\\nfile" in err.stderr
    # JSON stays exact
    recs = json.loads(_cli("ls", ref, "-R", "--json").stdout)
    assert {r["path"] for r in recs} == {"d", "d/link", *("d/" + n for n in NAMES.values())}
    assert next(r for r in recs if r["path"] == "d/link")["linkTarget"] == LINK_TARGET
    data = json.loads(_cli("inspect", ref, "--json", check=False).stdout)
    assert data["config"]["workingDir"] == "/w\x1b[31m"
    assert set(json.loads(_cli("tags", layout, "--json").stdout)["tags"]) == {"t", HOSTILE_TAG}
    rel.row("security", "control characters (ESC/OSC, CR, LF, TAB, DEL, C1) in file names, "
            "a symlink target, config fields (env, workingDir, user, labels, cmd) and a tag",
            "escaped (\\x1b, \\n, ...) in `ls`, `ls -l`, `inspect`, `tags` and error lines: "
            "one line per entry, no raw control byte; `--json` exact")


class _HostileRegistry(BaseHTTPRequestHandler):
    def log_message(self, *a):  # quiet
        pass

    def do_GET(self):  # noqa: N802 - http.server API
        if self.path.startswith("/v2/_catalog"):
            body = {"repositories": REPOS}
        elif self.path.endswith("/tags/list") or "/tags/list?" in self.path:
            body = {"name": "ok/repo", "tags": TAGS}
        elif self.path == "/v2/":
            body = {}
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def hostile_registry():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HostileRegistry)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_control_characters_in_registry_names_are_escaped(hostile_registry, rel):
    repos = _cli("repos", hostile_registry).stdout
    tags = _cli("tags", f"{hostile_registry}/ok/repo").stdout
    for text in (repos, tags):
        assert not _raw_controls(text), text
    assert repos.splitlines() == ["ok/repo", "evil\\x1b]0;pwned\\x07/x", "a\\nfake-repo", "b\\rc"]
    assert tags.splitlines() == ["v1", "x\\x1b]0;pwned\\x07", "y\\nfake-tag", "z\\x9b2J"]
    assert json.loads(_cli("repos", hostile_registry, "--json").stdout)["repositories"] == REPOS
    assert json.loads(_cli("tags", f"{hostile_registry}/ok/repo", "--json").stdout)["tags"] == TAGS
    rel.row("security", "a hostile registry whose catalog and tags list hold ESC/OSC, LF, CR "
            "and C1 characters", "`repos` and `tags` print one escaped line per name; "
            "`--json` exact")
