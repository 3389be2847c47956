"""Helpers for the FUSE mount tests: isolated state, ground truth, tree walks.

The ground truth for a fixture tag ``X-esgz`` is the plain ``X-gzip`` image of
the same layout, read with Python's ``tarfile``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
from cli_helpers import stargz_cli

from core import mount as core_mount

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "estargz-oci"
LAZY_SUFFIXES = ["esgz", "esgz-64k", "esgz-prefetch", "zstdchunked"]
MINI_TAGS = [f"mini-{s}" for s in LAZY_SUFFIXES]
SPECIAL_TAGS = ["special-esgz", "special-esgz-64k", "special-zstdchunked"]
ALL_TAGS = MINI_TAGS + SPECIAL_TAGS
OPAQUE = {b"trusted.overlay.opaque": b"y", b"user.overlay.opaque": b"y"}


# -- the OCI layout -------------------------------------------------------------
def _blob(layout: Path, digest: str) -> Path:
    algo, _, hexd = digest.partition(":")
    return layout / "blobs" / algo / hexd


def manifest(tag: str, layout: Path = FIXTURES) -> dict:
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return json.loads(_blob(layout, m["digest"]).read_text())
    raise KeyError(tag)


def layer_blobs(tag: str, layout: Path = FIXTURES) -> list[Path]:
    return [_blob(layout, ld["digest"]) for ld in manifest(tag, layout)["layers"]]


def family(tag: str) -> str:
    return tag.split("-", 1)[0]


# -- expected trees ---------------------------------------------------------------
@dataclass
class Node:
    type: str  # dir reg symlink char block fifo
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    mtime: int | None = None
    link: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: dict | None = None
    sha256: str | None = None
    hardlink_to: str | None = None  # for tar hardlinks: the path they share an inode with


def _norm(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _xattrs_of(ti: tarfile.TarInfo) -> dict:
    out = {}
    for k, v in ti.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            out[k[len("SCHILY.xattr."):].encode("utf-8", "surrogateescape")] = \
                v.encode("utf-8", "surrogateescape")
    return out


def tar_layer(path: Path) -> tuple[list[tuple[str, Node]], set[str], set[str]]:
    """(entries in order, whiteout target paths, opaque dirs) of one tar(.gz) layer."""
    entries = []
    whiteouts, opaque = set(), set()
    contents: dict[str, Node] = {}
    with tarfile.open(path, "r:*") as tf:
        for ti in tf:
            name = _norm(ti.name)
            if not name:
                continue
            base = name.rsplit("/", 1)[-1]
            parent = name.rsplit("/", 1)[0] if "/" in name else ""
            if base == ".wh..wh..opq":
                opaque.add(parent)
                continue
            if base.startswith(".wh."):
                whiteouts.add((parent + "/" if parent else "") + base[4:])
                continue
            x = _xattrs_of(ti)
            common = dict(mode=ti.mode & 0o7777, uid=ti.uid, gid=ti.gid, mtime=int(ti.mtime),
                          xattrs=x)
            if ti.isdir():
                n = Node("dir", **common)
            elif ti.islnk():
                tgt = _norm(ti.linkname)
                t = contents[tgt]
                n = Node("reg", **dict(common, mode=t.mode, uid=t.uid, gid=t.gid, mtime=t.mtime,
                                       xattrs=t.xattrs),
                         size=t.size, sha256=t.sha256, hardlink_to=tgt)
            elif ti.issym():
                n = Node("symlink", **common, link=ti.linkname)
            elif ti.ischr() or ti.isblk():
                n = Node("char" if ti.ischr() else "block", **common,
                         rdev=(ti.devmajor, ti.devminor))
            elif ti.isfifo():
                n = Node("fifo", **common)
            else:
                data = tf.extractfile(ti).read()
                n = Node("reg", **common, size=len(data), sha256=hashlib.sha256(data).hexdigest())
            contents[name] = n
            entries.append((name, n))
    return entries, whiteouts, opaque


def _add_parents(tree: dict[str, Node], name: str) -> None:
    parts = name.split("/")
    for i in range(1, len(parts)):
        p = "/".join(parts[:i])
        tree.setdefault(p, Node("dir"))


def raw_expected(blob: Path) -> dict[str, Node]:
    """What a single-layer mount shows: whiteouts as char 0/0, opaque xattrs."""
    entries, whiteouts, opaque = tar_layer(blob)
    tree: dict[str, Node] = {}
    for name, n in entries:
        _add_parents(tree, name)
        tree[name] = n
    for w in whiteouts:
        _add_parents(tree, w)
        tree.setdefault(w, Node("char", rdev=(0, 0)))
    for d in opaque:
        _add_parents(tree, d) if d else None
        node = tree.setdefault(d, Node("dir")) if d else None
        if node is not None:
            node.xattrs = {**(node.xattrs or {}), **OPAQUE}
    tree.pop("", None)
    return tree


def merged_expected(blobs: list[Path]) -> dict[str, Node]:
    """Apply layers bottom to top with overlay semantics."""
    tree: dict[str, Node] = {}

    def drop_under(p: str, keep_self: bool) -> None:
        pre = p + "/" if p else ""
        for k in [k for k in tree if (k.startswith(pre) and k != p) or (k == p and not keep_self)]:
            del tree[k]

    for blob in blobs:
        entries, whiteouts, opaque = tar_layer(blob)
        for d in opaque:
            drop_under(d, keep_self=True)
        for w in whiteouts:
            drop_under(w, keep_self=False)
        for name, n in entries:
            old = tree.get(name)
            if old is not None and (old.type != "dir" or n.type != "dir"):
                drop_under(name, keep_self=False)
            _add_parents(tree, name)
            tree[name] = n
    tree.pop("", None)
    return tree


# -- walking a mount ------------------------------------------------------------------
def _type_of(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "reg"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo")):
        if test(mode):
            return name
    return "?"


def walk(root: str) -> dict[str, os.stat_result]:
    out = {}
    todo = [""]
    for _ in range(100000):
        if not todo:
            break
        rel = todo.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for de in it:
                p = f"{rel}/{de.name}" if rel else de.name
                st = os.lstat(os.path.join(root, p))
                out[p] = st
                if stat.S_ISDIR(st.st_mode):
                    todo.append(p)
    return out


def _xattrs_at(path: str, drop_prefixes=()) -> dict:
    out = {}
    for k in os.listxattr(path, follow_symlinks=False):
        if any(k.startswith(p) for p in drop_prefixes):
            continue
        out[k.encode("utf-8", "surrogateescape")] = os.getxattr(path, k, follow_symlinks=False)
    return out


def compare_tree(root: str, expected: dict[str, Node], *, check_dir_meta: bool = True,
                 drop_xattr_prefixes=()) -> None:
    got = walk(root)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert not missing and not extra, f"missing {missing[:10]}, extra {extra[:10]}"
    problems = []
    for p, n in expected.items():
        st = got[p]
        full = os.path.join(root, p)
        t = _type_of(st.st_mode)
        if t != n.type:
            problems.append(f"{p}: type {t} != {n.type}")
            continue
        is_synth_dir = n.type == "dir" and n.mode is None
        if n.type == "dir" and (not check_dir_meta or is_synth_dir):
            pass
        else:
            if n.mode is not None and n.type != "symlink" and stat.S_IMODE(st.st_mode) != n.mode:
                problems.append(f"{p}: mode {oct(stat.S_IMODE(st.st_mode))} != {oct(n.mode)}")
            if n.uid is not None and (st.st_uid, st.st_gid) != (n.uid, n.gid):
                problems.append(f"{p}: owner {st.st_uid}:{st.st_gid} != {n.uid}:{n.gid}")
            if n.mtime is not None and int(st.st_mtime) != n.mtime:
                problems.append(f"{p}: mtime {int(st.st_mtime)} != {n.mtime}")
        if n.type == "reg":
            if st.st_size != n.size:
                problems.append(f"{p}: size {st.st_size} != {n.size}")
            with open(full, "rb") as f:
                h = hashlib.sha256(f.read()).hexdigest()
            if h != n.sha256:
                problems.append(f"{p}: content differs")
        if n.type == "symlink" and os.readlink(full) != n.link:
            problems.append(f"{p}: link {os.readlink(full)!r} != {n.link!r}")
        if n.rdev is not None and (os.major(st.st_rdev), os.minor(st.st_rdev)) != n.rdev:
            problems.append(f"{p}: rdev {os.major(st.st_rdev)},{os.minor(st.st_rdev)} != {n.rdev}")
        if n.type != "symlink" and not (n.type == "dir" and not check_dir_meta):
            want_x = dict(n.xattrs or {})
            want_x = {k: v for k, v in want_x.items()
                      if not any(k.decode(errors="replace").startswith(d)
                                 for d in drop_xattr_prefixes)}
            have_x = _xattrs_at(full, drop_xattr_prefixes)
            if have_x != want_x and not (is_synth_dir and not want_x):
                problems.append(f"{p}: xattrs {have_x} != {want_x}")
        if n.hardlink_to is not None:
            other = got[n.hardlink_to]
            if other.st_ino != st.st_ino:
                problems.append(f"{p}: inode {st.st_ino} != {n.hardlink_to}'s {other.st_ino}")
    # link counts: every name of a hardlinked file
    groups: dict[str, list[str]] = {}
    for p, n in expected.items():
        if n.hardlink_to is not None:
            groups.setdefault(n.hardlink_to, [n.hardlink_to]).append(p)
    for names in groups.values():
        for p in names:
            if got[p].st_nlink != len(names):
                problems.append(f"{p}: st_nlink {got[p].st_nlink} != {len(names)}")
    assert not problems, "\n".join(problems[:30])


# -- isolated mount state and cleanup -------------------------------------------------
@dataclass
class MountEnv:
    tmp: Path
    state: Path
    cache: Path
    run: Path

    def mountpoint(self, name: str = "mnt") -> str:
        p = self.tmp / name
        p.mkdir(exist_ok=True)
        return str(p)

    def mount(self, image: str, mountpoint: str, **kw) -> dict:
        kw.setdefault("silence", 0.2)
        return anyio.run(functools.partial(core_mount.mount_image, image, mountpoint, **kw))

    def cli(self, *args, timeout: float = 120, check: bool = False):
        r = stargz_cli(*args, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"stargz-tui {' '.join(args)} failed: {r.stderr}")
        return r

    def status(self, mountpoint: str) -> dict:
        for st in core_mount.list_mounts():
            if st["mountpoint"] == os.path.realpath(mountpoint):
                return st
        raise KeyError(mountpoint)

    def wait_for(self, mountpoint: str, pred, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        st = self.status(mountpoint)
        while time.monotonic() < deadline:
            st = self.status(mountpoint)
            if pred(st):
                return st
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting on {mountpoint}: {st}")


def _force_cleanup(tmp: Path) -> None:
    with contextlib.suppress(Exception):
        for rec in core_mount._read_records():
            try:
                core_mount.unmount(rec["mountpoint"], force=True)
            except Exception:  # noqa: BLE001 - fall through to the brute-force path
                for e in rec.get("layers", []):
                    with contextlib.suppress(OSError, TypeError):
                        os.kill(e["pid"], signal.SIGKILL)
    # anything still mounted below tmp: detach (deepest first)
    table = core_mount.mount_table()
    for mp in sorted((m for m in table if m.startswith(str(tmp))), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, timeout=30)


def isolated_mount_env(tmp_path, monkeypatch):
    """Generator behind each test module's ``mount_env`` fixture: private
    state/cache/runtime dirs; every mount and daemon is cleaned up after."""
    state = tmp_path / "state"
    cache = tmp_path / "cache"
    run = Path(tempfile.mkdtemp(prefix="sgz-"))
    monkeypatch.setenv("STARGZ_TUI_STATE_DIR", str(state))
    monkeypatch.setenv("STARGZ_TUI_CACHE_DIR", str(cache))
    monkeypatch.setenv("STARGZ_TUI_RUNTIME_DIR", str(run))
    env = MountEnv(tmp_path, state, cache, run)
    try:
        yield env
    finally:
        _force_cleanup(tmp_path)
        shutil.rmtree(run, ignore_errors=True)


# -- a byte-counting loopback TCP proxy (bytes the registry really sent) -------------------
class CountingProxy:
    """Forwards 127.0.0.1:PORT to ``upstream`` ("host:port") and counts the
    bytes flowing back from it (``bytes_down``)."""

    def __init__(self, upstream: str):
        import socket
        import threading

        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.bytes_down = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._stop = False
        self._threads: list = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._sock.getsockname()[1]}"

    def reset(self) -> None:
        with self._lock:
            self.bytes_down = 0

    def _accept(self) -> None:
        import socket
        import threading

        while not self._stop:
            try:
                c, _ = self._sock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.upstream, timeout=30)
            except OSError:
                c.close()
                continue
            with self._lock:
                self.connections += 1
            for a, b, count in ((c, u, False), (u, c, True)):
                t = threading.Thread(target=self._pipe, args=(a, b, count), daemon=True)
                t.start()

    def _pipe(self, src, dst, count: bool) -> None:
        import socket

        try:
            src.settimeout(120)
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if count:
                    with self._lock:
                        self.bytes_down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._sock.close()


def write_big_layout(root: Path, *, files: int = 48, file_size: int = 640 << 10,
                     chunk_size: int = 256 << 10, tag: str = "big") -> dict:
    """An OCI layout with one large eStargz layer of incompressible files
    (``bulk/f00..``) plus small ``etc/hello.txt``; returns facts about it."""
    import io

    from core.estargz.writer import build_estargz

    rnd = os.urandom
    tar_path = root / "big.tar"
    root.mkdir(parents=True, exist_ok=True)
    contents = {}
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tf:
        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            ti.mtime = 1700000000
            tf.addfile(ti, io.BytesIO(data))
            contents[name] = data
        for d in ("etc", "bulk"):
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o755
            ti.mtime = 1700000000
            tf.addfile(ti)
        for i in range(files // 2):
            add(f"bulk/a{i:02d}.bin", rnd(file_size))
        add("etc/hello.txt", b"hello from the middle of a big layer\n")
        for i in range(files // 2):
            add(f"bulk/b{i:02d}.bin", rnd(file_size))
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    tmp_blob = root / "layer.tmp"
    res = build_estargz(str(tar_path), str(tmp_blob), chunk_size=chunk_size)
    os.replace(tmp_blob, blobs / res.blob_digest[7:])
    tar_path.unlink()

    def put(obj: dict) -> tuple[str, int]:
        data = json.dumps(obj).encode()
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return "sha256:" + d, len(data)

    cfg_d, cfg_n = put({"architecture": "amd64", "os": "linux",
                        "rootfs": {"type": "layers", "diff_ids": [res.diff_id]}})
    man_d, man_n = put({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_d,
                   "size": cfg_n},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": res.blob_digest, "size": res.blob_size,
                    "annotations": res.annotations()}],
    })
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (root / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": man_d, "size": man_n,
                       "annotations": {"org.opencontainers.image.ref.name": tag}}],
    }))
    return {"layout": str(root), "tag": tag, "blob_size": res.blob_size, "contents": contents,
            "chunks": res.chunks}


def push_layout(layout: str, tag: str, dest: str) -> str:
    from core.registry import RegistryClient, push_oci_layout
    from core.registry.config import RegistryConfig

    async def run():
        client = RegistryClient(dest.split("/", 1)[0], config=RegistryConfig(), use_keyring=False)
        try:
            return await push_oci_layout(layout, tag, dest, client=client)
        finally:
            await client.aclose()

    return anyio.run(run)
