"""Decompression bombs and hostile extents (issue 19, holes 4 and 5, weak
spots): every command and daemon stays within a memory bound on them,
measured as a real process's peak RSS (``ru_maxrss`` from ``wait4`` for a
CLI command, ``VmHWM`` for a mount daemon).

The blobs are built here: chunk bombs (a small compressed chunk declared
as, and inflating to, far more than writers ever make), a plain tar+zstd
layer holding a 2 GiB file, and junk between a file's chunk and the TOC.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import zstandard
from rel_layers import BlobBuilder, _member, _tar_header, sha256, write_layout

pytestmark = [pytest.mark.reliability]

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CLI = [os.path.join(ROOT, ".venv", "bin", "stargz-tui")]
if not os.path.exists(CLI[0]):
    CLI = [sys.executable, "-m", "stargz_tui"]
RSS_LIMIT_MB = 256
# A TOC at the documented limits (issue 17 raised them so that a 1M-entry
# layer mounts: core.estargz.toc.MAX_ENTRIES, core.estargz.loader.MAX_TOC_BYTES)
# costs more than that to index; this is its bound. Bombs past the limits
# are still refused under RSS_LIMIT_MB.
TOC_LIMIT_RSS_MB = 1536
ZEROS = bytes(16 << 20)


# Runs the command in a grandchild and reports its peak RSS. Measured
# straight from the test process, ru_maxrss would be polluted by the test's
# own: a vforked child's RSS high-water mark at exec is its parent's. A
# child forked from this small launcher starts at the launcher's size.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(ru.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def run_measured(args: list[str], *, timeout: float = 120,
                 stdout=subprocess.PIPE) -> tuple[int, str, str, float, float]:
    """Run the CLI; (exit status, stdout, stderr, peak RSS in MB, seconds).
    A run past ``timeout`` is killed (status -9, peak unknown: inf)."""
    import signal
    import tempfile

    fd, rss_file = tempfile.mkstemp(prefix="sgz-rss-")
    os.close(fd)
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", _LAUNCHER, rss_file, *CLI, *args],
                         stdout=stdout, stderr=subprocess.PIPE, cwd=ROOT, env=dict(os.environ),
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        rc = -9
    took = time.monotonic() - t0
    try:
        with open(rss_file) as f:
            peak = int(f.read() or 0) / 1024 if rc != -9 else float("inf")
    finally:
        os.unlink(rss_file)
    return (rc if rc < 128 else rc - 256, (out or b"").decode(errors="replace"),
            err.decode(errors="replace"), peak, took)


def _zstd_tar_bomb(size: int) -> bytes:
    """tar+zstd of one file of ``size`` zero bytes (tens of KB compressed)."""
    cobj = zstandard.ZstdCompressor(level=3).compressobj()
    out = [cobj.compress(_tar_header("big/zeros.bin", size))]
    left = size
    while left:
        n = min(left, len(ZEROS))
        out.append(cobj.compress(ZEROS[:n]))
        left -= n
    out.append(cobj.compress(b"\0" * ((512 - size % 512) % 512 + 1024)))
    out.append(cobj.flush())
    return b"".join(out)


def test_plain_zstd_layer_bomb_bounded(tmp_path, rel):
    size = 2 << 30
    blob = _zstd_tar_bomb(size)
    ref = write_layout(str(tmp_path / "plain-bomb"), [blob], annotate_toc=False,
                       layer_media_type="application/vnd.oci.image.layer.v1.tar+zstd")
    rc, out, err, peak, took = run_measured(["ls", "-l", "--layer", "0", ref, "big"], timeout=90)
    assert rc == 0, (rc, err[-500:])
    assert "zeros.bin" in out and str(size) in out, out
    assert peak <= RSS_LIMIT_MB, f"ls --layer 0 peaked at {peak:.0f} MB"
    rc2, _o, err2, peak2, took2 = run_measured(["verify", "--full", "--layer", "0", ref],
                                               timeout=90)
    assert "Traceback" not in err2, err2[-800:]
    assert peak2 <= RSS_LIMIT_MB, f"verify --full peaked at {peak2:.0f} MB"
    rc3, _o, err3, peak3, took3 = run_measured(["cat", "--layer", "0", ref, "big/zeros.bin"],
                                               timeout=90, stdout=subprocess.DEVNULL)
    assert rc3 == 0, err3[-500:]
    assert peak3 <= RSS_LIMIT_MB, f"cat peaked at {peak3:.0f} MB"
    rel.row("crash", f"plain tar+zstd layer of {len(blob) >> 10} KB holding a 2 GiB file of "
            "zeros: `ls -l --layer 0`, `verify --full --layer 0`, `cat --layer 0` of the file",
            f"listed in {took:.1f} s at {peak:.0f} MB peak RSS; verify {took2:.1f} s, "
            f"{peak2:.0f} MB; cat {took3:.1f} s, {peak3:.0f} MB (bound {RSS_LIMIT_MB} MB): "
            "decompressed in bounded pieces, file payloads skipped")


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.dirname(HERE))
    from fuse_helpers import isolated_mount_env

    yield from isolated_mount_env(tmp_path, monkeypatch)


def _gzip_zeros(size: int) -> tuple[bytes, str]:
    """One gzip member of ``size`` zero bytes, and their sha256 digest."""
    from isal import isal_zlib

    co = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
    h = __import__("hashlib").sha256()
    out = []
    left = size
    while left:
        n = min(left, len(ZEROS))
        out.append(co.compress(ZEROS[:n]))
        h.update(ZEROS[:n])
        left -= n
    out.append(co.flush())
    return b"".join(out), "sha256:" + h.hexdigest()


def _chunk_bomb_layer(size: int) -> bytes:
    """An eStargz blob with one file declared (and digest-pinned) as a
    single chunk of ``size`` zero bytes, next to a small good file."""
    b = BlobBuilder()
    good = b.add_file("data/ok.txt", b"fine\n")
    b.buf.write(_member(_tar_header("data/zeros.bin", size)))
    off = b.buf.tell()
    member, digest = _gzip_zeros(size)
    b.buf.write(member)
    bomb = {"name": "data/zeros.bin", "type": "reg", "size": size, "mode": 0o644,
            "offset": off, "digest": digest, "chunkDigest": digest}
    return b.finish({"version": 1, "entries": [{"name": "data/", "type": "dir"}, *good, bomb]})


def _zstd_chunked_bomb_layer(size: int) -> tuple[bytes, str]:
    """A zstd:chunked blob: one file declared (and digest-pinned) as a
    single chunk of ``size`` zero bytes in one zstd frame, the TOC frame and
    the footer; and the TOC digest."""
    import hashlib
    import json
    import struct

    cobj = zstandard.ZstdCompressor(level=3).compressobj()
    h = hashlib.sha256()
    frame = []
    left = size
    while left:
        n = min(left, len(ZEROS))
        frame.append(cobj.compress(ZEROS[:n]))
        h.update(ZEROS[:n])
        left -= n
    frame.append(cobj.flush())
    frame = b"".join(frame)
    digest = "sha256:" + h.hexdigest()
    end = len(frame)
    toc = json.dumps({"version": 1, "entries": [
        {"name": "data/", "type": "dir"},
        {"name": "data/zeros.bin", "type": "reg", "size": size, "mode": 0o644, "offset": 0,
         "endOffset": end, "digest": digest, "chunkDigest": digest}]}).encode()
    toc_frame = zstandard.ZstdCompressor().compress(toc)
    footer = struct.pack("<IIQQQQ", 0x184D2A50, 40, end, len(toc_frame), len(toc), 1) + b"GnUlInUx"
    return frame + toc_frame + footer, sha256(toc)


@pytest.mark.parametrize("fmt", ["estargz", "zstdchunked"])
def test_chunk_bomb_refused_bounded(fmt, mount_env, tmp_path, rel):
    if fmt == "estargz":
        blob = _chunk_bomb_layer(3 << 30)
        ref = write_layout(str(tmp_path / "chunk-bomb"), [blob])
    else:
        blob, toc_digest = _zstd_chunked_bomb_layer(3 << 30)

        def annotate(m):
            m["layers"][0]["annotations"]["containerd.io/snapshot/stargz/toc.digest"] = toc_digest
            return m

        ref = write_layout(str(tmp_path / "chunk-bomb"), [blob], annotate_toc=False,
                           manifest_override=annotate,
                           layer_media_type="application/vnd.oci.image.layer.v1.tar+zstd")
    seen = []
    for args, what in ((["cat", "--layer", "0", ref, "data/zeros.bin"], "cat"),
                       (["verify", "--full", "--layer", "0", ref], "verify --full")):
        rc, _out, err, peak, took = run_measured(args, timeout=90, stdout=subprocess.DEVNULL)
        assert rc != 0 and rc != -9, (what, rc, err[-300:])
        assert "Traceback" not in err, err[-800:]
        assert "32 MiB" in err, (what, err[-300:])
        assert peak <= RSS_LIMIT_MB, f"{what} peaked at {peak:.0f} MB"
        seen.append(f"{what}: exit {rc}, {peak:.0f} MB, {took:.1f} s")
    mp = mount_env.mountpoint("mnt-bomb")
    rc, _out, err, peak, took = run_measured(["mount", "--layer", "0", ref, mp], timeout=90)
    assert rc != 0, "a layer declaring a 3 GiB chunk was mounted"
    assert len(err.strip().splitlines()) == 1 and "32 MiB" in err, err
    seen.append(f"mount: refused, exit {rc}, {peak:.0f} MB")
    line = [ln for ln in err.splitlines() if "32 MiB" in ln][0]
    rel.row("hostile", f"chunk bomb: {fmt} file declared and digest-pinned as one 3 GiB chunk "
            f"of zeros ({len(blob) >> 10} KB blob)",
            f"refused when the TOC is indexed, one line ({line.strip()[:100]}); "
            + "; ".join(seen) + f" (bound {RSS_LIMIT_MB} MB)")


def test_chunk_at_limit_streams_once(tmp_path, rel):
    """A file of one large allowed chunk: `cat` inflates it once (not once
    per output window), within the memory bound."""
    from core.estargz.toc import MAX_CHUNK_BYTES

    size = MAX_CHUNK_BYTES - (2 << 20)
    blob = _chunk_bomb_layer(size)
    ref = write_layout(str(tmp_path / "big-chunk"), [blob])
    out = tmp_path / "out"
    with open(out, "wb") as f:
        rc, _o, err, peak, took = run_measured(["cat", "--layer", "0", ref, "data/zeros.bin"],
                                               timeout=120, stdout=f)
    assert rc == 0, err[-500:]
    assert os.path.getsize(out) == size
    assert peak <= RSS_LIMIT_MB, f"cat of a {size >> 20} MiB chunk peaked at {peak:.0f} MB"
    # what cat streams (core.estargz.iter_file), against a counting source:
    # the chunk is fetched (and inflated) once, not once per 8 MiB window
    import hashlib

    import anyio

    from core.estargz import iter_file, load_layer_index
    from core.source import LocalBlobSource

    path = tmp_path / "blob"
    path.write_bytes(blob)

    async def stream() -> tuple[int, int, int]:
        src = LocalBlobSource(path, "sha256:" + hashlib.sha256(blob).hexdigest(), len(blob))
        ix = await load_layer_index(src)
        e = ix.lookup("data/zeros.bin")
        (c,) = ix.chunks(e)
        before = src.bytes_read
        n = 0
        async for piece in iter_file(ix, src, e):
            n += len(piece)
        return n, src.bytes_read - before, c.end - c.offset

    n, read, extent = anyio.run(stream)
    assert n == size
    assert read <= extent, f"cat read {read} compressed bytes for a {extent}-byte extent"
    rel.row("crash", f"`cat` of a file held in one {size >> 20} MiB chunk (the limit is "
            f"{MAX_CHUNK_BYTES >> 20} MiB)",
            f"inflated once ({read} compressed bytes read): {took:.1f} s, {peak:.0f} MB peak "
            f"RSS (bound {RSS_LIMIT_MB} MB)")


def _vm_hwm_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_junk_before_toc_not_fetched(mount_env, tmp_path, rel):
    """300 MB of junk after a 5-byte file's chunk (then three files of one
    chunk near the limit each): `cat`, a mount without background fetch, and a
    daemon fetching everything in the background stay bounded."""
    b = BlobBuilder()
    ents = b.add_file("data/five", b"12345")
    b.buf.write(os.urandom(300 << 20))  # junk between the chunk and the next one
    from core.estargz.toc import MAX_CHUNK_BYTES

    big = MAX_CHUNK_BYTES - (2 << 20)
    member, digest = _gzip_zeros(big)
    for k in range(3):
        name = f"data/zeros{k}"
        b.buf.write(_member(_tar_header(name, big)))
        ents.append({"name": name, "type": "reg", "size": big, "mode": 0o644,
                     "offset": b.buf.tell(), "digest": digest, "chunkDigest": digest})
        b.buf.write(member)
    blob = b.finish({"version": 1, "entries": [{"name": "data/", "type": "dir"}, *ents]})
    ref = write_layout(str(tmp_path / "junk"), [blob])
    del blob
    rc, out, err, peak, took = run_measured(["cat", "--layer", "0", ref, "data/five"], timeout=90)
    assert rc == 0 and out == "12345", (rc, err[-300:])
    assert peak <= 100, f"cat of a 5-byte file peaked at {peak:.0f} MB"
    from core import mount as core_mount

    mp = mount_env.mountpoint("mnt-junk")
    mount_env.mount(ref, mp, layer=0, prefetch=False, background_fetch=False)
    try:
        with open(os.path.join(mp, "data/five"), "rb") as f:
            assert f.read() == b"12345"
        fetched = mount_env.status(mp)["bytesFetched"]
    finally:
        core_mount.unmount(mp, force=True)
    assert fetched < 1 << 20, f"the mount fetched {fetched} bytes for a 5-byte file"
    mp = mount_env.mountpoint("mnt-junk-bg")
    mount_env.mount(ref, mp, layer=0, background_fetch=True, silence=0)
    try:
        st = mount_env.wait_for(mp, lambda s: s["backgroundFetchDone"], timeout=120)
        hwm = _vm_hwm_mb(st["layers"][0]["pid"])
        bg_fetched = st["bytesFetched"]
        with open(os.path.join(mp, "data/zeros2"), "rb") as f:
            assert f.read() == bytes(big)
    finally:
        core_mount.unmount(mp, force=True)
    assert hwm <= RSS_LIMIT_MB, f"the daemon peaked at {hwm:.0f} MB"
    assert bg_fetched < 10 << 20, f"the background fetch read {bg_fetched} bytes"
    rel.row("hostile", "300 MB of junk between a 5-byte file's chunk and the next chunk (three "
            f"files of one {big >> 20} MiB chunk each): `cat`, a mount without background fetch, a "
            "daemon fetching everything in the background",
            f"cat: {peak:.0f} MB peak RSS; the mount fetched {fetched} bytes for the 5-byte "
            f"file; the background fetch {bg_fetched} bytes, daemon peak {hwm:.0f} MB (bound "
            f"{RSS_LIMIT_MB} MB): a chunk's extent is cut to what its bytes can take, never "
            "the gap")


@pytest.mark.parametrize("footer", ["honest", "lying"])
def test_toc_bomb_message_says_which_bound(footer, rel):
    """A zstd:chunked TOC that inflates past a bound is refused with a
    message naming the bound it broke: an honest footer is not called a liar."""
    from core.errors import FormatError
    from core.estargz.footer import Footer, Format
    from core.estargz.loader import parse_toc_region

    size = 32 << 20 if footer == "honest" else 2 << 20
    region = zstandard.ZstdCompressor().compress(bytes(size))
    said = size if footer == "honest" else 1 << 20
    f = Footer(format=Format.ZSTDCHUNKED, footer_size=48, toc_offset=0, toc_size=len(region),
               toc_uncompressed_size=said)
    with pytest.raises(FormatError) as ei:
        parse_toc_region(f, region, blob_digest="sha256:" + "0" * 64, blob_size=len(region) + 48)
    msg = str(ei.value)
    if footer == "honest":
        assert "footer" not in msg and "decompression bomb" in msg, msg
    else:
        assert f"{said} bytes its footer says" in msg, msg
    rel.row("hostile", f"zstd:chunked TOC of {len(region)} compressed bytes inflating to "
            f"{size >> 20} MiB, its footer {'honest' if footer == 'honest' else 'saying 1 MiB'}",
            f"refused: {msg}")


def _toc_layout(root: str, entries: list[bytes]) -> str:
    raw = b'{"version":1,"entries":[' + b",".join(entries) + b"]}"
    return write_layout(root, [BlobBuilder().finish(raw)])


def _minimal_entries(n: int) -> list[bytes]:
    return [b'{"name":"d/%d/%d","type":"reg"}' % (i // 1000, i) for i in range(n)]


def _full_entries(budget: int, max_entries: int) -> list[bytes]:
    """Entries as writers state them (owner, time, digests, offsets), up to
    ``budget`` bytes of JSON in at most ``max_entries`` entries (names made
    longer to fill it)."""
    pad = b"x" * max(0, budget // max_entries - 258)
    out, size, i = [], 0, 0
    while len(out) < max_entries:
        e = (b'{"name":"usr/lib/python3/site-packages/pkg%d/module_%d%s.py","type":"reg",'
             b'"size":0,"modtime":"2024-01-01T00:00:00Z","mode":420,"uid":0,"gid":0,'
             b'"userName":"root","groupName":"root","digest":"sha256:%064x"}'
             % (i // 100, i, pad, i))
        if size + len(e) + 64 > budget:
            break
        out.append(e)
        size += len(e) + 1
        i += 1
    return out


def test_toc_entry_limit_holds_memory(mount_env, tmp_path, rel):
    """A TOC at the documented limits (entries, and size for entries that
    say more) indexes under its memory bound (TOC_LIMIT_RSS_MB); a
    5M-entry TOC is refused with one line under RSS_LIMIT_MB."""
    from core.estargz.loader import MAX_TOC_BYTES
    from core.estargz.toc import MAX_ENTRIES

    seen = []
    for what, entries in ((f"{MAX_ENTRIES} minimal entries (the entry limit)",
                           _minimal_entries(MAX_ENTRIES)),
                          (f"{MAX_TOC_BYTES >> 20} MiB of full entries (the size limit)",
                           _full_entries(MAX_TOC_BYTES, MAX_ENTRIES))):
        ref = _toc_layout(str(tmp_path / f"toc-{len(seen)}"), entries)
        n = len(entries)
        del entries
        rc, out, err, peak, took = run_measured(["ls", "--layer", "0", ref], timeout=600)
        assert rc == 0, (what, err[-300:])
        assert peak <= TOC_LIMIT_RSS_MB, f"ls of a TOC of {what} peaked at {peak:.0f} MB"
        # the same TOC resolved by a mount daemon
        mp = mount_env.mountpoint(f"mnt-toc-{len(seen)}")
        mount_env.mount(ref, mp, layer=0, prefetch=False, background_fetch=False)
        try:
            hwm = _vm_hwm_mb(mount_env.status(mp)["layers"][0]["pid"])
        finally:
            from core import mount as core_mount

            core_mount.unmount(mp, force=True)
        assert hwm <= TOC_LIMIT_RSS_MB, f"a daemon serving a TOC of {what} peaked at {hwm:.0f} MB"
        seen.append(f"{n} entries: ls {peak:.0f} MB, {took:.1f} s; daemon {hwm:.0f} MB")
    ref = _toc_layout(str(tmp_path / "toc-5m"), _minimal_entries(5_000_000))
    rc, out, err, peak, took = run_measured(["ls", "--layer", "0", ref], timeout=120)
    assert rc not in (0, -9) and len(err.strip().splitlines()) == 1, (rc, err[-300:])
    assert "Traceback" not in err
    assert peak <= RSS_LIMIT_MB, f"refusing a 5M-entry TOC peaked at {peak:.0f} MB"
    rel.row("crash", f"TOCs at the documented limits ({MAX_ENTRIES} entries, "
            f"{MAX_TOC_BYTES >> 20} MiB of JSON) and a 5M-entry TOC: `ls --layer 0`, a mount "
            "daemon",
            "served at " + "; ".join(seen) + f" (bound {TOC_LIMIT_RSS_MB} MB); 5M entries "
            f"refused ({err.strip()[:90]}) at {peak:.0f} MB (bound {RSS_LIMIT_MB} MB)")


@pytest.mark.parametrize("shape", ["long array", "nested arrays"])
def test_toc_value_bomb_refused_bounded(shape, tmp_path, rel):
    """A small TOC whose one field holds a huge array (100M numbers, or 2M
    nested arrays), each a Python object once decoded, is refused with one
    line under RSS_LIMIT_MB: the decoder takes most fields as any JSON
    value, so the TOC's bytes alone do not bound its memory."""
    inner = b"0," * 100_000_000 + b"0" if shape == "long array" else (b"[" * 2_000_000) + (b"]" * 2_000_000)
    ref = _toc_layout(str(tmp_path / "toc"), [b'{"name":"a","type":"reg","devMajor":[' + inner + b"]}"])
    del inner
    rc, out, err, peak, took = run_measured(["ls", "--layer", "0", ref], timeout=300)
    assert rc not in (0, -9) and len(err.strip().splitlines()) == 1, (rc, err[-300:])
    assert "Traceback" not in err
    assert peak <= RSS_LIMIT_MB, f"refusing a TOC with {shape} peaked at {peak:.0f} MB"
    rel.row("hostile", f"a one-entry TOC whose devMajor holds {shape} "
            f"({'100M numbers' if shape == 'long array' else '2M levels'})",
            f"refused ({err.strip()[:90]}) at {peak:.0f} MB (bound {RSS_LIMIT_MB} MB)")


def test_window_read_does_not_hold_the_chunk(tmp_path, rel):
    """A read of a few KiB inside a large chunk (the app's preview,
    extraction's pieces) inflates and verifies the chunk a piece at a time
    and keeps only the window: the memory it allocates at its peak is a
    fraction of the chunk (traced in this process)."""
    import hashlib
    import tracemalloc

    import anyio

    from core.errors import ChunkDigestError
    from core.estargz import load_layer_index, read_file_range
    from core.estargz.toc import MAX_CHUNK_BYTES
    from core.source import LocalBlobSource

    size = MAX_CHUNK_BYTES - (2 << 20)
    blob = _chunk_bomb_layer(size)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    src = LocalBlobSource(path, "sha256:" + hashlib.sha256(blob).hexdigest(), len(blob))
    ix = anyio.run(load_layer_index, src)
    e = ix.lookup("data/zeros.bin")

    async def window(off: int, n: int) -> bytes:
        return await read_file_range(ix, src, e, off, n)

    tracemalloc.start()
    try:
        got = anyio.run(window, size // 2, 4096)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == bytes(4096)
    assert peak < size // 8, f"a 4 KiB read of a {size >> 20} MiB chunk allocated {peak} bytes"
    # the window is still verified against the chunk digest: a lying one fails
    from core.estargz.chunks import decode_chunk_window

    c = ix.chunks(e)[0]
    lying = c._replace(digest="sha256:" + "0" * 64)
    with pytest.raises(ChunkDigestError):
        decode_chunk_window(ix.format, blob[c.offset : c.end], lying, 0, 4096)
    rel.row("crash", f"a 4 KiB read in the middle of a {size >> 20} MiB chunk (uncached read "
            "path: app preview, extraction)",
            f"{peak >> 10} KiB allocated at the peak: inflated and hashed a piece at a time, "
            "only the window kept; still verified against the chunk digest")
