"""Mount processes and the measuring primitives (reads, find, random IOPS)."""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import time

FUSERMOUNT = "fusermount3"


def drop_caches() -> bool:
    """Drop the kernel page cache (root only). Returns whether it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def wait_until(pred, timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def unmount(mp: str) -> None:
    """Unmount ``mp`` if mounted (normal, then lazy)."""
    for args in ([FUSERMOUNT, "-u", mp], [FUSERMOUNT, "-u", "-z", mp], ["umount", "-l", mp]):
        if not os.path.ismount(mp):
            return
        subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        wait_until(lambda: not os.path.ismount(mp), 5)


class MountProcess:
    """A foreground FUSE server process serving one mountpoint.

    ``ready`` is either ``"line"`` (it prints a line with ``ready``) or
    ``"mount"`` (wait until the mountpoint is mounted)."""

    def __init__(self, argv: list[str], mp: str, *, ready: str = "mount", timeout: float = 120,
                 env: dict | None = None, log: str | None = None):
        self.argv = argv
        self.mp = mp
        self.ready = ready
        self.timeout = timeout
        self.env = env
        self.log = log
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> MountProcess:
        os.makedirs(self.mp, exist_ok=True)
        unmount(self.mp)
        err = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=err,
                                     stdin=subprocess.DEVNULL, env=self.env)
        if err is not subprocess.DEVNULL:
            err.close()
        try:
            if self.ready == "line":
                deadline = time.monotonic() + self.timeout
                while time.monotonic() < deadline:
                    line = self.proc.stdout.readline()
                    if not line:
                        raise RuntimeError(f"{self.argv[0]} exited before it was ready "
                                           f"(status {self.proc.wait(5)})")
                    if b"ready" in line:
                        break
            if not wait_until(lambda: os.path.ismount(self.mp) or self.proc.poll() is not None,
                              self.timeout):
                raise RuntimeError(f"{self.argv[0]} did not mount {self.mp}")
            if not os.path.ismount(self.mp):
                raise RuntimeError(f"{self.argv[0]} exited (status {self.proc.poll()}) "
                                   f"without mounting {self.mp}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        unmount(self.mp)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        unmount(self.mp)


def read_all(path: str, bufsize: int = 1 << 20) -> tuple[int, float]:
    """Read a file sequentially; returns (bytes, seconds)."""
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            got = os.readv(fd, [mv])
            if got <= 0:
                break
            n += got
    finally:
        os.close(fd)
    return n, time.perf_counter() - t0


def direct_read_rate(paths: list[str], part: int = 4 << 20) -> float:
    """Read ``paths`` whole with O_DIRECT in ``part``-sized reads into one
    reused aligned buffer, one after another (queue depth 1, what the
    daemon's disk read-ahead does per reader), page cache dropped first;
    returns MB/s. What the disk itself gives a reader of those files."""
    drop_caches()
    buf = mmap.mmap(-1, part)  # page-aligned, as O_DIRECT needs
    n = 0
    t0 = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        try:
            off = 0
            while True:
                got = os.preadv(fd, [buf], off)
                n += got
                off += got
                if got < part:
                    break
        finally:
            os.close(fd)
    dt = time.perf_counter() - t0
    buf.close()
    return n / dt / 1e6


def first_byte(path: str, timeout: float = 120) -> float:
    """Open and read one byte of ``path``; returns the time it took."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        if not os.read(fd, 1):
            raise RuntimeError(f"{path} is empty")
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def find_ls(root: str, timeout: float = 600) -> tuple[float, int]:
    """``find ROOT -ls``; returns (seconds, lines)."""
    t0 = time.perf_counter()
    p = subprocess.run(["find", root, "-ls"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                       timeout=timeout)
    dt = time.perf_counter() - t0
    return dt, p.stdout.count(b"\n")


def random_reads(paths_sizes: list[tuple[str, int]], count: int, seed: int = 1,
                 block: int = 4096) -> float:
    """``count`` random ``block``-sized preads across the files (readahead
    off); returns IOPS."""
    rnd = random.Random(seed)
    fds = []
    try:
        for p, _ in paths_sizes:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            fds.append(fd)
        plan = []
        for _ in range(count):
            i = rnd.randrange(len(fds))
            size = paths_sizes[i][1]
            off = rnd.randrange(max(1, size - block + 1)) // block * block
            plan.append((fds[i], off))
        t0 = time.perf_counter()
        for fd, off in plan:
            os.pread(fd, block, off)
        dt = time.perf_counter() - t0
    finally:
        for fd in fds:
            os.close(fd)
    return count / dt
