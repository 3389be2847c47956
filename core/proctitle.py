"""Name this process as ``ps`` and ``top`` show it, without a dependency.

:func:`set_title` sets the kernel's short name (``/proc/PID/comm``, what
``ps``/``top`` show by default; 15 bytes) with ``prctl(PR_SET_NAME)`` and
rewrites the command line (``/proc/PID/cmdline``, what ``ps -f``/``ps aux``
show) in place: the title is written over the memory that held ``argv``,
padded with NULs, truncated to that memory's size (as setproctitle and
PostgreSQL do). A forked layer daemon otherwise shows its parent's command
line (the mount service's) and could be taken for it. Python's own
``sys.argv`` is a copy and is not affected. Best effort: on failure the
names stay as they were.
"""

from __future__ import annotations

import ctypes
import os

PR_SET_NAME = 15


def _argv_area() -> tuple[int, int] | None:
    """(start, end) of this process's argv memory, from /proc/self/stat."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # fields after the command name (which may hold spaces) in parentheses;
    # arg_start and arg_end are fields 48 and 49 (1-based)
    rest = stat[stat.rfind(b")") + 2:].split()
    try:
        start, end = int(rest[48 - 3]), int(rest[49 - 3])
    except (IndexError, ValueError):
        return None
    return (start, end) if 0 < start < end <= start + (1 << 20) else None


def set_title(title: str) -> bool:
    """Set the process name and command line to ``title``; True if both took."""
    data = title.encode("utf-8", "replace")
    ok = True
    try:
        # the libc this process already runs on: find_library would fork and
        # exec `ldconfig -p` on every daemon start (the B1 path)
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(PR_SET_NAME, ctypes.c_char_p(data[:15]), 0, 0, 0) == 0
    except (OSError, AttributeError):
        ok = False
    area = _argv_area()
    if area is None:
        return False
    start, end = area
    size = end - start
    text = data[:size - 1] + b"\0" * (size - min(len(data), size - 1))
    try:
        fd = os.open("/proc/self/mem", os.O_RDWR)
        try:
            os.pwrite(fd, text, start)
        finally:
            os.close(fd)
    except OSError:
        return False
    return ok
