"""One FUSE server for an image's whole merged tree (issue 17, B11/B12).

A merged mount used to be one daemon per layer plus a kernel overlay over
them: ~17 MB PSS and a process per layer (a 20-layer image: 20 processes,
~350 MB). :class:`MergedFS` serves the merged view itself, from one process
per image (:mod:`core.mergeddaemon`): the view of :class:`core.overlay.MergedTree` (kernel overlayfs'
rules: upper names hide lower ones, ``.wh.NAME`` and opaque dirs hide what
is below, a non-directory hides what lower layers have beneath its path),
each file's data from its own layer's :class:`core.layer.LayerReader`, all
layers sharing one :class:`core.cache.ChunkCache`.

What a client sees, as through the kernel overlay of per-layer mounts:

- the same names, types, modes, owners, mtimes, sizes, symlink targets,
  device numbers and file contents;
- xattrs of the shown entry, without ``trusted.overlay.*`` (overlayfs keeps
  its own to itself); whiteouts and opaque markers never show;
- the names of one hardlinked file (within its layer) share one inode and
  its ``st_nlink``;
- a directory's ``st_nlink`` is 1 (as overlayfs gives a merged dir: "not
  counted"; ``find`` then does not guess leaves from it).

Inode numbers are handed out on first sight and kept for the life of the
mount (the tree never changes: :data:`core.fusefs.IMMUTABLE_TIMEOUT`). A
read that fails in one layer fails with EIO for that read only.

Owners are shown through an optional :class:`core.idmap.IdMapper` (``mount
--map-owner``, ``--uid-map``); with ``recorders`` (one
:class:`core.record.Recorder` per layer, ``mount --record``) each regular
file opened is noted once, in its own layer's terms.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

import pyfuse3

from .errors import CoreError
from .estargz.toc import BLOCK, CHAR, DIR, FIFO, HARDLINK, REG, SYMLINK, WHITEOUT_PREFIX
from .fusefs import (
    BLKSIZE,
    IMMUTABLE_TIMEOUT,
    ReadErrorLog,
    ReadOnlyOperations,
    negative_entry,
    tune_kernel,
)
from .idmap import IdMapper
from .overlay import MergedTree

log = logging.getLogger("core.mergedfs")

_TYPE_BITS = {DIR: stat.S_IFDIR, REG: stat.S_IFREG, SYMLINK: stat.S_IFLNK,
              HARDLINK: stat.S_IFREG, CHAR: stat.S_IFCHR, BLOCK: stat.S_IFBLK,
              FIFO: stat.S_IFIFO}
_HIDDEN_XATTR = b"trusted.overlay."


def _erofs():
    return pyfuse3.FUSEError(errno.EROFS)


class MergedFS(ReadOnlyOperations):
    """pyfuse3 operations serving the merged view of ``layers`` (bottom
    first: ``(LayerIndex, LayerReader)`` pairs) read-only.

    Not split: pyfuse3 calls one Operations object, one method per request
    kind; the merged tree itself is :class:`core.overlay.MergedTree`."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, layers: list, *, timeout: float = IMMUTABLE_TIMEOUT,
                 idmap: IdMapper | None = None, recorders: list | None = None):
        super().__init__()
        self._read_errors = ReadErrorLog()
        self.indexes = [ix for ix, _ in layers]
        self.readers = [r for _, r in layers]
        self.tree = MergedTree(self.indexes)
        self.timeout = timeout
        self.idmap = idmap if idmap else None  # None: the image's ids exactly
        self.recorders = recorders
        self._tune_mp: str | None = None
        # inode -> (merged path, layer number, entry id shown); the key of a
        # directory is its path (it merges layers), of anything else the
        # layer and the entry its names show (hardlinks: one inode)
        top = len(self.indexes) - 1
        self._nodes: dict[int, tuple[str, int, int]] = {pyfuse3.ROOT_INODE: ("", top, 0)}
        self._inos: dict[object, int] = {"": pyfuse3.ROOT_INODE}
        self._dirs: dict[int, list] = {}  # open dir handle -> [inode, listing or None]
        self._open: dict[int, tuple[int, int]] = {}  # fh -> (layer, entry id)
        self._next_fh = 1
        self.open_files = 0

    def tune_kernel_after_init(self, mountpoint: str) -> None:
        """Raise the mount's kernel read-ahead (:func:`core.fusefs.tune_kernel`)
        on the first open, once FUSE_INIT's answer (which caps it) is in."""
        self._tune_mp = mountpoint

    # -- nodes -------------------------------------------------------------
    def _node(self, inode: int) -> tuple[str, int, int]:
        n = self._nodes.get(inode)
        if n is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return n

    def _inode(self, path: str, layer: int, eid: int) -> int:
        name, shown, code, *_ = self.indexes[layer].stat_row(eid)
        key = path if code == DIR else (layer, shown)
        ino = self._inos.get(key)
        if ino is None:
            ino = self._inos[key] = len(self._nodes) + 1
            self._nodes[ino] = (path, layer, eid)
        return ino

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        _path, layer, eid = self._nodes[inode]
        ix = self.indexes[layer]
        _name, t, code, mode, uid, gid, size, mtime, nlink = ix.stat_row(eid)
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_blksize = BLKSIZE
        a.attr_timeout = a.entry_timeout = self.timeout
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = int(mtime * 1e9)
        if self.idmap is None:
            a.st_uid, a.st_gid = uid, gid
        else:
            a.st_uid, a.st_gid = self.idmap.uid(uid), self.idmap.gid(gid)
        a.st_mode = _TYPE_BITS.get(code, stat.S_IFREG) | (mode & 0o7777)
        if code == DIR:
            a.st_size = 4096
            a.st_blocks = 8
            return a  # st_nlink 1: see the module docs
        a.st_nlink = nlink
        if code == REG:
            a.st_size = size
            a.st_blocks = (size + 511) // 512
        elif code == SYMLINK:
            a.st_size = len(os.fsencode(ix.entry(t).link_name))
        elif code in (CHAR, BLOCK):
            e = ix.entry(t)
            a.st_rdev = os.makedev(e.dev_major, e.dev_minor)
        return a

    def _shown(self, inode: int) -> tuple[int, int, int]:
        """(layer, entry id of what the node shows (a hardlink's target), type)."""
        _path, layer, eid = self._node(inode)
        _name, t, code, *_ = self.indexes[layer].stat_row(eid)
        return layer, t, code

    # -- lookups -------------------------------------------------------------
    async def lookup(self, parent_inode, name, ctx=None):
        path, _layer, _eid = self._node(parent_inode)
        if self._shown(parent_inode)[2] != DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self._attr(parent_inode)
        if name == b"..":
            up = path.rsplit("/", 1)[0] if "/" in path else ""
            return self._attr(self._inos[up])
        sname = os.fsdecode(name)
        if sname.startswith(WHITEOUT_PREFIX):  # whiteouts and markers never show
            return negative_entry(self.timeout)
        child = f"{path}/{sname}" if path else sname
        found = self.tree.lookup(child)
        if found is None:
            return negative_entry(self.timeout)
        layer, e = found
        return self._attr(self._inode(child, layer, e.id))

    async def forget(self, inode_list):
        return None  # nodes are kept: the tree is fixed and they are small

    async def getattr(self, inode, ctx=None):
        self._node(inode)
        return self._attr(inode)

    async def readlink(self, inode, ctx):
        layer, t, code = self._shown(inode)
        if code != SYMLINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(self.indexes[layer].entry(t).link_name)

    # -- directories -----------------------------------------------------------
    async def opendir(self, inode, ctx):
        if self._shown(inode)[2] != DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._next_fh
        self._next_fh += 1
        self._dirs[fh] = [inode, None]
        return fh

    async def readdir(self, fh, start_id, token):
        d = self._dirs.get(fh)
        if d is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        lst = d[1]
        if lst is None:
            path = self._nodes[d[0]][0]
            lst = d[1] = [(os.fsencode(name), f"{path}/{name}" if path else name, layer, e.id)
                          for name, layer, e in self.tree.children(path)]
            lst.sort()  # bytes order (children come in str order)
        for i in range(start_id, len(lst)):
            bname, child, layer, eid = lst[i]
            attr = self._attr(self._inode(child, layer, eid))
            if not pyfuse3.readdir_reply(token, bname, attr, i + 1):
                break

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    # -- files -------------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise _erofs()
        layer, t, code = self._shown(inode)
        if code not in (REG, HARDLINK):
            raise pyfuse3.FUSEError(errno.EISDIR if code == DIR else errno.ENXIO)
        if self._tune_mp is not None:
            mp, self._tune_mp = self._tune_mp, None
            tune_kernel(mp)
        fh = self._next_fh
        self._next_fh += 1
        self._open[fh] = (layer, t)
        self.open_files += 1
        if self.recorders is not None:
            self.recorders[layer].note(t)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh, off, size):
        got = self._open.get(fh)
        if got is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        layer, eid = got
        try:
            return await self.readers[layer].read_buffer(eid, off, size, stream=fh)
        except CoreError as e:  # this read fails; every other file and layer serves on
            # as a layer daemon says it (the path first): "read PATH: why"
            self._read_errors.failed((layer, eid), self.indexes[layer].path_of(eid), e,
                                     f"(layer {layer}) ")
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh):
        got = self._open.pop(fh, None)
        if got is not None:
            self.open_files -= 1
            self.readers[got[0]].forget_stream(fh)

    async def access(self, inode, mode, ctx):
        self._node(inode)
        if mode & os.W_OK:
            raise _erofs()
        return True

    # -- xattrs --------------------------------------------------------------------
    def _xattrs(self, inode: int) -> dict[bytes, bytes]:
        layer, t, _code = self._shown(inode)
        return {k: v for k, v in ((os.fsencode(k), v) for k, v in
                                  self.indexes[layer].entry(t).xattrs.items())
                if not k.startswith(_HIDDEN_XATTR)}

    async def getxattr(self, inode, name, ctx):
        v = self._xattrs(inode).get(name)
        if v is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return v

    async def listxattr(self, inode, ctx):
        names = list(self._xattrs(inode))
        if ctx is not None and ctx.uid != 0:  # as core.fusefs: she cannot read trusted.*
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLKSIZE
        s.f_frsize = 4096
        s.f_blocks = sum(ix.blob_size for ix in self.indexes) // 4096
        s.f_files = sum(len(ix) for ix in self.indexes)
        s.f_namemax = 255
        return s
