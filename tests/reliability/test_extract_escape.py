"""Extraction (the app's ``x``, ``core.extract.extract``) never writes, creates
or chmods anything outside its destination.

The natural workflow is to extract one layer after another into one
directory. A hostile lower layer plants a symlink there (``etc -> /outside``,
or ``a -> /outside/file``); the upper layer then holds ``etc/pwned`` or a
regular file ``a``. Both layers are real eStargz blobs built here; the
"outside" directory is a sibling of the destination holding a victim file
whose bytes and mode must not change.
"""

from __future__ import annotations

import os
import stat

import anyio
import pytest
from rel_layers import BlobBuilder, sha256

from core.errors import CoreError, ExtractError
from core.estargz import load_layer_index
from core.extract import extract
from core.source import LocalBlobSource

pytestmark = [pytest.mark.reliability]

VICTIM = b"the victim's own bytes\n"


def _layer(entries: list[dict], files: dict[str, tuple[bytes, int]] | None = None) -> bytes:
    b = BlobBuilder()
    out = list(entries)
    for name, (data, mode) in (files or {}).items():
        ents = b.add_file(name, data)
        ents[0]["mode"] = mode
        out += ents
    return b.finish({"version": 1, "entries": out})


def _extract_root(tmp_path, blob: bytes, dest: str) -> int:
    path = tmp_path / sha256(blob)[7:]
    path.write_bytes(blob)

    async def go():
        ix = await load_layer_index(LocalBlobSource(path, sha256(blob)))
        return await extract(ix, LocalBlobSource(path, sha256(blob)), ix.root, dest)

    return anyio.run(go)


def _snapshot(d: str) -> dict:
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            p = os.path.join(root, n)
            st = os.lstat(p)
            data = open(p, "rb").read() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(p, d)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), data)
    return out


@pytest.fixture
def places(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(VICTIM)
    os.chmod(outside / "victim", 0o640)
    dest = tmp_path / "dest"
    return str(dest), str(outside)


@pytest.mark.parametrize("link", ["absolute", "relative"])
def test_symlinked_dir_from_lower_layer_is_not_followed(tmp_path, places, link, rel):
    dest, outside = places
    target = outside if link == "absolute" else "../outside"
    lower = _layer([{"name": "etc", "type": "symlink", "linkName": target, "mode": 0o777}])
    upper = _layer([{"name": "etc/", "type": "dir", "mode": 0o777}],
                   {"etc/pwned": (b"written outside\n", 0o4777),
                    "etc/victim": (b"overwritten\n", 0o777)})
    before = _snapshot(outside)
    _extract_root(tmp_path, lower, dest)
    assert os.readlink(os.path.join(dest, "etc")) == target  # stored as is
    with pytest.raises(ExtractError) as ei:
        _extract_root(tmp_path, upper, dest)
    msg = str(ei.value)
    assert "\n" not in msg and "symbolic link" in msg, msg
    assert _snapshot(outside) == before
    assert os.readlink(os.path.join(dest, "etc")) == target
    rel.row("hostile", f"extract layer 0 holding `etc -> {'/outside' if link == 'absolute' else '../outside'}`"
            ", then layer 1 holding `etc/`, `etc/pwned`, `etc/victim` (mode 04777) into the "
            "same directory",
            f"nothing written, created or chmodded outside; layer 1 refused: {msg[:100]}")


def test_symlinked_file_from_lower_layer_is_replaced_not_written_through(tmp_path, places, rel):
    dest, outside = places
    victim = os.path.join(outside, "victim")
    lower = _layer([{"name": "a", "type": "symlink", "linkName": victim, "mode": 0o777},
                    {"name": "b", "type": "symlink", "linkName": victim, "mode": 0o777}])
    upper = _layer([{"name": "b", "type": "symlink", "linkName": "a", "mode": 0o777}],
                   {"a": (b"the upper layer's a\n", 0o755)})
    before = _snapshot(outside)
    _extract_root(tmp_path, lower, dest)
    n = _extract_root(tmp_path, upper, dest)
    assert _snapshot(outside) == before
    a = os.path.join(dest, "a")
    st = os.lstat(a)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755
    assert open(a, "rb").read() == b"the upper layer's a\n" and n == len(b"the upper layer's a\n")
    assert os.readlink(os.path.join(dest, "b")) == "a"
    rel.row("hostile", "extract layer 0 holding `a -> /outside/victim`, then layer 1 holding a "
            "regular file `a` (mode 0755) into the same directory",
            "the link is replaced by the new file (unlink, O_CREAT|O_EXCL|O_NOFOLLOW, fchmod); "
            "/outside/victim keeps its bytes and mode")


def test_existing_file_where_a_directory_goes(tmp_path, places, rel):
    dest, outside = places
    os.makedirs(dest)
    with open(os.path.join(dest, "etc"), "wb") as f:
        f.write(b"a plain file\n")
    upper = _layer([], {"etc/x": (b"x\n", 0o644)})
    with pytest.raises(CoreError) as ei:
        _extract_root(tmp_path, upper, dest)
    assert "not a directory" in str(ei.value)
    assert open(os.path.join(dest, "etc"), "rb").read() == b"a plain file\n"
    rel.row("hostile", "extract `etc/x` where the destination holds a regular file `etc`",
            f"refused, one line: {str(ei.value)[:90]}")
