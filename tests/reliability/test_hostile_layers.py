"""Hand-made hostile eStargz layers, through the core and through a real FUSE mount.

Each case is a real blob (gzip members + TOC + footer) whose TOC lies in one
way. The core must either refuse it with a one-line CoreError, or interpret
it in a safe, documented way; mounted, nothing may appear outside the mount,
reads return the right bytes or fail with EIO, and the daemon must survive.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys

import anyio
import pytest
from rel_layers import BlobBuilder, simple_layer, write_layout

from core import mount as core_mount
from core.errors import CoreError
from core.estargz import load_layer_index, read_file_range
from core.source import LocalBlobSource

pytestmark = [pytest.mark.reliability, pytest.mark.fuse]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOOD = b"hello world\n" * 10


def _chunked(name, data, chunk, **over):
    b = BlobBuilder()
    ents = b.add_file(name, data, chunk_size=chunk)
    return b, ents


def case_dotdot():
    return simple_layer([{"name": "../../etc/evil", "type": "reg", "size": 0}])


def case_dotdot_inner():
    return simple_layer([{"name": "data/../../evil", "type": "reg", "size": 0}])


def case_absolute():
    return simple_layer([{"name": "/abs/file", "type": "reg", "size": 0, "mode": 0o644}])


def case_empty_name_reg():
    return simple_layer([{"name": "", "type": "reg", "size": 0}])


def case_nul_name():
    return simple_layer([{"name": "data/a\x00b", "type": "reg", "size": 0}])


def case_nul_linkname():
    return simple_layer([{"name": "data/l", "type": "symlink", "linkName": "x\x00y"}])


def case_duplicate_reg():
    b = BlobBuilder()
    e1 = b.add_file("data/f", b"first version")
    e2 = b.add_file("data/f", b"second, later version")
    return b.finish({"version": 1, "entries": [{"name": "data/", "type": "dir"}] + e1 + e2})


def case_dir_then_file():
    return simple_layer([{"name": "etc", "type": "reg", "size": 0}])


def case_hardlink_missing():
    return simple_layer([{"name": "data/h", "type": "hardlink", "linkName": "data/nothing"}])


def case_hardlink_later():
    b = BlobBuilder()
    ents = b.add_file("data/target", GOOD)
    hl = {"name": "data/early", "type": "hardlink", "linkName": "data/target"}
    return b.finish({"version": 1, "entries": [{"name": "data/", "type": "dir"}, hl] + ents})


def case_hardlink_cycle():
    return simple_layer([{"name": "data/a", "type": "hardlink", "linkName": "data/b"},
                         {"name": "data/b", "type": "hardlink", "linkName": "data/a"}])


def case_hardlink_self():
    return simple_layer([{"name": "data/s", "type": "hardlink", "linkName": "data/s"}])


def case_hardlink_escape():
    return simple_layer([{"name": "data/h", "type": "hardlink", "linkName": "../../etc/passwd"}])


def case_hardlink_to_dir():
    return simple_layer([{"name": "data/h", "type": "hardlink", "linkName": "etc"}])


def case_symlink_loop():
    return simple_layer([{"name": "data/la", "type": "symlink", "linkName": "lb"},
                         {"name": "data/lb", "type": "symlink", "linkName": "la"},
                         {"name": "data/up", "type": "symlink", "linkName": "../../../../etc"}])


def case_chunks_overlap():
    b, ents = _chunked("data/f", os.urandom(3000), 1024)
    ents[1]["chunkOffset"] = 512  # overlaps the first chunk
    return b.finish({"version": 1, "entries": [{"name": "data/", "type": "dir"}] + ents})


def case_chunk_gap():
    b, ents = _chunked("data/f", os.urandom(3000), 1024)
    del ents[1]
    return b.finish({"version": 1, "entries": [{"name": "data/", "type": "dir"}] + ents})


def case_chunk_past_blob_end():
    b, ents = _chunked("data/f", GOOD, None)
    ents[0]["offset"] = 10 << 30
    return b.finish({"version": 1, "entries": ents})


def case_chunk_in_toc_region():
    b, ents = _chunked("data/f", GOOD, None)
    ents[0]["offset"] = b.buf.tell() + 10  # inside the TOC member that follows
    return b.finish({"version": 1, "entries": ents})


def case_chunk_points_at_other_file():
    b = BlobBuilder()
    e1 = b.add_file("data/a", b"A" * 500)
    e2 = b.add_file("data/b", b"B" * 500)
    e2[0]["offset"] = e1[0]["offset"]  # b's bytes claimed to be a's member
    return b.finish({"version": 1, "entries": e1 + e2})


def case_chunk_points_at_other_file_no_digest():
    b = BlobBuilder()
    e1 = b.add_file("data/a", b"A" * 500)
    e2 = b.add_file("data/b", b"B" * 500)
    e2[0]["offset"] = e1[0]["offset"]
    e2[0].pop("chunkDigest")
    e2[0].pop("digest")
    return b.finish({"version": 1, "entries": e1 + e2})


def case_negative_size():
    return simple_layer([{"name": "data/n", "type": "reg", "size": -5, "offset": 0}])


def case_negative_chunk_size():
    b, ents = _chunked("data/f", os.urandom(3000), 1024)
    ents[1]["chunkSize"] = -1024
    return b.finish({"version": 1, "entries": ents})


def case_huge_size():
    b, ents = _chunked("data/f", GOOD, None)
    ents[0]["size"] = 1 << 62
    ents[0].pop("chunkDigest")
    ents[0].pop("digest")
    return b.finish({"version": 1, "entries": ents})


def case_size_larger_than_data():
    b, ents = _chunked("data/f", GOOD, None)
    ents[0]["size"] = len(GOOD) + 100_000
    return b.finish({"version": 1, "entries": ents})


def case_toc_bomb():
    import zlib

    from rel_layers import _tar_header

    b = BlobBuilder()
    b.add_file("data/f", GOOD)
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = co.compress(_tar_header("stargz.index.json", 3 << 30))
    for _ in range(64):
        member += co.compress(b"\0" * (1 << 20))
    return b.finish(b"", toc_member=member + co.flush())


def case_deep_nesting_ok():
    name = "/".join(["d"] * 300) + "/leaf"
    return simple_layer([{"name": name, "type": "reg", "size": 0}])


def case_deep_nesting_too_deep():
    name = "/".join(["d"] * 5000) + "/leaf"
    return simple_layer([{"name": name, "type": "reg", "size": 0}])


def case_bad_xattrs():
    return simple_layer([{"name": "data/x", "type": "reg", "size": 0,
                          "xattrs": {"user.bad": "!!!not base64!!!", "user.num": 7,
                                     "user.good": "aGk="}}])


def case_mode_type_disagree():
    return simple_layer([{"name": "data/m", "type": "reg", "size": 0, "mode": 0o120777},
                         {"name": "data/dev", "type": "char", "mode": 0o100644, "devMajor": 1,
                          "devMinor": 3},
                         {"name": "data/setuid", "type": "reg", "size": 0, "mode": 0o4755}])


def case_unknown_type():
    return simple_layer([{"name": "data/s", "type": "socket"}])


def case_under_a_file():
    return simple_layer([{"name": "etc/hello.txt/inside", "type": "reg", "size": 0}])


def case_landmark_past_end():
    return simple_layer([{"name": ".prefetch.landmark", "type": "reg", "offset": 1 << 40}])


def case_device_numbers_huge():
    return simple_layer([{"name": "data/d", "type": "block", "devMajor": 1 << 40}])


# name -> (builder, expected: "refuse" | "accept", what is tried, documented interpretation)
CASES = {
    "dotdot": (case_dotdot, "refuse", "entry name '../../etc/evil'", None),
    "dotdot-inner": (case_dotdot_inner, "refuse", "entry name 'data/../../evil'", None),
    "absolute": (case_absolute, "accept", "absolute entry name '/abs/file'",
                 "leading '/' stripped: served as abs/file inside the mount"),
    "empty-name": (case_empty_name_reg, "refuse", "empty entry name typed 'reg' (the root)", None),
    "nul-name": (case_nul_name, "refuse", "NUL byte in an entry name", None),
    "nul-linkname": (case_nul_linkname, "refuse", "NUL byte in a symlink target", None),
    "duplicate": (case_duplicate_reg, "accept", "the same file twice with different contents",
                  "later entry wins (as tar extraction), warning recorded"),
    "dir-then-file": (case_dir_then_file, "refuse", "a directory re-declared as a file", None),
    "file-as-parent": (case_under_a_file, "refuse", "an entry under a regular file", None),
    "hardlink-missing": (case_hardlink_missing, "accept", "hardlink to an entry not in the layer",
                         "kept as a link to a file of an earlier layer (issue 12): listed, "
                         "read through the merged view; reading it in the layer alone and "
                         "mounting the layer are refused"),
    "hardlink-later": (case_hardlink_later, "accept", "hardlink to an entry listed later",
                       "resolved after all entries are read; same inode, same bytes"),
    "hardlink-cycle": (case_hardlink_cycle, "refuse", "hardlink cycle a -> b -> a", None),
    "hardlink-self": (case_hardlink_self, "refuse", "hardlink to itself", None),
    "hardlink-escape": (case_hardlink_escape, "refuse", "hardlink to '../../etc/passwd'", None),
    "hardlink-dir": (case_hardlink_to_dir, "refuse", "hardlink to a directory", None),
    "symlink-loop": (case_symlink_loop, "accept", "symlink loop la <-> lb and a '../..' symlink",
                     "symlinks are served as data; the kernel reports ELOOP; nothing resolved "
                     "by the daemon"),
    "chunks-overlap": (case_chunks_overlap, "refuse", "two chunks of a file overlap", None),
    "chunk-gap": (case_chunk_gap, "refuse", "a chunk missing from the middle of a file", None),
    "chunk-past-end": (case_chunk_past_blob_end, "refuse", "chunk offset 10 GiB past the blob end",
                       None),
    "chunk-in-toc": (case_chunk_in_toc_region, "refuse", "chunk offset inside the TOC region",
                     None),
    "chunk-other-file": (case_chunk_points_at_other_file, "accept",
                         "chunk offset pointing at another file's data (digests present)",
                         "chunkDigest mismatch: reading the file fails with EIO, never the "
                         "other file's bytes"),
    "chunk-other-file-nodigest": (case_chunk_points_at_other_file_no_digest, "accept",
                                  "chunk offset pointing at another file's data, no digests",
                                  "served as the (digest-verified) TOC describes it; only with "
                                  "--allow-unverified-free TOC digest pinning is this trusted"),
    "negative-size": (case_negative_size, "refuse", "negative file size", None),
    "negative-chunk": (case_negative_chunk_size, "refuse", "negative chunkSize", None),
    "huge-size": (case_huge_size, "refuse", "file size 2^62 with a 120-byte chunk "
                  "(one chunk declaring 2^62 bytes)", None),
    "size-gt-data": (case_size_larger_than_data, "accept", "size 100 KB larger than the data",
                     "reading fails with EIO (short chunk), never zero-filled or garbage"),
    "toc-bomb": (case_toc_bomb, "refuse", "TOC tar header claims 3 GiB (64 MiB of zeros, 64 KiB "
                 "gzip)", None),
    "deep-300": (case_deep_nesting_ok, "accept", "a file 300 directories deep (implicit dirs)",
                 "served; parent dirs synthesised"),
    "deep-5000": (case_deep_nesting_too_deep, "refuse", "a file 5000 directories deep", None),
    "bad-xattrs": (case_bad_xattrs, "accept", "invalid base64 and non-string xattr values",
                   "invalid xattrs dropped with a warning, valid ones kept"),
    "mode-vs-type": (case_mode_type_disagree, "accept",
                     "mode bits say symlink/regular but type says reg/char; setuid bit",
                     "type wins, file-type bits of mode ignored; setuid kept but the mount is "
                     "nosuid"),
    "unknown-type": (case_unknown_type, "refuse", "unknown entry type 'socket'", None),
    "landmark-past-end": (case_landmark_past_end, "refuse", "prefetch landmark offset past the end",
                          None),
    "huge-devno": (case_device_numbers_huge, "refuse", "device major 2^40", None),
}


@pytest.fixture(scope="module")
def blobs():
    return {k: v[0]() for k, v in CASES.items()}


def _load(tmp_path, blob):
    p = tmp_path / "blob"
    p.write_bytes(blob)

    async def go():
        src = LocalBlobSource(p, "sha256:" + hashlib.sha256(blob).hexdigest(), len(blob))
        ix = await load_layer_index(src)
        files = {}
        for e in ix.iter_entries():
            if e.type in ("reg", "hardlink"):
                try:
                    files[e.path] = await read_file_range(ix, src, e, 0, min(e.size, 1 << 20))
                except CoreError as err:
                    files[e.path] = err
        return ix, files

    return anyio.run(go)


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_layer_core(case, blobs, tmp_path, rel):
    _, expect, tried, interp = CASES[case]
    try:
        ix, files = _load(tmp_path, blobs[case])
    except CoreError as e:
        msg = str(e)
        assert "\n" not in msg and msg
        assert expect == "refuse", f"{case}: refused but expected a safe interpretation: {msg}"
        rel.row("hostile", f"{tried} (core: load_layer_index)", f"refused: {type(e).__name__}: "
                f"{msg[:110]}")
        return
    assert expect == "accept", f"{case}: accepted but must be refused"
    for e in ix.iter_entries():
        p = e.path
        assert "\x00" not in p and not p.startswith("/")
        assert ".." not in p.split("/")
    for c in ix.all_chunks():
        assert 0 <= c.offset < c.end <= ix.toc_offset
    rel.row("hostile", f"{tried} (core)", f"accepted: {interp}")
    _check_interpretation(case, ix, files)


def _check_interpretation(case, ix, files):
    if case == "absolute":
        assert ix.lookup("abs/file") is not None
    elif case == "duplicate":
        assert files["data/f"] == b"second, later version"
        assert any("duplicate" in w for w in ix.warnings)
    elif case == "hardlink-later":
        assert files["data/early"] == GOOD == files["data/target"]
    elif case == "hardlink-missing":
        assert [ix.path_of(i) for i in ix.outside_hardlinks] == ["data/h"]
        assert isinstance(files["data/h"], CoreError)
    elif case == "chunk-other-file":
        assert isinstance(files["data/b"], CoreError)
        assert files["data/a"] == b"A" * 500
    elif case in ("huge-size", "size-gt-data"):
        assert isinstance(files["data/f"], CoreError)
    elif case == "bad-xattrs":
        assert ix.lookup("data/x").xattrs == {"user.good": b"hi"}
        assert len(ix.warnings) >= 2
    elif case == "mode-vs-type":
        m = ix.lookup("data/m")
        assert m.type == "reg" and m.mode == 0o777
        assert ix.lookup("data/dev").type == "char"


def _walk_mount(mp: str) -> dict:
    """Every path under mp: lstat it, read regular files; return results."""
    out = {}
    real_mp = os.path.realpath(mp)
    for dirpath, dirnames, filenames in os.walk(mp, followlinks=False):
        assert os.path.realpath(dirpath).startswith(real_mp)
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, mp)
            st = os.lstat(p)
            # Nothing the daemon serves is a host file: its device is the mount's.
            assert st.st_dev == os.lstat(mp).st_dev, rel
            if os.path.isfile(p) and not os.path.islink(p):
                try:
                    with open(p, "rb") as f:
                        out[rel] = f.read(1 << 20)
                except OSError as e:
                    out[rel] = e
            else:
                out[rel] = st
    return out


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from fuse_helpers import isolated_mount_env

    yield from isolated_mount_env(tmp_path, monkeypatch)


MOUNT_CASES = ["dotdot", "absolute", "nul-name", "duplicate", "hardlink-cycle", "hardlink-later",
               "symlink-loop", "chunk-other-file", "chunk-past-end", "huge-size", "size-gt-data",
               "toc-bomb", "deep-300", "bad-xattrs", "mode-vs-type", "dir-then-file"]


def test_hostile_layers_mounted(blobs, mount_env, tmp_path, rel):
    """Each case through a real `mount` of the layer: refused with one line
    and nothing left behind, or served safely; the daemon stays alive."""
    for case in MOUNT_CASES:
        _, expect, tried, interp = CASES[case]
        layout = tmp_path / f"layout-{case}"
        ref = write_layout(str(layout), [blobs[case]])
        mp = mount_env.mountpoint(f"mnt-{case}")
        r = subprocess.run([sys.executable, "-m", "stargz_tui", "mount", "--layer", "0", ref, mp],
                           capture_output=True, text=True, timeout=90, cwd=ROOT,
                           env=dict(os.environ))
        if expect == "refuse":
            assert r.returncode != 0, f"{case}: mount succeeded: {r.stdout}"
            err = r.stderr.strip()
            assert "Traceback" not in r.stderr and len(err.splitlines()) == 1, (case, r.stderr)
            assert not core_mount.is_mounted(mp) and core_mount.list_mounts() == []
            rel.row("hostile", f"{tried} (stargz-tui mount)", f"refused, exit {r.returncode}: "
                    f"{err[:110]}")
            continue
        assert r.returncode == 0, (case, r.stderr)
        try:
            seen = _walk_mount(mp)
            rec = core_mount.list_mounts()[0]
            pid = rec["layers"][0]["pid"]
            if case == "absolute":
                assert os.path.isfile(os.path.join(mp, "abs/file"))
            elif case == "duplicate":
                assert seen["data/f"] == b"second, later version"
            elif case == "hardlink-later":
                assert seen["data/early"] == GOOD
                assert os.stat(os.path.join(mp, "data/early")).st_ino == os.stat(
                    os.path.join(mp, "data/target")).st_ino
            elif case == "symlink-loop":
                with pytest.raises(OSError) as ei:
                    open(os.path.join(mp, "data/la"))
                assert ei.value.errno == errno.ELOOP
                assert os.readlink(os.path.join(mp, "data/up")) == "../../../../etc"
            elif case in ("chunk-other-file", "huge-size", "size-gt-data"):
                bad = seen["data/b" if case == "chunk-other-file" else "data/f"]
                assert isinstance(bad, OSError) and bad.errno == errno.EIO, (case, bad[:40])
            elif case == "bad-xattrs":
                assert os.getxattr(os.path.join(mp, "data/x"), "user.good") == b"hi"
            elif case == "mode-vs-type":
                import stat as st_mod
                assert st_mod.S_ISREG(os.lstat(os.path.join(mp, "data/m")).st_mode)
                assert st_mod.S_ISCHR(os.lstat(os.path.join(mp, "data/dev")).st_mode)
            os.kill(pid, 0)  # the daemon is alive after serving all of it
            rel.row("hostile", f"{tried} (stargz-tui mount)", f"served: {interp}; daemon alive")
        finally:
            core_mount.unmount(mp, force=True)
        assert not core_mount.is_mounted(mp)
