"""One process serving an image's merged tree (core.mergeddaemon / core.mergedfs)
shows exactly what the kernel overlay over per-layer mounts shows: every
fixture tag against the plain -gzip ground truth (names, types, modes,
owners, mtimes, contents, symlinks, devices, xattrs, hardlinks, whiteouts,
opaque dirs), one process for all layers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from fuse_helpers import (
    ALL_TAGS,
    FIXTURES,
    ROOT,
    compare_tree,
    family,
    layer_blobs,
    merged_expected,
)

pytestmark = pytest.mark.fuse


class MergedServer:
    def __init__(self, image: str, mp: str, cache: str):
        self.image, self.mp, self.cache = image, mp, cache
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "core.mergeddaemon", self.image, self.mp,
             "--cache-dir", self.cache], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=ROOT)
        line = self.proc.stdout.readline()
        assert line.strip() == b"ready", self.proc.stderr.read().decode()
        assert os.path.ismount(self.mp)
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                subprocess.run(["umount", "-l", self.mp], capture_output=True)
            self.proc.stdout.close()
            self.proc.stderr.close()


@pytest.mark.parametrize("tag", ALL_TAGS)
def test_merged_tree_from_one_process_matches_ground_truth(tmp_path, tag):
    truth = layer_blobs(f"{family(tag)}-gzip")
    mp = tmp_path / "mnt"
    mp.mkdir()
    with MergedServer(f"oci:{FIXTURES}:{tag}", str(mp), str(tmp_path / "cache")) as srv:
        # overlayfs keeps its own trusted.overlay.* to itself; so does MergedFS
        compare_tree(str(mp), merged_expected(truth), drop_xattr_prefixes=("trusted.overlay.",))
        if family(tag) == "mini":
            assert not os.path.exists(mp / "usr/lib/app/remove-me.py")
            assert sorted(os.listdir(mp / "data/old")) == ["c.txt"]
        with open("/proc/self/mountinfo") as f:  # one FUSE mount, no overlay
            kinds = [ln.split(" - ")[1].split()[0] for ln in f if f" {mp} " in ln]
        assert kinds == ["fuse.stargz"]
        assert srv.proc.poll() is None
    deadline = time.monotonic() + 10
    while os.path.ismount(mp) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.ismount(mp)
    assert srv.proc.returncode == 0


def test_bad_image_is_one_line_and_no_mount(tmp_path):
    mp = tmp_path / "mnt"
    mp.mkdir()
    p = subprocess.run([sys.executable, "-m", "core.mergeddaemon", f"oci:{FIXTURES}:no-such-tag",
                        str(mp), "--cache-dir", str(tmp_path / "c")], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 1
    assert p.stderr.startswith("stargz-tui: ") and p.stderr.count("\n") == 1, p.stderr
    assert not os.path.ismount(mp)


def _corrupt_shown_chunk(dst, tag: str, path: str) -> str:
    """Copy the fixture layout; flip a byte inside one chunk of ``path`` in
    the layer the merged view shows it from. Returns the image reference."""
    import shutil

    import anyio

    from core.estargz import load_layer_index
    from core.image import open_image
    from core.overlay import MergedTree

    shutil.copytree(FIXTURES, dst)
    ref = f"oci:{dst}:{tag}"

    async def find():
        img = await open_image(ref)
        ixs = [await load_layer_index(img.store.blob_source(d.digest, d.size))
               for d in img.layers]
        layer, e = MergedTree(ixs).lookup(path)
        chunks = ixs[layer].chunks(e)
        assert len(chunks) > 2
        d = img.layers[layer]
        return os.path.join(dst, "blobs", "sha256", d.digest[7:]), chunks[2]

    blob, c = anyio.run(find)
    with open(blob, "r+b") as f:
        pos = (c.offset + c.end) // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))
    return ref


def test_a_bad_chunk_fails_that_read_only(tmp_path):
    import errno

    bad = _corrupt_shown_chunk(tmp_path / "layout", "mini-esgz-64k", "data/text.txt")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    good = f"oci:{FIXTURES}:special-esgz"
    with MergedServer(bad, str(a), str(tmp_path / "ca")) as sa, \
            MergedServer(good, str(b), str(tmp_path / "cb")) as sb:
        for _ in range(2):  # a bad chunk is never cached: the second read fails too
            with open(a / "data/text.txt", "rb") as f:
                assert len(f.read(4096)) == 4096  # the first chunk is fine
                f.seek(0)
                with pytest.raises(OSError) as ei:
                    f.read()
                assert ei.value.errno == errno.EIO
        for name in ("etc/os-release", "data/random.bin", "usr/lib/app/mod_05.py"):
            assert (a / name).read_bytes()
        compare_tree(str(b), merged_expected(layer_blobs("special-gzip")),
                     drop_xattr_prefixes=("trusted.overlay.",))
        assert sa.proc.poll() is None and sb.proc.poll() is None
