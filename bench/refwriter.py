"""A small, pure-Python eStargz writer used only by the benchmarks.

The suite prefers the project's writer (``core.estargz.writer``); this one is
the fallback so the harness (and the Go peer column) can run before or
without it. It follows stargz-snapshotter's layout: a ``.no.prefetch.landmark``
first, every chunk of a regular file starting a fresh gzip member, the TOC as
a ``stargz.index.json`` tar entry in its own member, then the 51-byte footer.
Supports directories, regular files, symlinks and hardlinks (enough for the
benchmark layers).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import time
from dataclasses import dataclass

from isal import isal_zlib

from core.estargz.footer import estargz_footer

TOC_NAME = "stargz.index.json"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"


@dataclass
class WrittenLayer:
    path: str
    digest: str  # sha256 of the blob
    size: int
    diff_id: str  # sha256 of the uncompressed tar stream
    uncompressed_size: int
    toc_digest: str


class _Out:
    def __init__(self, f, level: int):
        self.f = f
        self.level = level
        self.n = 0
        self.gz = None
        self.blob = hashlib.sha256()
        self.diff = hashlib.sha256()
        self.diff_n = 0

    def _emit(self, b: bytes) -> None:
        if b:
            self.f.write(b)
            self.n += len(b)
            self.blob.update(b)

    def open(self) -> None:
        if self.gz is None:
            self.gz = isal_zlib.compressobj(self.level, isal_zlib.DEFLATED, 31)

    def close(self) -> None:
        if self.gz is not None:
            self._emit(self.gz.flush())
            self.gz = None

    def write(self, data: bytes) -> None:
        self.open()
        self.diff.update(data)
        self.diff_n += len(data)
        self._emit(self.gz.compress(data))


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _pad(n: int) -> bytes:
    return b"\0" * ((512 - n % 512) % 512)


def write_estargz(tar_path: str, out_path: str, *, chunk_size: int = 4 << 20,
                  level: int = 1) -> WrittenLayer:
    """Convert the plain tar at ``tar_path`` to an eStargz blob at ``out_path``."""
    entries: list[dict] = []
    with open(out_path, "wb") as f, tarfile.open(tar_path, "r:") as tf:
        w = _Out(f, level)

        def add_reg(info: tarfile.TarInfo, reader) -> None:
            w.open()
            w.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            ent = {"name": info.name, "type": "reg", "size": info.size,
                   "modtime": _rfc3339(info.mtime), "mode": info.mode,
                   "uid": info.uid, "gid": info.gid,
                   "userName": info.uname, "groupName": info.gname}
            if info.size == 0:
                entries.append(ent)
                return
            file_digest = hashlib.sha256()
            written = 0
            while written < info.size:
                n = min(chunk_size, info.size - written)
                if n == chunk_size:
                    ent["chunkSize"] = n
                data = reader.read(n)
                if len(data) != n:
                    raise OSError(f"short read of {info.name} from {tar_path}")
                w.close()
                w.open()
                ent["offset"] = w.n
                ent["chunkOffset"] = written
                ent["chunkDigest"] = "sha256:" + hashlib.sha256(data).hexdigest()
                file_digest.update(data)
                w.write(data)
                entries.append(ent)
                written += n
                ent = {"name": info.name, "type": "chunk"}
            w.write(_pad(info.size))
            # The file digest goes on the file's first ("reg") entry.
            for e in reversed(entries):
                if e["type"] == "reg" and e["name"] == info.name:
                    e["digest"] = "sha256:" + file_digest.hexdigest()
                    break

        landmark = tarfile.TarInfo(NO_PREFETCH_LANDMARK)
        landmark.size = 1
        landmark.mode = 0o644

        class _One:
            def read(self, n):
                return b"\x0f"[:n]

        add_reg(landmark, _One())
        for info in tf:
            if info.isreg():
                add_reg(info, tf.extractfile(info))
                continue
            w.open()
            w.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            ent = {"name": info.name, "modtime": _rfc3339(info.mtime), "mode": info.mode,
                   "uid": info.uid, "gid": info.gid,
                   "userName": info.uname, "groupName": info.gname}
            if info.isdir():
                ent["type"] = "dir"
            elif info.issym():
                ent["type"] = "symlink"
                ent["linkName"] = info.linkname
            elif info.islnk():
                ent["type"] = "hardlink"
                ent["linkName"] = info.linkname
            else:
                raise ValueError(f"bench writer: unsupported tar member {info.name!r}")
            entries.append(ent)
        w.close()
        toc_offset = w.n
        toc = json.dumps({"version": 1, "entries": entries}, separators=(",", ":")).encode()
        toc_digest = "sha256:" + hashlib.sha256(toc).hexdigest()
        ti = tarfile.TarInfo(TOC_NAME)
        ti.size = len(toc)
        ti.mode = 0o644
        w.write(ti.tobuf(tarfile.USTAR_FORMAT))
        w.write(toc)
        w.write(_pad(len(toc)))
        w.write(b"\0" * 1024)
        w.close()
        w._emit(estargz_footer(toc_offset))
        return WrittenLayer(out_path, "sha256:" + w.blob.hexdigest(), w.n,
                            "sha256:" + w.diff.hexdigest(), w.diff_n, toc_digest)
