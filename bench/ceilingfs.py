"""The Python FUSE ceiling: a minimal pyfuse3 filesystem serving one file's
bytes from memory. Run as its own process (pyfuse3 allows one mount per
process):

    python -m bench.ceilingfs MOUNTPOINT SIZE

It serves ``data/big.txt`` (the same bytes as the ``text`` benchmark layer),
prints ``ready`` once mounted, and unmounts on SIGTERM/SIGINT. Its request
loop is the daemon's (``core.fuseloop``: it polls the device briefly before
it sleeps, ``$STARGZ_TUI_FUSE_SPIN_US``), so it stays a ceiling for ours.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys

import pyfuse3
import trio

from core import fuseloop
from core.options import Tuning

from .gen import text_bytes

ROOT = pyfuse3.ROOT_INODE
DIR_INO = ROOT + 1
FILE_INO = ROOT + 2


class MemFS(pyfuse3.Operations):
    def __init__(self, data: bytes):
        super().__init__()
        self.data = data
        self.names = {ROOT: {b"data": DIR_INO}, DIR_INO: {b"big.txt": FILE_INO}}

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino == FILE_INO:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_size = len(self.data)
            a.st_nlink = 1
        else:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = 1_700_000_000 * 10**9
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        a.attr_timeout = a.entry_timeout = 300
        return a

    async def getattr(self, inode, ctx=None):
        if inode not in (ROOT, DIR_INO, FILE_INO):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        ino = self.names.get(parent_inode, {}).get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def opendir(self, inode, ctx):
        if inode not in self.names:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        items = sorted(self.names[fh].items())
        for i, (name, ino) in enumerate(items):
            if i < start_id:
                continue
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                break

    async def open(self, inode, flags, ctx):
        if inode != FILE_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        return self.data[off : off + size]


def main(argv: list[str]) -> int:
    mountpoint, size = argv[0], int(argv[1])
    fs = MemFS(text_bytes(size))
    options = set(pyfuse3.default_options)
    options.add("fsname=benchceiling")
    options.add("ro")
    pyfuse3.init(fs, mountpoint, options)
    fuseloop.install(Tuning.from_env().fuse_spin_us / 1e6)
    print("ready", flush=True)

    async def run():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pyfuse3.main)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    break
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv[1:]))
