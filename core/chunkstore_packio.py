"""Pack files: their format, their writer and the pool of open descriptors.

A pack holds chunks one after the other behind a header: ``SGZPACK2``, a
little-endian u32 length, then a JSON list of ``[key, offset, size,
crc32]`` (padded with spaces), offsets counted from the file's start.
:class:`PackWriter` writes a pack under a temporary name and renames it into
place, so a crash never leaves a torn pack under a real name; it writes with
O_DIRECT from reused aligned buffers when the file system allows it (else
buffered). :class:`PackFiles` keeps packs open for reads: ``pread``s run in
parallel outside any lock and never on a closed (or reused) descriptor
number. Nothing here knows about keys' meaning, verification or budgets
(that is :mod:`core.chunkstore_pack`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import struct
import threading
import time
from collections import OrderedDict

MAGIC = b"SGZPACK2"  # rows [key, offset, size, crc32]
PACK_SUFFIX = ".pack"
ALIGN = 4096
_HEAD = struct.Struct("<8sI")
_HEADER_READ = 64 << 10
_MAX_FDS = 512  # pack descriptors kept open (fewer when the fd limit is low)
_TOUCH_EVERY = 300.0  # a pack's mtime (its place in the eviction order) is touched at most this often
_DIRECT_MIN = 256 << 10  # packs at least this big are written with O_DIRECT
_WBUF_STEP = 8 << 20  # direct-write buffers come in multiples of this
_WBUFS = 2  # ... and this many are kept for reuse
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_DIRECT_SLOT = "\0direct"  # fd-pool key suffix of a pack's O_DIRECT descriptor


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def pack_header(entries: list) -> bytes:
    """The header of a pack whose chunks (``(key, size, crc32)`` in order) follow it."""
    # offsets depend on the header's length: compute them with a fixed-width guess
    body = json.dumps([[k, 0, s, c] for k, s, c in entries], separators=(",", ":")).encode()
    # each offset may take up to 15 digits more than "0"
    head_len = _HEAD.size + len(body) + 15 * len(entries)
    off = head_len
    rows = []
    for k, s, c in entries:
        rows.append([k, off, s, c])
        off += s
    body = json.dumps(rows, separators=(",", ":")).encode()
    body += b" " * (head_len - _HEAD.size - len(body))
    return _HEAD.pack(MAGIC, len(body)) + body


def read_header(fd: int, file_size: int) -> list[tuple[str, int, int, int]] | None:
    """The chunks a pack holds (``(key, offset, size, crc32)``), or None
    when the header is damaged or of another format."""
    head = os.pread(fd, _HEADER_READ, 0)
    if len(head) < _HEAD.size:
        return None
    magic, n = _HEAD.unpack_from(head)
    if magic != MAGIC or _HEAD.size + n > file_size:
        return None
    if _HEAD.size + n > len(head):
        head = os.pread(fd, _HEAD.size + n, 0)
    try:
        rows = json.loads(head[_HEAD.size:_HEAD.size + n])
        return [(str(k), int(o), int(s), int(c)) for k, o, s, c in rows]
    except (ValueError, TypeError):
        return None


def _copy_into(buf: mmap.mmap, parts: list) -> None:
    """Copy ``parts`` (bytes) one after the other into ``buf`` with the GIL
    released (``ctypes.memmove``): a pack is MiBs, and a copy of that under
    the GIL stalls the event loop and the decoding threads."""
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    pos = 0
    for part in parts:
        n = len(part)
        if n >= 64 << 10 and isinstance(part, bytes):
            ctypes.memmove(base + pos, part, n)
        else:
            buf[pos:pos + n] = part
        pos += n


class PackWriter:
    """Writes packs into ``pack_dir`` (module docs). ``direct``: try O_DIRECT."""

    def __init__(self, pack_dir: str, *, direct: bool = True):
        self.pack_dir = pack_dir
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._lock = threading.Lock()
        self._seq = 0
        self._wbufs: list[mmap.mmap] = []  # free aligned buffers for O_DIRECT writes

    def write(self, parts: list, total: int) -> str:
        """Write ``parts`` (``total`` bytes: a header and its chunks) as a
        new pack; returns its name. Raises OSError (nothing left behind)."""
        with self._lock:
            self._seq += 1
            seq = self._seq
        name = f"{time.time_ns():x}-{os.getpid()}-{seq}{PACK_SUFFIX}"
        tmp = os.path.join(self.pack_dir, f".tmp-{os.getpid()}-{threading.get_ident()}-{seq}")
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            try:
                fd = os.open(tmp, flags, 0o600)
            except FileNotFoundError:  # the dir was pruned meanwhile
                os.makedirs(self.pack_dir, mode=0o700, exist_ok=True)
                fd = os.open(tmp, flags, 0o600)
            try:
                if not (total >= _DIRECT_MIN and self._write_direct(fd, parts, total)):
                    self._write_all(fd, parts)
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(self.pack_dir, name))
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return name

    @staticmethod
    def _write_all(fd: int, parts: list) -> None:
        for part in parts:
            view = memoryview(part)
            while view:
                n = os.write(fd, view)
                view = view[n:]

    def _write_direct(self, fd: int, parts: list, size: int) -> bool:
        """Write ``parts`` (``size`` bytes) to the empty file ``fd`` bypassing
        the page cache (O_DIRECT from an aligned buffer, then cut to size):
        buffered writes cost many times the CPU (page cache allocation,
        dirty accounting, writeback) and the cached copy is rarely read
        again (the kernel's FUSE page cache keeps the file data readers
        asked for). False (nothing written) when the file system refuses
        O_DIRECT; the caller then writes normally."""
        if not self.direct:
            return False
        padded = (size + ALIGN - 1) // ALIGN * ALIGN
        try:
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_DIRECT)
        except OSError:
            self.direct = False
            return False
        buf = self._take_wbuf(padded)
        try:
            return self._write_direct_from(fd, fl, buf, parts, size, padded)
        finally:
            self._give_wbuf(buf)

    def _take_wbuf(self, size: int) -> mmap.mmap:
        """A page-aligned buffer of at least ``size`` bytes: a reused one
        when there is one (the first touch of a fresh page costs a fault and
        a zeroing, about as much as the copy itself)."""
        with self._lock:
            for i, b in enumerate(self._wbufs):
                if len(b) >= size:
                    return self._wbufs.pop(i)
        return mmap.mmap(-1, -(-size // _WBUF_STEP) * _WBUF_STEP, flags=mmap.MAP_PRIVATE)

    def _give_wbuf(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._wbufs) < _WBUFS:
                self._wbufs.append(buf)
                return
            smallest = min(range(len(self._wbufs)), key=lambda i: len(self._wbufs[i]))
            if len(self._wbufs[smallest]) < len(buf):
                buf, self._wbufs[smallest] = self._wbufs[smallest], buf
        buf.close()

    def _write_direct_from(self, fd: int, fl: int, buf: mmap.mmap, parts: list, size: int,
                           padded: int) -> bool:
        _copy_into(buf, parts)
        if padded > size:
            buf[size:padded] = bytes(padded - size)
        view = memoryview(buf)[:padded]
        try:
            done = 0
            while done < padded:
                n = os.write(fd, view[done:])
                if n <= 0 or n % ALIGN:
                    raise OSError(errno.EIO, "short direct write")
                done += n
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self.direct = False  # alignment rules of this file system: write normally
            os.ftruncate(fd, 0)
            fcntl.fcntl(fd, fcntl.F_SETFL, fl)
            os.lseek(fd, 0, os.SEEK_SET)
            return False
        finally:
            view.release()
        if padded > size:
            os.ftruncate(fd, size)
        return True


class PackFiles:
    """Kept-open descriptors of the packs in ``pack_dir`` (an LRU bounded by
    the fd limit) and the reads on them. Every read returns None when the
    pack is gone or unreadable; the caller decides what that means."""

    def __init__(self, pack_dir: str, *, direct: bool = True):
        self.pack_dir = pack_dir
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._lock = threading.Lock()
        self._fds: OrderedDict[str, int] = OrderedDict()
        # Descriptors taken from _fds (pack dropped, LRU) wait here until no
        # pread is running (_busy == 0).
        self._garbage: list[int] = []
        self._busy = 0
        self._touched: dict[str, float] = {}  # pack -> when its mtime was last touched
        try:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ImportError, OSError, ValueError):
            soft = 1024
        if soft < 0:  # RLIM_INFINITY
            soft = 1 << 20
        self._max_fds = max(16, min(_MAX_FDS, soft // 4))
        self._nowait = bool(_RWF_NOWAIT)  # preadv2(RWF_NOWAIT) works here (page cache probe)

    def forget(self, name: str) -> None:
        """Close pack ``name``'s descriptors (once no read uses them)."""
        with self._lock:
            for slot in (name, name + _DIRECT_SLOT):
                fd = self._fds.pop(slot, None)
                if fd is not None:
                    self._garbage.append(fd)
            garbage = self._take_garbage()
        for x in garbage:
            _close(x)

    def _take_garbage(self) -> list[int]:
        """Under ``_lock``: the descriptors to close now (none while a pread runs)."""
        if self._busy or not self._garbage:
            return []
        garbage, self._garbage = self._garbage, []
        return garbage

    def _acquire(self, name: str, direct: bool = False) -> int | None:
        """A kept-open descriptor of pack ``name`` (touched for the LRU when
        opened; ``direct``: opened with O_DIRECT), or None when it is gone.
        Give it back with :meth:`_release`."""
        slot = name + _DIRECT_SLOT if direct else name
        with self._lock:
            fd = self._fds.get(slot)
            if fd is not None:
                self._fds.move_to_end(slot)
                self._busy += 1
                return fd
        flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
        try:
            fd = os.open(os.path.join(self.pack_dir, name), flags)
        except OSError:
            return None
        if not direct:
            now = time.monotonic()
            if now - self._touched.get(name, -_TOUCH_EVERY) >= _TOUCH_EVERY:
                self._touched[name] = now
                try:
                    os.utime(fd)  # LRU order of the disk budget
                except OSError:
                    pass
        with self._lock:
            old = self._fds.get(slot)
            if old is not None:  # another thread opened it meanwhile: use that one
                self._fds.move_to_end(slot)
                self._garbage.append(fd)
                fd = old
            else:
                self._fds[slot] = fd
                while len(self._fds) > self._max_fds:
                    self._garbage.append(self._fds.popitem(last=False)[1])
            self._busy += 1
        return fd

    def _release(self) -> None:
        with self._lock:
            self._busy -= 1
            garbage = self._take_garbage()
        for x in garbage:
            _close(x)

    def pread(self, name: str, length: int, offset: int) -> bytes | None:
        fd = self._acquire(name)
        if fd is None:
            return None
        try:
            return os.pread(fd, length, offset)
        except OSError:
            return None
        finally:
            self._release()

    def pread_piece(self, name: str, offset: int, length: int, whole: tuple[int, int]):
        """``length`` bytes at ``offset`` (a bytearray), or None. When they
        are not in the page cache (``RWF_NOWAIT`` says so) the kernel is
        asked to read ``whole`` (offset, size: the chunk around them) in the
        background, so the next reads of it do not wait for the disk."""
        fd = self._acquire(name)
        if fd is None:
            return None
        buf = bytearray(length)
        try:
            got = 0
            if self._nowait:
                try:
                    got = os.preadv(fd, [buf], offset, _RWF_NOWAIT)
                except BlockingIOError:
                    pass
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise
                    self._nowait = False
            if got < length:  # not (all) in the page cache
                got += os.preadv(fd, [memoryview(buf)[got:]], offset + got)
                if whole[1] > length:
                    os.posix_fadvise(fd, whole[0], whole[1], os.POSIX_FADV_WILLNEED)
        except OSError:
            got = -1
        finally:
            self._release()
        return buf if got == length else None

    def read_into(self, name: str, offset: int, length: int, buf) -> memoryview | None:
        """Read ``length`` bytes at ``offset`` of pack ``name`` into ``buf``
        (a page-aligned writable buffer of at least ``length + 2 * 4096``
        bytes) and return the view of them in it, or None (gone, short).
        Uses O_DIRECT where the file system allows it: the disk writes
        straight into ``buf``, with no page-cache copy."""
        if self.direct:
            start = offset - offset % ALIGN
            end = -(-(offset + length) // ALIGN) * ALIGN
            if end - start <= len(buf):
                fd = self._acquire(name, direct=True)
                if fd is None:
                    return None
                try:
                    got = os.preadv(fd, [memoryview(buf)[: end - start]], start)
                except OSError as e:
                    got = None
                    if e.errno == errno.EINVAL:  # this file system's O_DIRECT rules
                        self.direct = False
                finally:
                    self._release()
                if got is not None:
                    if got < offset + length - start:
                        return None
                    return memoryview(buf)[offset - start : offset - start + length]
        if length > len(buf):
            return None
        fd = self._acquire(name)
        if fd is None:
            return None
        try:
            got = os.preadv(fd, [memoryview(buf)[:length]], offset)
        except OSError:
            return None
        finally:
            self._release()
        return memoryview(buf)[:length] if got == length else None

    def close(self) -> None:
        with self._lock:
            self._garbage.extend(self._fds.values())
            self._fds.clear()
            garbage = self._take_garbage()
        for x in garbage:
            _close(x)
