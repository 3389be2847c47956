"""The FUSE request loop's short poll before it sleeps (core.fuseloop): the
window's setting, the stand-in trio module, that tasks waiting on I/O still
run during an unbroken stream of requests, and a real mount answering
reads and its control socket the same with and without the poll."""

from __future__ import annotations

import os
import random
import socket
import tarfile
import threading

import pytest
import trio
from fuse_helpers import FIXTURES, isolated_mount_env, layer_blobs

from core import fuseloop
from core import mount as core_mount
from core.options import Tuning


@pytest.mark.parametrize(("raw", "seconds"), [
    (None, 50e-6), ("", 50e-6), ("0", 0.0), ("20", 20e-6), ("5000", 1e-3), ("-3", 0.0),
    ("fast", 50e-6),
])
def test_spin_window_from_the_environment(monkeypatch, raw, seconds):
    if raw is None:
        monkeypatch.delenv("STARGZ_TUI_FUSE_SPIN_US", raising=False)
    else:
        monkeypatch.setenv("STARGZ_TUI_FUSE_SPIN_US", raw)
    # read once at the edge (core.options.Tuning), handed to fuseloop.install
    assert Tuning.from_env().fuse_spin_us / 1e6 == pytest.approx(seconds)


def test_stand_in_is_trio_but_for_wait_readable():
    mod = fuseloop.polling_trio(50e-6)
    assert mod.open_nursery is trio.open_nursery and mod.Lock is trio.Lock
    assert mod.ClosedResourceError is trio.ClosedResourceError
    assert mod.lowlevel.current_trio_token is trio.lowlevel.current_trio_token
    assert mod.lowlevel.wait_readable is not trio.lowlevel.wait_readable


def test_polling_wait_returns_falls_back_and_lets_io_waiters_run():
    """A ready fd is seen by the poll; a quiet one is handed to trio (the
    wait ends when data comes later); and a task waiting on a socket gets
    to run while the loop keeps finding its fd ready without ever sleeping."""
    wait = fuseloop.polling_trio(50e-6).lowlevel.wait_readable
    ready_a, ready_b = socket.socketpair()
    late_a, late_b = socket.socketpair()
    other_a, other_b = socket.socketpair()
    ready_b.send(b"x")  # stays unread: ready_a is readable throughout
    other_b.send(b"y")
    seen = {}

    async def io_waiter():
        await trio.lowlevel.wait_readable(other_a)  # not runnable until the scheduler polls
        seen["io"] = True

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(io_waiter)
            await trio.sleep(0)  # the waiter registers its wait
            # An unbroken stream of ready requests, bounded: the waiter must
            # get its turn long before the bound.
            for n in range(1, 2_000_001):
                await wait(ready_a.fileno())
                if seen.get("io"):
                    seen["after"] = n
                    break
            # A quiet fd: the poll gives up and trio's own wait takes over.
            nursery.start_soon(_send_later, late_b)
            with trio.fail_after(30):
                await wait(late_a.fileno())
            seen["late"] = True

    async def _send_later(sock):
        await trio.sleep(0.05)
        sock.send(b"z")

    try:
        trio.run(main)
    finally:
        for s in (ready_a, ready_b, late_a, late_b, other_a, other_b):
            s.close()
    assert seen.get("io") and seen.get("after") and seen.get("late")


def test_an_empty_window_makes_the_next_waits_sleep_at_once():
    """Polling backs off when it finds nothing (a reader pausing longer than
    the window between requests must not keep a core polling), and a window
    that catches a request resets it. The late data is sent by a task that
    only the scheduler can run, so no window can see it early."""
    wait = fuseloop.polling_trio(50e-6).lowlevel.wait_readable
    ready_a, ready_b = socket.socketpair()
    late_a, late_b = socket.socketpair()
    ready_b.send(b"x")
    counts = []

    async def main():
        async with trio.open_nursery() as nursery:
            await wait(ready_a.fileno())  # caught at once
            counts.append((wait.caught, wait.missed))

            async def send_later():
                await trio.sleep(0.01)
                late_b.send(b"z")

            nursery.start_soon(send_later)
            await trio.sleep(0)  # the sender is asleep now, not runnable
            with trio.fail_after(30):
                await wait(late_a.fileno())  # the window runs out, trio waits
            counts.append((wait.caught, wait.missed))
            await wait(ready_a.fileno())  # backing off: sleeps at once, no window
            counts.append((wait.caught, wait.missed))
            await wait(ready_a.fileno())  # polls again: caught, back-off reset
            counts.append((wait.caught, wait.missed))

    try:
        trio.run(main)
    finally:
        for s_ in (ready_a, ready_b, late_a, late_b):
            s_.close()
    assert counts == [(1, 0), (1, 1), (1, 1), (2, 1)]


@pytest.fixture
def mount_env(tmp_path, monkeypatch):
    yield from isolated_mount_env(tmp_path, monkeypatch)


@pytest.mark.fuse
@pytest.mark.parametrize("spin_us", ["0", "50"])
def test_mount_serves_reads_and_its_control_socket_with_either_loop(mount_env, monkeypatch,
                                                                    spin_us):
    """Random 4 KiB reads of a mounted file return the ground truth's bytes
    while the daemon's control socket keeps answering, the poll on or off."""
    monkeypatch.setenv("STARGZ_TUI_FUSE_SPIN_US", spin_us)
    name = "data/random.bin"
    with tarfile.open(layer_blobs("mini-gzip")[0]) as tf:
        truth = tf.extractfile(name).read()
    mp = mount_env.mountpoint()
    rec = mount_env.mount(f"oci:{FIXTURES}:mini-esgz", mp, layer=0)
    control = rec["layers"][0]["control"]
    rnd = random.Random(7)
    offsets = [rnd.randrange(0, len(truth) - 4096) // 4096 * 4096 for _ in range(3000)]
    bad: list[int] = []
    done = threading.Event()

    def reader():
        fd = os.open(os.path.join(mp, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for off in offsets:
                if os.pread(fd, 4096, off) != truth[off:off + 4096]:
                    bad.append(off)
        finally:
            os.close(fd)
            done.set()

    t = threading.Thread(target=reader)
    t.start()
    answers = 0
    try:
        while not done.is_set() or answers < 5:
            assert core_mount.daemon_request(control, "ping", timeout=30)["ok"]
            answers += 1
            if answers >= 200:
                break
    finally:
        t.join(120)
    assert not t.is_alive() and not bad and answers >= 5
    with open(rec["layers"][0]["log"]) as f:
        assert f"FUSE loop polls {spin_us} µs before it sleeps" in f.read()
    core_mount.unmount(mp)
    assert not core_mount.is_mounted(mp)
