"""What both layer writers share (``writer``: eStargz, ``zstdwriter``:
zstd:chunked): the input tar opened seekable and read at offsets, one shape
of TOC entry metadata per tar member, the buffered output and cancellation.

Contracts: :func:`open_tar_input` gives a seekable file holding the
*uncompressed* tar (a gzip or zstd input is inflated into a temporary file);
:func:`reader_at` reads exactly ``n`` bytes at an offset or raises
:class:`FormatError`; :func:`toc_entry` gives the metadata keys both TOC
formats share (``name``, ``type``, ``size``, ``modtime``, ``linkName``,
``mode``, ``uid``, ``gid``, ``devMajor``/``devMinor``, base64 ``xattrs``),
each omitted when empty or zero as Go's ``omitempty`` does; each writer adds
its own keys and its own key order.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable
from datetime import UTC, datetime

import zstandard
from isal import isal_zlib

from ..errors import CoreError, FormatError, NotFoundError
from .footer import GZIP_MAGIC, ZSTD_FRAME_MAGIC

_IO_PIECE = 1 << 20


class ConversionCancelled(CoreError):
    """The caller asked the writer to stop."""


def open_tar_input(src, tmpdir: str | None, check: Callable[[], None]):
    """A seekable binary file holding the uncompressed tar, and a cleanup."""
    own = None
    if isinstance(src, (str, os.PathLike)):
        try:
            f = own = open(src, "rb")
        except OSError as e:
            raise NotFoundError(f"cannot open {os.fspath(src)}: {e.strerror}") from None
    else:
        f = src
    head = f.read(4)
    f.seek(0)
    if head[:2] != GZIP_MAGIC and head[:4] != ZSTD_FRAME_MAGIC:
        if f.seekable():
            return f, (lambda: own.close() if own else None)
    tmp = tempfile.TemporaryFile(dir=tmpdir, prefix="stargz-tui-tar-")
    try:
        if head[:2] == GZIP_MAGIC:
            d = isal_zlib.decompressobj(31)
            while True:
                check()
                piece = f.read(_IO_PIECE)
                if not piece:
                    break
                while piece:
                    try:
                        tmp.write(d.decompress(piece))
                    except isal_zlib.error as e:
                        raise FormatError(f"input is not valid gzip: {e}") from None
                    if d.eof:
                        piece = d.unused_data
                        d = isal_zlib.decompressobj(31)
                    else:
                        piece = b""
        elif head[:4] == ZSTD_FRAME_MAGIC:
            reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            try:
                while True:
                    check()
                    piece = reader.read(_IO_PIECE)
                    if not piece:
                        break
                    tmp.write(piece)
            except zstandard.ZstdError as e:
                raise FormatError(f"input is not valid zstd: {e}") from None
        else:
            shutil.copyfileobj(f, tmp, _IO_PIECE)
        tmp.seek(0)
    except BaseException:
        tmp.close()
        raise
    finally:
        if own:
            own.close()
    return tmp, tmp.close


def toc_modtime(mtime) -> str:
    try:
        t = round(float(mtime))
    except (TypeError, ValueError):
        return ""
    if t == 0:
        return ""
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return ""


def tar_xattrs(ti: tarfile.TarInfo) -> dict[str, str]:
    out = {}
    for k, v in ti.pax_headers.items():
        if k.startswith("SCHILY.xattr."):
            out[k[len("SCHILY.xattr."):]] = base64.b64encode(
                v.encode("utf-8", "surrogateescape")).decode()
        elif k.startswith("LIBARCHIVE.xattr."):
            try:
                out[k[len("LIBARCHIVE.xattr."):]] = base64.b64encode(base64.b64decode(v + "==")).decode()
            except ValueError:
                continue
    return out


TAR_TYPES = {
    tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.CONTTYPE: "reg",
    tarfile.LNKTYPE: "hardlink", tarfile.SYMTYPE: "symlink", tarfile.DIRTYPE: "dir",
    tarfile.CHRTYPE: "char", tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
}


def require_utf8(ti: tarfile.TarInfo) -> None:
    """Refuse a member whose name or link target is not UTF-8: a TOC is JSON,
    which holds only Unicode (Go's writers would silently turn such bytes
    into U+FFFD, naming another file)."""
    for what, text in (("name", ti.name), ("link target", ti.linkname)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise FormatError(f"tar member '{shown}': its {what} is not UTF-8, which a TOC "
                              "(JSON) cannot hold") from None


def toc_entry(ti: tarfile.TarInfo, typ: str) -> dict:
    """The TOC metadata both formats give a member of type ``typ`` (a value
    of :data:`TAR_TYPES`), in no particular key order."""
    e: dict = {"name": ti.name, "type": typ}
    if typ == "reg" and ti.size:
        e["size"] = ti.size
    mt = toc_modtime(ti.mtime)
    if mt:
        e["modtime"] = mt
    if typ in ("symlink", "hardlink") and ti.linkname:
        e["linkName"] = ti.linkname
    if ti.mode:
        e["mode"] = ti.mode
    if ti.uid:
        e["uid"] = ti.uid
    if ti.gid:
        e["gid"] = ti.gid
    if typ in ("char", "block"):
        if ti.devmajor:
            e["devMajor"] = ti.devmajor
        if ti.devminor:
            e["devMinor"] = ti.devminor
    xa = tar_xattrs(ti)
    if xa:
        e["xattrs"] = xa
    return e


def reader_at(f) -> Callable[[int, int], bytes]:
    """``read_at(offset, n)``: exactly ``n`` bytes of ``f`` at ``offset``
    (``pread`` when ``f`` has a file descriptor), else :class:`FormatError`."""
    try:
        fd = f.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        fd = None

    def read_at(off: int, n: int) -> bytes:
        if fd is not None:
            data = os.pread(fd, n, off)
        else:
            f.seek(off)
            data = f.read(n)
        if len(data) != n:
            raise FormatError("input tar is truncated")
        return data
    return read_at


def cancel_check(cancel: threading.Event | None) -> Callable[[], None]:
    """A function a writer calls between pieces of work: raises
    :class:`ConversionCancelled` once ``cancel`` is set."""
    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise ConversionCancelled("conversion cancelled")
    return check


@contextlib.contextmanager
def buffered_output(dst):
    """A 1 MiB-buffered binary writer over ``dst``: a path (created, and
    closed here) or a writable binary file (left open). Flushed when the
    block ends without an error."""
    own = None
    if isinstance(dst, (str, os.PathLike)):
        try:
            own = open(dst, "wb")
        except OSError as e:
            raise CoreError(f"cannot write {os.fspath(dst)}: {e.strerror}") from None
    try:
        out = io.BufferedWriter(_Unclosable(own if own is not None else dst), 1 << 20)
        yield out
        out.flush()
    finally:
        if own is not None:
            own.close()


class _Unclosable(io.RawIOBase):
    """The writer's target, which closing the buffer over it must not close."""

    def __init__(self, f):
        self.f = f

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.f.write(b)
        return len(b)


__all__ = ["ConversionCancelled", "TAR_TYPES", "buffered_output", "cancel_check",
           "open_tar_input", "reader_at", "require_utf8", "tar_xattrs", "toc_entry",
           "toc_modtime"]
