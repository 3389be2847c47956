"""The optimize loop: record what a workload opens, rebuild the image so the
files it reads first sit before each layer's prefetch landmark.

* :func:`workload` -- argv, environment and working dir of the run, from the
  image config (``Entrypoint`` + ``Cmd``, ``Env``, ``WorkingDir``) unless a
  command is given (it replaces entrypoint and cmd).
* ``await record_workload(src, cmd, ...) -> RunResult``: mounts ``src``
  merged with a record file (:mod:`core.record`), runs the command chrooted
  in it through :mod:`core.sandbox` (own mount and PID namespaces; a user
  namespace as a plain user) for at most ``period`` seconds, then kills
  what is left, unmounts and reads the record. A command that fails or
  times out still gives its record; ``RunResult`` says how it ended. A
  command that cannot start (not in the image, no shell, no user
  namespaces) raises :class:`CoreError` with one line.
* ``await optimize_image(src, dst, entries, ...) -> OptimizeResult``: assigns
  each recorded path to the layer it comes from (the record's
  ``layerIndex``, else the merged view), converts those layers to eStargz
  with the paths prioritised (recorded order, then the prefetch landmark)
  and copies every lazy layer with nothing recorded byte-identical. Paths
  not in the image are listed in ``missed``, never fatal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from .errors import CoreError, FormatError
from .record import RecordEntry, read_record

DEFAULT_PERIOD = 10.0  # ctr-remote image optimize's --period
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SHELLS = {"sh", "bash", "ash", "dash", "zsh", "busybox"}


@dataclass
class RunResult:
    argv: list[str]
    status: int | None  # the command's exit status; None when it was killed at the period
    timed_out: bool
    seconds: float
    entries: list[RecordEntry]
    record_file: str | None  # None: kept in memory only (no --record-out)

    def describe(self) -> str:
        if self.timed_out:
            return f"stopped after the {self.seconds:.1f} s period (still running)"
        if self.status == 0:
            return f"exited with status 0 after {self.seconds:.1f} s"
        if self.status is not None and self.status > 128:
            return f"was killed by signal {self.status - 128} after {self.seconds:.1f} s"
        return f"failed with exit status {self.status} after {self.seconds:.1f} s"


@dataclass
class OptimizeResult:
    convert: object  # core.convert.ConvertResult
    prioritized: dict[int, list[str]] = field(default_factory=dict)  # layer -> paths
    kept: list[int] = field(default_factory=list)  # layers copied byte-identical
    missed: list[str] = field(default_factory=list)


def workload(config: dict, cmd: list[str] | None, image: str = "the image"
             ) -> tuple[list[str], dict[str, str], str]:
    c = (config or {}).get("config") or {}
    env: dict[str, str] = {}
    for kv in c.get("Env") or []:
        if isinstance(kv, str) and "=" in kv:
            k, _, v = kv.partition("=")
            env[k] = v
    env.setdefault("PATH", DEFAULT_PATH)
    cwd = c.get("WorkingDir") or "/"
    argv = list(cmd or [])
    if not argv:
        argv = [str(a) for a in (c.get("Entrypoint") or []) + (c.get("Cmd") or [])]
    if not argv:
        raise CoreError(f"{image} has no entrypoint or command in its config; "
                        "give one after --")
    return argv, env, cwd


def start_error(line: str, image: str, argv: list[str], cwd: str) -> CoreError:
    kind, _, detail = line.partition(" ")
    if kind == "userns":
        return CoreError("cannot run the command as a plain user: user namespaces are not "
                         f"available here ({detail}); run optimize as root or use --record-in")
    if kind == "notfound":
        if os.path.basename(detail) in SHELLS:
            return CoreError(f"{image} has no shell ({detail} is not in the image)")
        return CoreError(f"command {detail} not found in {image}")
    if kind == "cwd":
        return CoreError(f"the working directory {cwd} is not in {image}")
    if kind == "exec":
        return CoreError(f"cannot run {detail} in {image}")
    return CoreError(f"cannot start {argv[0]} in {image}: {detail}")


def _run_sandboxed(root: str, argv: list[str], env: dict[str, str], cwd: str,
                   period: float, stdout, stderr) -> tuple[int | None, bool, float, str]:
    """Run argv chrooted in ``root``; (status, timed_out, seconds, start error)."""
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "core.sandbox", "--root", root, "--cwd", cwd,
           "--status-fd", str(w)]
    for k, v in env.items():
        cmd += ["--env", f"{k}={v}"]
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen([*cmd, "--", *argv], stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=stderr, pass_fds=(w,), cwd=pkg_parent,
                                start_new_session=True)
    finally:
        os.close(w)
    timed_out = False
    try:
        status = proc.wait(timeout=period)
    except subprocess.TimeoutExpired:
        timed_out = True
        status = None
    finally:
        # the sandbox, and the PID namespace whose init is its child, all go
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    seconds = time.monotonic() - t0
    with os.fdopen(r, "rb") as f:
        line = f.read().decode("utf-8", "replace").strip()
    err = line[6:] if line.startswith("error ") else ""
    return status, timed_out, seconds, err


async def record_workload(src: str, cmd: list[str] | None, *, period: float = DEFAULT_PERIOD,
                          record_out: str | None = None, platform: str | None = None,
                          cache_dir: str | None = None, stdout=None, stderr=None) -> RunResult:
    import anyio.to_thread

    from .image import open_image
    from .mount import mount_image, unmount

    img = await open_image(src, platform=platform)
    await img.store.aclose()
    argv, env, cwd = workload(img.config, cmd, src)
    tmp = tempfile.mkdtemp(prefix="stargz-tui-optimize-")
    record_file = os.path.abspath(record_out) if record_out else os.path.join(tmp, "record.json")
    root = os.path.join(tmp, "root")
    os.mkdir(root, 0o755)
    try:
        await mount_image(src, root, platform=platform, record=record_file,
                          background_fetch=False, cache_dir=cache_dir)
        try:
            status, timed_out, seconds, err = await anyio.to_thread.run_sync(
                _run_sandboxed, root, argv, env, cwd, period, stdout, stderr)
        finally:
            await anyio.to_thread.run_sync(lambda: unmount(root, force=True))
        if err:
            raise start_error(err, src, argv, cwd)
        entries = read_record(record_file)
    finally:
        from .mount import is_mounted

        if not is_mounted(root):  # never walk into a mount left behind
            shutil.rmtree(tmp, ignore_errors=True)
    return RunResult(argv, None if timed_out else status, timed_out, seconds, entries,
                     record_file if record_out else None)


async def _layer_indexes(image) -> list:
    """Each layer's index, or None for a layer that is not lazily readable."""
    from .estargz import load_layer_index

    out = []
    for desc in image.layers:
        source = image.store.blob_source(desc.digest, desc.size)
        try:
            out.append(await load_layer_index(
                source, expected_toc_digest=desc.toc_digest_annotation))
        except FormatError:
            out.append(None)
        finally:
            with contextlib.suppress(Exception):
                await source.aclose()
    return out


def assign_layers(image, indexes: list, entries: list[RecordEntry]
                  ) -> tuple[dict[int, list[str]], list[str]]:
    """Recorded paths per layer (recorded order) and the paths no layer has."""
    from .overlay import MergedTree

    per: dict[int, list[str]] = {}
    missed: list[str] = []
    n = len(image.layers)
    all_lazy = all(ix is not None for ix in indexes)
    tree = MergedTree(indexes) if all_lazy else None

    def is_file(ix, path: str) -> bool:
        e = ix.lookup(path)
        return e is not None and e.type in ("reg", "hardlink")

    for e in entries:
        layer = e.layer
        if (layer is None or not 0 <= layer < n
                or (e.manifest_digest and e.manifest_digest != image.manifest_digest)):
            layer = None  # a list from elsewhere: the layer the merged view shows it from
        if layer is not None:
            ix = indexes[layer]
            if ix is None or is_file(ix, e.path):
                per.setdefault(layer, []).append(e.path)
            else:
                missed.append(e.path)
        elif tree is not None:
            found = tree.lookup(e.path)
            if found is not None and found[1].type in ("reg", "hardlink"):
                per.setdefault(found[0], []).append(e.path)
            else:
                missed.append(e.path)
        else:  # some layer is not lazy: upstream's way, the path goes to every layer
            hit = False
            for i, ix in enumerate(indexes):
                if ix is None or is_file(ix, e.path):
                    per.setdefault(i, []).append(e.path)
                    hit = hit or ix is not None
            if not hit and all(ix is not None for ix in indexes):
                missed.append(e.path)
    return per, missed


async def optimize_image(src: str, dst: str, entries: list[RecordEntry], *,
                         platform: str | None = None, chunk_size: int | None = None,
                         progress=None, **registry_options) -> OptimizeResult:
    from .convert import convert_image, open_writer
    from .image import open_image
    from .reference import parse_reference

    dst_ref = parse_reference(dst)
    image = await open_image(src, platform=platform, **registry_options)
    try:
        indexes = await _layer_indexes(image)
        per, missed = assign_layers(image, indexes, entries)
        kept = [i for i, ix in enumerate(indexes) if i not in per and ix is not None]

        def plan(desc):
            if desc.index in kept:
                return None
            return per.get(desc.index, [])

        writer = open_writer(dst_ref, **registry_options)
        kw = {"chunk_size": chunk_size} if chunk_size else {}
        try:
            result = await convert_image(image, writer, tag=dst_ref.tag, plan=plan,
                                         progress=progress, **kw)
        finally:
            await writer.aclose()
    finally:
        await image.store.aclose()
    if not all(ix is not None for ix in indexes):
        # paths spread over layers without an index: missed when no layer had them
        lacked = {c.index: set(c.missed_prioritized) for c in result.layers}
        for p in dict.fromkeys(p for ps in per.values() for p in ps):
            if p not in missed and all(p in lacked.get(i, ()) for i, ps in per.items()
                                       if p in ps):
                missed.append(p)
        per = {i: [p for p in ps if p not in lacked.get(i, ())] for i, ps in per.items()}
    return OptimizeResult(result, per, kept, missed)
