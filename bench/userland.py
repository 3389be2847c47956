"""A one-layer image whose root filesystem is a piece of this host's real
userland: the programs asked for, every shared library ``ldd`` says they
load (and the dynamic loader), plus whole directory trees (e.g. Python's
standard library) and small extra files.

``write_userland_layout(root, programs=[...], trees=[...], files={...},
config={...}, estargz=True) -> dict`` writes an OCI layout at ``root`` with
that one layer (eStargz built by core.estargz.writer, or plain tar+gzip) and
tag ``tag``; returns ``{"layout", "tag", "ref", "paths", "blob_size"}``.
Paths keep their host names (``/usr/bin/python3`` -> ``usr/bin/python3``),
symlinks stay symlinks (their targets are added too), so the merged root
is runnable with ``chroot``. ``write_tar_layout`` does the same for any tar
(bench B9 gives it a Debian root filesystem made by ``mmdebstrap``). Used by
tests/test_optimize.py and bench B9.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile

MTIME = 1700000000


def _ldd_libs(path: str) -> list[str]:
    r = subprocess.run(["ldd", path], capture_output=True, text=True)
    if r.returncode != 0:
        return []  # static, or not an ELF file
    out = []
    for line in r.stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            out.append(m.group(1))
    return out


class _Tree:
    """Host paths to put in the layer, with their parents and link targets."""

    def __init__(self):
        self.paths: dict[str, None] = {}

    def add(self, host: str, depth: int = 0) -> None:
        if depth > 40:
            return
        host = os.path.normpath(host)
        if host == "/":
            return
        parent = os.path.dirname(host)
        real_parent = os.path.realpath(parent)
        if real_parent != parent:
            # the symlinks on the way (/lib -> usr/lib) go in as symlinks, the
            # entry itself under its real parent
            cur = "/"
            for part in parent.strip("/").split("/"):
                cur = os.path.join(cur, part)
                if os.path.islink(cur):
                    self.add(cur, depth + 1)
                    cur = os.path.realpath(cur)
            host = os.path.join(real_parent, os.path.basename(host))
        if host in self.paths:
            return
        self.add(real_parent, depth + 1)
        self.paths[host] = None
        if os.path.islink(host):
            self.add(os.path.join(real_parent, os.readlink(host)), depth + 1)
        elif os.path.isfile(host) and (os.access(host, os.X_OK) or ".so" in host):
            for lib in _ldd_libs(host):
                self.add(lib, depth + 1)

    def add_tree(self, top: str, skip=()) -> None:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d not in skip)
            self.add(dirpath)
            for f in sorted(filenames):
                p = os.path.join(dirpath, f)
                if os.path.isfile(p) or os.path.islink(p):
                    self.add(p)


def build_userland_tar(tar_path: str, *, programs=(), trees=(), files=None) -> list[str]:
    """Write the tar; returns the layer paths it holds (sorted)."""
    t = _Tree()
    for top in ("/bin", "/sbin", "/lib", "/lib64"):
        if os.path.islink(top):  # a merged-/usr host: keep /bin/sh working
            t.add(top)
    for prog in programs:
        host = prog if os.path.isabs(prog) else shutil.which(prog)
        if not host:
            raise FileNotFoundError(f"{prog} is not installed on this host")
        t.add(host)
    for top in trees:
        t.add_tree(top)
    names = []
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
        for host in sorted(t.paths):
            ti = tf.gettarinfo(host, arcname=host.lstrip("/"))
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
            ti.mtime = MTIME
            if ti.isreg():
                with open(host, "rb") as f:
                    tf.addfile(ti, f)
            elif ti.isdir() or ti.issym():
                tf.addfile(ti)
            else:
                continue
            names.append(ti.name)
        for name, data in sorted((files or {}).items()):
            parts = name.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in names:
                    di = tarfile.TarInfo(d)
                    di.type, di.mode, di.mtime = tarfile.DIRTYPE, 0o755, MTIME
                    tf.addfile(di)
                    names.append(d)
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, MTIME
            tf.addfile(ti, io.BytesIO(data))
            names.append(name)
    return sorted(names)


def write_userland_layout(root: str, *, programs=(), trees=(), files=None,
                          config: dict | None = None, tag: str = "userland",
                          estargz: bool = True, chunk_size: int = 4 << 20) -> dict:
    os.makedirs(root, exist_ok=True)
    tar_path = os.path.join(root, "layer.tar")
    paths = build_userland_tar(tar_path, programs=programs, trees=trees, files=files)
    try:
        out = write_tar_layout(root, tar_path, config=config, tag=tag, estargz=estargz,
                               chunk_size=chunk_size)
    finally:
        os.unlink(tar_path)
    out["paths"] = paths
    return out


def write_tar_layout(root: str, tar_path: str, *, config: dict | None = None,
                     tag: str = "userland", estargz: bool = True,
                     chunk_size: int = 4 << 20) -> dict:
    """An OCI layout at ``root`` (added to its index under ``tag``) whose one
    layer is ``tar_path``: eStargz by core.estargz.writer, or tar+gzip."""
    from core.estargz.writer import build_estargz

    os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
    blobs = os.path.join(root, "blobs", "sha256")
    tmp_blob = os.path.join(root, "layer.tmp")
    if estargz:
        res = build_estargz(tar_path, tmp_blob, chunk_size=chunk_size)
        digest, size, diff_id = res.blob_digest, res.blob_size, res.diff_id
        annotations = res.annotations()
    else:
        with open(tar_path, "rb") as f:
            raw = f.read()
        data = gzip.compress(raw, 6, mtime=0)
        with open(tmp_blob, "wb") as f:
            f.write(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        size, diff_id = len(data), "sha256:" + hashlib.sha256(raw).hexdigest()
        annotations = {}
    os.replace(tmp_blob, os.path.join(blobs, digest[7:]))

    def put(obj: dict) -> tuple[str, int]:
        data = json.dumps(obj).encode()
        d = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, d), "wb") as f:
            f.write(data)
        return "sha256:" + d, len(data)

    cfg_d, cfg_n = put({"architecture": "amd64", "os": "linux", "config": config or {},
                        "rootfs": {"type": "layers", "diff_ids": [diff_id]}})
    man_d, man_n = put({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_d,
                   "size": cfg_n},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest, "size": size, "annotations": annotations}],
    })
    with open(os.path.join(root, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')
    index_path = os.path.join(root, "index.json")
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": []}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    index["manifests"] = [m for m in index["manifests"]
                          if (m.get("annotations") or {}).get(
                              "org.opencontainers.image.ref.name") != tag]
    index["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "digest": man_d, "size": man_n,
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    with open(index_path, "w") as f:
        json.dump(index, f)
    return {"layout": root, "tag": tag, "ref": f"oci:{root}:{tag}", "blob_size": size,
            "digest": digest}
