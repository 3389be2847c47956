"""Deterministic content for the benchmark layers (plain tar files).

Three layers, scaled down by ``scale`` for ``--quick`` runs:

* ``big``: ~300 MB of compressed blob over a few thousand files (mostly
  incompressible data, some text, a few multi-chunk files) with one small
  file, ``etc/app/settings.conf``, halfway through the blob (B1, B6, B7);
* ``text``: one 256 MiB text-ish file, ``data/big.txt`` (B2, B3); its bytes
  are also what the memory-backed ceiling filesystem serves;
* ``many``: ~100k entries (dirs of tiny files) (B4, B5, B8).
"""

from __future__ import annotations

import io
import random
import tarfile

MiB = 1 << 20
SMALL_FILE = "etc/app/settings.conf"
TEXT_FILE = "data/big.txt"

_WORDS = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua container image layer chunk digest "
    "registry manifest snapshot overlay mount lazy pull stargz zstd gzip index table "
    "content offset kernel page cache fuse daemon request range fetch verify prefetch"
).split()
_BLOCK = MiB
_base_cache: dict[int, bytes] = {}


def _text_base(seed: int) -> bytes:
    base = _base_cache.get(seed)
    if base is None:
        rnd = random.Random(seed)
        lines = []
        size = 0
        while size < 9 * MiB:
            n = rnd.randint(4, 16)
            line = " ".join(rnd.choices(_WORDS, k=n)) + ("." if rnd.random() < 0.7 else ",")
            if rnd.random() < 0.1:
                line = f"{rnd.randint(0, 1 << 30):x} {line}"
            lines.append(line)
            size += len(line) + 1
        base = "\n".join(lines).encode()
        _base_cache[seed] = base
    return base


def text_block(k: int, seed: int = 7) -> bytes:
    """The ``k``-th MiB of the text stream (each block distinct)."""
    base = _text_base(seed)
    start = (k * 2_654_435_761) % (len(base) - _BLOCK)
    head = b"block %08d\n" % k
    return head + base[start : start + _BLOCK - len(head)]


def text_bytes(size: int, seed: int = 7) -> bytes:
    """``size`` bytes of the text stream (what ``data/big.txt`` holds)."""
    out = bytearray()
    k = 0
    while len(out) < size:
        out += text_block(k, seed)
        k += 1
    del out[size:]
    return bytes(out)


class _Stream(io.RawIOBase):
    """A read-only stream over a block generator (for ``TarFile.addfile``)."""

    def __init__(self, size: int, block):
        self.size = size
        self.block = block
        self.pos = 0
        self.k = 0
        self.buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.pos >= self.size:
            return 0
        if not self.buf:
            self.buf = self.block(self.k)
            self.k += 1
        n = min(len(b), len(self.buf), self.size - self.pos)
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        self.pos += n
        return n


def _info(name: str, size: int = 0, *, dir: bool = False) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mtime = 1_700_000_000
    ti.uname = ti.gname = "root"
    if dir:
        ti.type = tarfile.DIRTYPE
        ti.mode = 0o755
    else:
        ti.size = size
        ti.mode = 0o644
    return ti


def _add_file(tf: tarfile.TarFile, name: str, size: int, block) -> None:
    tf.addfile(_info(name, size), io.BufferedReader(_Stream(size, block), 1 << 20))


def write_big(path: str, scale: float = 1.0) -> dict:
    """~300 MB compressed at scale 1 (``scale`` shrinks it)."""
    rnd = random.Random(11)
    total = int(330 * MiB * scale)
    files = []
    size = 0
    i = 0
    while size < total:
        r = rnd.random()
        if r < 0.005:
            n = rnd.randint(6 * MiB, 20 * MiB)
        elif r < 0.15:
            n = rnd.randint(64 << 10, 1 * MiB)
        else:
            n = rnd.randint(512, 32 << 10)
        n = min(n, max(1, total - size))
        kind = "bin" if rnd.random() < 0.75 else "txt"
        files.append((f"usr/share/d{i // 100:03d}/f{i:05d}.{kind}", n, kind))
        size += n
        i += 1
    half = len(files) // 2
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        dirs = set()
        for idx, (name, n, kind) in enumerate(files):
            if idx == half:
                tf.addfile(_info("etc", dir=True))
                tf.addfile(_info("etc/app", dir=True))
                conf = b"".join(b"option_%03d = %d\n" % (j, j * 7) for j in range(40))
                tf.addfile(_info(SMALL_FILE, len(conf)), io.BytesIO(conf))
            d = name.rsplit("/", 1)[0]
            if d not in dirs:
                parts = d.split("/")
                for j in range(1, len(parts) + 1):
                    p = "/".join(parts[:j])
                    if p not in dirs:
                        dirs.add(p)
                        tf.addfile(_info(p, dir=True))
            seed = idx * 31 + 5
            if kind == "bin":
                rb = random.Random(seed)
                _add_file(tf, name, n, lambda k, rb=rb: rb.randbytes(MiB))
            else:
                _add_file(tf, name, n, lambda k, s=seed: text_block(k + s, 3))
    return {"files": len(files), "bytes": size}


def write_text(path: str, size: int) -> dict:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(_info("data", dir=True))
        _add_file(tf, TEXT_FILE, size, text_block)
    return {"files": 1, "bytes": size}


def write_many(path: str, entries: int) -> dict:
    """About ``entries`` entries: 100 top dirs x 10 subdirs of tiny files."""
    top = max(1, min(100, entries // 1000))
    per_dir = max(1, entries // (top * 10) - 1)
    n = 1
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(_info("srv", dir=True))
        for a in range(top):
            tf.addfile(_info(f"srv/t{a:03d}", dir=True))
            n += 1
            for b in range(10):
                d = f"srv/t{a:03d}/s{b}"
                tf.addfile(_info(d, dir=True))
                n += 1
                for c in range(per_dir):
                    body = b"entry %d %d %d\n" % (a, b, c) * (c % 5)
                    tf.addfile(_info(f"{d}/file-{c:04d}.txt", len(body)), io.BytesIO(body))
                    n += 1
    return {"files": n, "bytes": 0}


# -- B11/B12: images of many layers, many images ------------------------------------
LAYERED_FILE = "etc/app/settings.conf"  # in the bottom layer of every B11 image
FLEET_FILE = "etc/fleet.conf"  # B12: each image's own, in its top layer


def write_tree_part(path: str, entries: int, part: int, parts: int) -> dict:
    """Layer ``part`` of ``parts`` of one final tree of about ``entries``
    entries (B11): 20 top dirs ``srv/tNN`` x 10 subdirs of tiny files, top dir
    ``a`` in layer ``a % parts``; every layer has ``srv/`` (a directory the
    merged view joins from all of them), the bottom one the small file
    :data:`LAYERED_FILE`. ``parts=1`` is the same final tree as one layer."""
    per_dir = max(1, entries // 200 - 1)
    n = 0
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        if part == 0:
            tf.addfile(_info("etc", dir=True))
            tf.addfile(_info("etc/app", dir=True))
            conf = b"".join(b"option_%03d = %d\n" % (j, j * 7) for j in range(40))
            tf.addfile(_info(LAYERED_FILE, len(conf)), io.BytesIO(conf))
            n += 3
        tf.addfile(_info("srv", dir=True))
        n += 1
        for a in range(part, 20, parts):
            tf.addfile(_info(f"srv/t{a:03d}", dir=True))
            n += 1
            for b in range(10):
                d = f"srv/t{a:03d}/s{b}"
                tf.addfile(_info(d, dir=True))
                n += 1
                for c in range(per_dir):
                    body = b"entry %d %d %d\n" % (a, b, c) * (c % 5)
                    tf.addfile(_info(f"{d}/file-{c:04d}.txt", len(body)), io.BytesIO(body))
                    n += 1
    return {"files": n, "bytes": 0}


def fleet_conf(image: int) -> bytes:
    """What :data:`FLEET_FILE` of B12's image ``image`` holds (its top layer's)."""
    return b"".join(b"image %d line %02d\n" % (image, j) for j in range(30))


def write_fleet_layer(path: str, image: int, layer: int, files: int = 40) -> dict:
    """Layer ``layer`` (0..2) of B12's image ``image``: a few small files of its
    own; layers 0 and 2 both hold :data:`FLEET_FILE`, so the merged view must
    show the top one (:func:`fleet_conf`)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        d = f"opt/img{image:02d}/l{layer}"
        for p in ("opt", f"opt/img{image:02d}", d):
            tf.addfile(_info(p, dir=True))
        for c in range(files):
            body = b"image %d layer %d file %d\n" % (image, layer, c) * (1 + c % 7)
            tf.addfile(_info(f"{d}/f{c:03d}.txt", len(body)), io.BytesIO(body))
        if layer in (0, 2):
            conf = fleet_conf(image) if layer == 2 else b"stale, hidden by the top layer\n"
            tf.addfile(_info("etc", dir=True))
            tf.addfile(_info(FLEET_FILE, len(conf)), io.BytesIO(conf))
    return {"files": files, "bytes": 0}
