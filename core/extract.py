"""Extracting an entry of a layer (a file, or a directory with everything
below it) into a directory on disk: the app's ``x``.

Contract: nothing outside the destination is ever written, created or
chmodded, whatever the destination already holds (e.g. the symlinks of a
layer extracted there before, as when layers are extracted one after another
into one directory). Every path component below the destination is opened
relative to its parent's descriptor with ``O_NOFOLLOW``; links found there are
never followed, and symlinks are recreated as stored, never followed later.
Files, directories and symlinks get the TOC's mtimes; hardlinks extracted
together stay one file with several names.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from .errors import ExtractError
from .estargz import LayerIndex, read_file_range
from .estargz.toc import DIR, Entry

ProgressFn = Callable[[int, int, str], None]


async def extract(index: LayerIndex, source, entry: Entry, dest: str, *,
                  progress: ProgressFn | None = None, on_chunk=None) -> int:
    """Write ``entry`` (a file, or a directory with everything below it) under
    the directory ``dest``, fetching only the chunks of the files written.
    Returns the number of bytes written; ``on_chunk`` is
    :func:`core.estargz.read_file_range`'s (e.g. :func:`core.browse.cache_filler`).

    Nothing is ever written, created or chmodded outside ``dest``, whatever
    ``dest`` already holds (e.g. the symlinks of a layer extracted there
    before): every path component below ``dest`` is opened relative to its
    parent's descriptor with ``O_NOFOLLOW``, so an existing symlink (or a
    non-directory) where a directory must be refuses the extraction with
    :class:`ExtractError`; a file or symlink replaces whatever non-directory
    has its name (unlinked first, then created with ``O_EXCL``); modes are
    set with ``fchmod`` on the open file; symlinks are created as stored and
    never followed afterwards."""
    dest = os.path.abspath(dest)
    os.makedirs(dest, exist_ok=True)  # the user's own choice of directory
    base = entry.path.rsplit("/", 1)[0] if "/" in entry.path else ""
    todo: list[Entry] = []
    stack = [entry]
    while stack:
        e = stack.pop()
        if e.is_whiteout or e.is_opaque_marker:
            continue
        todo.append(e)
        if e.type_code == DIR:
            stack.extend(reversed(index.children(e)))
    total = sum(e.size for e in todo if e.type in ("reg",))
    written = 0
    # the first file written for each inode (target entry id -> its parts):
    # a later hardlink to it is a link here too, as tar extraction makes it
    inodes: dict[int, list[str]] = {}
    dirs: list[tuple[list[str], float]] = []
    with _DirWalker(dest) as walker:
        for e in todo:
            rel = e.path[len(base):].lstrip("/") if base else e.path
            parts = _components(rel, e.path, dest)
            if not parts:
                continue  # the root of the layer: ``dest`` itself
            if e.type == "dir":
                walker.open_dir(parts).close()
                dirs.append((parts, e.mtime))
            elif e.type in ("reg", "hardlink"):
                target = index.entry(e.target_id) if e.target_id is not None else e
                first = inodes.get(target.id)
                if first is not None:
                    walker.create_hardlink(first, parts)
                    continue
                with walker.create_file(parts, e.mode & 0o777) as f:
                    pos = 0
                    while pos < target.size:
                        n = min(8 << 20, target.size - pos)
                        data = await read_file_range(index, source, target, pos, n,
                                                     on_chunk=on_chunk)
                        f.write(data)
                        pos += n
                        written += len(data)
                        if progress:
                            progress(written, total, e.path)
                    f.flush()
                    _set_mtime(f.fileno(), target.mtime)
                inodes[target.id] = parts
            elif e.type == "symlink":
                walker.create_symlink(parts, e.link_name, e.mtime)
            # devices and fifos are skipped: they need privileges and carry no data
        # a directory's mtime last: writing its entries changed it
        for parts, mtime in reversed(dirs):
            fd = walker.open_dir(parts)
            try:
                _set_mtime(fd.fd, mtime)
            finally:
                fd.close()
    if progress:
        progress(written, total, "")
    return written


def _set_mtime(fd: int, mtime: float) -> None:
    """The TOC's mtime (atime too) on an open file or directory."""
    if mtime:
        ns = int(mtime * 1_000_000_000)
        os.utime(fd, ns=(ns, ns))


def _components(rel: str, path: str, dest: str) -> list[str]:
    """``rel`` as the names to walk below ``dest``; refuses ``..`` and NUL."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." or "\0" in p for p in parts):
        raise ExtractError(f"refusing to write {path} outside {dest}")
    return parts


class _DirWalker:
    """Directories below one root, each opened relative to its parent's
    descriptor without following links (``openat`` + ``O_NOFOLLOW``)."""

    _DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

    def __init__(self, root: str):
        self.root = root
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # the parent of the last file written: entries come directory by
        # directory, so most files need no walk at all
        self._last: tuple[tuple[str, ...], int] | None = None

    def __enter__(self) -> _DirWalker:
        return self

    def __exit__(self, *exc) -> None:
        if self._last is not None:
            os.close(self._last[1])
            self._last = None
        os.close(self.root_fd)

    def _shown(self, parts) -> str:
        return os.path.join(self.root, *parts)

    def open_dir(self, parts) -> _Fd:
        """The directory ``parts`` below the root, created (0755 less the
        umask) where missing; refuses a symlink or a non-directory on the way."""
        fd = os.dup(self.root_fd)
        try:
            for i, name in enumerate(parts):
                try:
                    nxt = os.open(name, self._DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    try:
                        os.mkdir(name, 0o755, dir_fd=fd)
                    except FileExistsError:
                        pass  # raced with another writer: the open below decides
                    nxt = self._open_existing(name, fd, parts[: i + 1])
                except OSError as err:
                    if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    nxt = self._open_existing(name, fd, parts[: i + 1])
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return _Fd(fd)

    def _open_existing(self, name: str, parent: int, parts) -> int:
        try:
            return os.open(name, self._DIR_FLAGS, dir_fd=parent)
        except OSError as err:
            if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise ExtractError(f"refusing to extract below {self._shown(parts)}: it is {what} "
                           "(extract into an empty directory)") from None

    def _parent(self, parts) -> int:
        key = tuple(parts[:-1])
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        fd = self.open_dir(key).detach()
        if self._last is not None:
            os.close(self._last[1])
        self._last = (key, fd)
        return fd

    def _clear(self, parent: int, name: str, parts) -> None:
        """Remove a non-directory named ``name`` (never what a link points to)."""
        try:
            os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise ExtractError(f"refusing to replace the directory {self._shown(parts)} "
                               "with a file") from None
        except PermissionError:
            # unlink() of a directory is EPERM on Linux, not EISDIR
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise ExtractError(f"refusing to replace the directory {self._shown(parts)} "
                                   "with a file") from None
            raise

    def create_file(self, parts, mode: int):
        """A new regular file ``parts`` (replacing any non-directory), open
        for writing; its mode is set on the descriptor."""
        parent = self._parent(parts)
        name = parts[-1]
        self._clear(parent, name, parts)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent)
        os.fchmod(fd, mode)
        return os.fdopen(fd, "wb")

    def create_symlink(self, parts, target: str, mtime: float = 0.0) -> None:
        parent = self._parent(parts)
        name = parts[-1]
        self._clear(parent, name, parts)
        os.symlink(target, name, dir_fd=parent)
        if mtime:
            ns = int(mtime * 1_000_000_000)
            os.utime(name, ns=(ns, ns), dir_fd=parent, follow_symlinks=False)

    def create_hardlink(self, first, parts) -> None:
        """``parts`` as a second name of the file written at ``first`` (both
        below the root, each reached without following links)."""
        src = self.open_dir(first[:-1])
        try:
            parent = self._parent(parts)
            self._clear(parent, parts[-1], parts)
            os.link(first[-1], parts[-1], src_dir_fd=src.fd, dst_dir_fd=parent,
                    follow_symlinks=False)
        finally:
            src.close()


class _Fd:
    """An owned directory descriptor."""

    def __init__(self, fd: int):
        self.fd = fd

    def detach(self) -> int:
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
