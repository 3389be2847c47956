"""The first run of a daemon's code, done before a mount needs it.

A daemon forked from the mount service shares the service's pages until it
writes them, and a first run writes many (reference counts, caches, a trio
run's setup, the thread pool): done while a user waits, that is several
milliseconds of page copies on each mount. A spare daemon
(:class:`core.starter.Spare`) runs :func:`warm_up` before it is needed: one
trio run that indexes a tiny eStargz layer built in memory, the way a mount
indexes its layer's TOC, while the registry client sends one request that
this process answers itself on loopback (the first request is the costliest
first run). Nothing of a mount's (no registry, no cache dir, no config file)
is touched, so nothing it does can be stale when the mount comes.

:func:`prepare` builds that layer in the service (its bytes are then shared
by every spare forked after).
"""

from __future__ import annotations

import hashlib
import io
import tarfile

_sample: bytes | None = None


def prepare() -> None:
    """Build the sample layer now (in the process spares are forked from)."""
    global _sample
    if _sample is None:
        _sample = _build_sample()


def _build_sample() -> bytes:
    from .estargz.writer import build_estargz

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        d = tarfile.TarInfo("etc")
        d.type = tarfile.DIRTYPE
        d.mode = 0o755
        tar.addfile(d)
        body = b"a spare daemon's first TOC\n"
        f = tarfile.TarInfo("etc/motd")
        f.size = len(body)
        f.mode = 0o644
        tar.addfile(f, io.BytesIO(body))
    raw.seek(0)
    out = io.BytesIO()
    build_estargz(raw, out)
    return out.getvalue()


class _SampleSource:
    """The sample layer as a blob source."""

    def __init__(self, blob: bytes):
        self.blob = blob
        self.size = len(blob)
        self.digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        self.description = "the warm-up sample layer"

    async def read_range(self, offset: int, length: int) -> bytes:
        return self.blob[offset:offset + length]

    async def aclose(self) -> None:
        return None


def warm_up() -> None:
    """One trio run indexing the sample layer and sending one registry-client
    request, as a daemon's first steps do."""
    import anyio

    from .estargz.loader import load_layer_index

    prepare()
    source = _SampleSource(_sample)

    async def first_steps() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_first_request)
            index = await load_layer_index(source)
            await anyio.to_thread.run_sync(index.prepare)

    anyio.run(first_steps, backend="trio")


async def _first_request() -> None:
    """One request of the registry client, answered on loopback by this
    process (an empty ``/v2/`` answer, as a registry without auth gives)."""
    import anyio

    from .registry.client import RegistryClient
    from .registry.config import RegistryConfig

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def answer(stream) -> None:
        async with stream:
            got = b""
            while b"\r\n\r\n" not in got:
                got += await stream.receive()
            await stream.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 2\r\nConnection: close\r\n\r\n{}")

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, answer)
        client = RegistryClient(f"127.0.0.1:{port}", config=RegistryConfig(),
                                use_keyring=False, max_attempts=1)
        try:
            await client.request("GET", "/v2/")
        finally:
            await client.aclose()
        tg.cancel_scope.cancel()


__all__ = ["prepare", "warm_up"]
