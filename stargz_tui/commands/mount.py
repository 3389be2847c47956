"""``mount``, ``unmount``, ``mounts`` and ``cache``: thin clients of core.mount."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time

from core.errors import MountError
from core.options import MountOptions
from core.units import human_size, parse_size, plural

from ..mountargs import MOUNT_FLAGS, fields_from
from ..mountclient import UNVERIFIED_WARNING, mounted_line
from ..textsafe import safe
from .registry import add_registry_options
from .registry import seconds_arg as _seconds

MOUNT_EXAMPLES = """\
examples:
  stargz-tui mount localhost:5000/app:esgz /mnt/app          merged image (all layers, one daemon)
  stargz-tui mount oci:./layout:mini-esgz /mnt/l0 --layer 0  one raw layer
  stargz-tui mount ghcr.io/org/app:esgz /mnt/app --wait-prefetch --cache-size 2G
  stargz-tui mount localhost:5000/app:esgz ~/mnt/app --map-owner   as a plain user: root's files are yours
  stargz-tui mount oci:./layout:mini-esgz /mnt/app --record app.json   record what gets opened

The mount is served by one background daemon (for every layer of a merged image); `stargz-tui mounts` shows
live state and `stargz-tui unmount MOUNTPOINT` stops it. MOUNTPOINT must be an
empty directory (--force mounts over a non-empty one, hiding its contents), and
only one mount of it can be under way at a time.
"""

UNMOUNT_EXAMPLES = """\
examples:
  stargz-tui unmount /mnt/app            fails (naming the processes) while files are in use
  stargz-tui unmount /mnt/app --force    force, then lazy detach; also cleans stale mounts
  stargz-tui unmount --all --force       every stargz-tui mount (without --force busy ones stay)
"""

MOUNTS_EXAMPLES = """\
examples:
  stargz-tui mounts
  stargz-tui mounts --json | jq '.[] | {mountpoint, state, bytesFetched}'
  stargz-tui mounts restore      after a reboot: every recorded mount at its mountpoint again
  stargz-tui mounts repair       also retry failed mounts; drop records of vanished mountpoints

--json prints a list of objects with mountpoint, image, kind, layers, pid, pids,
state ("serving", "stale" or "failed"), restarts and lastError (the mount service
starts a daemon that died again), bytesFetched, requests, chunksCached, chunksTotal,
prefetchDone, backgroundFetchDone, digestErrors, readErrors, record and recorded
(the record file of a recording mount and how many files it holds so far; reason
when stale).
"""

SERVICE_EXAMPLES = """\
examples:
  stargz-tui service start       start it in the background (mount does that too)
  stargz-tui service status --json
  stargz-tui service stop        the mounts keep serving

`service install` writes ~/.config/systemd/user/stargz-tui.service (then
`systemctl --user enable --now stargz-tui` runs it at every login, restoring
the mounts); `service uninstall` disables and removes it.
"""

CACHE_EXAMPLES = """\
examples:
  stargz-tui cache             usage of the chunk cache
  stargz-tui cache --json
  stargz-tui cache prune       delete every cached chunk (refused while a mount uses it)
  stargz-tui cache prune --force   also under live mounts (they fetch again)
"""


class _Core:
    """:mod:`core.mount`, imported when a command needs it: a mount through
    the service never does (its start-up is on the B1 path)."""

    def __getattr__(self, name):
        from core import mount

        return getattr(mount, name)


m = _Core()


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def mount_options(args) -> MountOptions:
    """The typed options of ``mount ARGS`` (built here, once: paths absolute
    against our cwd, tuning from our environment)."""
    return MountOptions.build(args.image, args.mountpoint, **fields_from(args))


def _service(start: bool = False):
    """A client of the mount service, or None: then the command runs here,
    through the same core API. ``STARGZ_TUI_SERVER`` (read here, at the
    edge): ``auto`` (default) uses the running service and, when ``start``,
    starts one; ``use`` only uses a running one; ``off`` never does."""
    from core.service import client

    return client.for_mode(os.environ.get("STARGZ_TUI_SERVER"), start)


def cmd_mount(args) -> int:
    opts = mount_options(args)
    svc = _service(start=True)
    if svc is not None:
        from core.service import protocol

        rec = svc.call(protocol.Mount(options=opts), timeout=opts.timeout + 60)
    else:
        rec = m.mount(opts)
    if args.allow_unverified:
        print(UNVERIFIED_WARNING, file=sys.stderr)
    print(mounted_line(rec, supervised=svc is not None))
    if args.foreground:
        return _foreground(rec)
    return 0


def _foreground(rec: dict) -> int:
    """Stay attached until the mount goes away or we are told to stop."""
    stop = []

    def on_signal(signum, frame):
        stop.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not stop:
            st = m.mount_status(rec)
            if st["state"] != "serving":
                print(f"stargz-tui: mount is no longer served: {safe(st.get('reason', ''))}",
                      file=sys.stderr)
                break
            time.sleep(1.0)
    finally:
        _unmount(rec["mountpoint"], True)
    return 0


def _unmount(mountpoint: str, force: bool) -> dict:
    svc = _service()
    if svc is None:
        return m.unmount(mountpoint, force=force)
    from core.service import protocol

    return svc.call(protocol.Unmount(mountpoint=os.path.abspath(mountpoint), force=force))


def _list_mounts() -> list[dict]:
    svc = _service()
    if svc is None:
        return m.list_mounts()
    from core.service import protocol

    return svc.call(protocol.List())


def _unmount_all(force: bool) -> int:
    """Every recorded mount, each on its own: one busy mount does not keep the
    others mounted; one line per failure on stderr, exit 1 if any failed."""
    failed = 0
    mounts = _list_mounts()
    for st in mounts:
        try:
            res = _unmount(st["mountpoint"], force)
        except MountError as e:
            print(f"stargz-tui: {safe(e)}", file=sys.stderr)
            failed += 1
            continue
        print(f"unmounted {safe(res['mountpoint'])}")
    if not mounts:
        print("no mounts")
    return 1 if failed else 0


def _refuse_own_use(mountpoint: str, force: bool) -> None:
    """Our own working directory or standard input/output inside the mount
    keeps it busy: say so, rather than naming this process (or, through the
    resident server, its client, whose cwd and stdio a worker shares) among
    the holders."""
    if force:
        return
    mp = os.path.realpath(mountpoint)
    prefix = mp.rstrip("/") + "/"

    def inside(path: str) -> bool:
        return path == mp or path.startswith(prefix)

    with contextlib.suppress(OSError):
        if inside(os.getcwd()):
            raise MountError(f"{mp} is busy: the working directory of this command is inside "
                             "it; run unmount from elsewhere (or use --force)")
    for fd, name in ((0, "standard input"), (1, "standard output"), (2, "standard error")):
        with contextlib.suppress(OSError):
            if inside(os.readlink(f"/proc/self/fd/{fd}")):
                raise MountError(f"{mp} is busy: the {name} of this command is a file inside "
                                 "it (or use --force)")


def cmd_unmount(args) -> int:
    if args.all == (args.mountpoint is not None):
        raise MountError("give a MOUNTPOINT or --all (not both)")
    if args.all:
        return _unmount_all(args.force)
    if m.is_stargz_mount(args.mountpoint):
        # (a path that is none of ours gets "not mounted" below, wherever we run)
        _refuse_own_use(args.mountpoint, args.force)
    res = _unmount(args.mountpoint, args.force)
    if res["status"] == "not-mounted":
        # like umount(8): a path that is none of our mounts is an error
        raise MountError(f"{res['mountpoint']}: not mounted (not a stargz-tui mount)")
    print(f"unmounted {safe(res['mountpoint'])}")
    return 0


def _restore(action: str, as_json: bool) -> int:
    """``mounts restore`` / ``mounts repair`` (through the service when it
    runs, so its daemons are forked and supervised; else here)."""
    svc = _service(start=True)
    if svc is not None:
        from core.service import protocol

        req = protocol.Restore() if action == "restore" else protocol.Repair()
        results = svc.call(req, timeout=600)
    else:
        results = m.restore() if action == "restore" else m.repair()
    if as_json:
        print(json.dumps(results, indent=2))
    elif not results:
        print("no mounts")
    for r in results if not as_json else ():
        line = f"{safe(r['mountpoint'])}: {r['status']}"
        if r.get("error"):
            line += f" ({safe(r['error'])})"
        print(line)
    return 1 if any(r["status"] in ("error", "failed") for r in results) else 0


def cmd_mounts(args) -> int:
    if args.action in ("restore", "repair"):
        return _restore(args.action, args.json)
    mounts = _list_mounts()
    if args.json:
        print(json.dumps(mounts, indent=2))
        return 0
    if not mounts:
        print("no mounts")
        return 0
    for st in mounts:
        pf = "done" if st["prefetchDone"] else "running"
        total = st["chunksTotal"] or 0
        pct = 100.0 * st["chunksCached"] / total if total else 100.0
        bg = "done" if st["backgroundFetchDone"] else f"{pct:.0f}%"
        print(f"{safe(st['mountpoint'])}  {st['state']}")
        print(f"  image   {safe(st['image'])}  ({st['kind']}, "
              f"{plural(len(st['layers']), 'layer')})")
        print(f"  pids    {', '.join(str(p) for p in st['pids'])}")
        if st.get("restarts") or st.get("lastError"):
            print(f"  restarts {st.get('restarts', 0)}"
                  + (f"; last error: {safe(st['lastError'])}" if st.get("lastError") else ""))
        if st["state"] == "serving":
            print(f"  fetched {human_size(st['bytesFetched'])} in {st['requests']} requests; "
                  f"chunks {st['chunksCached']}/{total} cached; prefetch {pf}; "
                  f"background fetch {bg}")
            if st.get("record"):
                print(f"  record  {st['recorded']} file(s) recorded to {st['record']}")
            if st["digestErrors"] or st["readErrors"]:
                print(f"  errors  {st['digestErrors']} digest, {st['readErrors']} read")
        elif st["state"] == "failed":
            print(f"  failed: {safe(st.get('reason', ''))} (`stargz-tui mounts repair` tries "
                  f"again, `stargz-tui unmount --force {safe(st['mountpoint'])}` removes it)")
        else:
            print(f"  stale:  {safe(st.get('reason', ''))} (`stargz-tui mounts restore` "
                  f"serves it again, `stargz-tui unmount --force "
                  f"{safe(st['mountpoint'])}` cleans it up)")
    return 0


def _mounts_using_cache(cache_dir: str) -> list[str]:
    """Mountpoints of live mounts whose daemons read chunks from ``cache_dir``
    (as each daemon reports it: its stats name its cache's directory)."""
    out = []
    for st in _list_mounts():
        for lay in st["layers"]:
            if ((lay.get("stats") or {}).get("cache") or {}).get("dir") == cache_dir:
                out.append(st["mountpoint"])
                break
    return out


def cmd_cache(args) -> int:
    if args.action == "prune":
        cache_dir = m.cache_usage(args.cache_dir)["dir"]
        users = _mounts_using_cache(cache_dir)
        if users and not args.force:
            # pruning would make those mounts fetch again what they had
            raise MountError(f"{cache_dir} is in use by {plural(len(users), 'live mount')} "
                             f"({', '.join(users)}); unmount them first or prune with --force")
        res = m.cache_prune(args.cache_dir)
        if args.json:
            print(json.dumps(res))
        else:
            print(f"removed {plural(res['removedChunks'], 'chunk')} "
                  f"({human_size(res['removedBytes'])}) "
                  f"and {plural(res['removedRecords'], 'image record')} "
                  f"from {res['dir']}")
        return 0
    u = m.cache_usage(args.cache_dir)
    if args.json:
        print(json.dumps(u))
    else:
        print(f"{u['dir']}: {plural(u['chunks'], 'chunk')}, {human_size(u['bytes'])} "
              f"(budget {human_size(u['maxBytes'])}); "
              f"{plural(u['records']['records'], 'image record')} "
              f"({human_size(u['records']['bytes'])})")
    return 0


def cmd_service(args) -> int:
    from core.service import client, protocol

    if args.action == "run":
        from core.service.server import run

        return run()
    if args.action in ("install", "uninstall"):
        from core.service import systemd

        print(systemd.install() if args.action == "install" else systemd.uninstall())
        return 0
    svc = client.connect()
    info = svc.call(protocol.Status()) if svc is not None else None
    if args.action == "status":
        if args.json:
            print(json.dumps({"running": bool(info), **(info or {})}))
        elif info:
            spare = f", spare daemon {info['spare']}" if info.get("spare") else ""
            print(f"mount service running (pid {info['pid']}, socket {info['socket']}{spare})")
        else:
            print("no mount service running")
        return 0
    if args.action == "stop":
        if info is None:
            print("no mount service running")
            return 0
        svc.call(protocol.Stop())
        for _ in range(100):  # it exits once its loop sees the signal
            if not os.path.exists(f"/proc/{info['pid']}"):
                break
            time.sleep(0.05)
        print(f"stopped the mount service (pid {info['pid']}); mounts keep serving")
        return 0
    if info:
        print(f"mount service already running (pid {info['pid']})")
        return 0
    svc = client.start()
    if svc is None:
        raise MountError(f"the mount service did not start (log: {client.log_path()})")
    info = svc.call(protocol.Status())
    print(f"mount service running (pid {info['pid']})")
    return 0


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("mount", help="lazily mount an image or one layer (FUSE)",
                              description="Mount an image (merged) or one layer read-only; "
                                          "files are fetched on demand.",
                              epilog=MOUNT_EXAMPLES, formatter_class=fmt)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    kinds = {"true": dict(action="store_true"), "false": dict(action="store_true"),
             "size": dict(type=_size_arg), "seconds": dict(type=_seconds),
             "append": dict(action="append", default=[]), "text": {}}
    for flag in MOUNT_FLAGS:
        p.add_argument(flag.name, help=flag.help, **kinds[flag.kind],
                       **({"metavar": flag.metavar} if flag.metavar else {}))
    add_registry_options(p)
    p.set_defaults(func=cmd_mount)

    p = subparsers.add_parser("unmount", aliases=["umount"], help="unmount a stargz-tui mount",
                              epilog=UNMOUNT_EXAMPLES, formatter_class=fmt)
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?")
    p.add_argument("--all", "-a", action="store_true", help="unmount every stargz-tui mount")
    p.add_argument("--force", "-f", action="store_true",
                   help="force / lazily detach a busy mount and stop its daemons")
    p.set_defaults(func=cmd_unmount)

    p = subparsers.add_parser("mounts", help="list mounts with live fetch state; "
                              "`mounts restore` / `mounts repair` serve them again",
                              epilog=MOUNTS_EXAMPLES, formatter_class=fmt)
    p.add_argument("action", nargs="?", choices=["list", "restore", "repair"], default="list",
                   help="restore: every recorded mount that is not served (after a reboot); "
                        "repair: also failed ones, dropping records whose mountpoint is gone")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mounts)

    p = subparsers.add_parser("cache", help="chunk cache usage; `cache prune` empties it",
                              epilog=CACHE_EXAMPLES, formatter_class=fmt)
    p.add_argument("action", nargs="?", choices=["show", "prune"], default="show")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cache-dir", metavar="DIR")
    p.add_argument("--force", "-f", action="store_true",
                   help="prune even while live mounts use the cache")
    p.set_defaults(func=cmd_cache)

    p = subparsers.add_parser(
        "service", help="the per-user mount service (fast mounts, restarts, restore)",
        description="A per-user process with the mount code imported: `mount` goes through it "
                    "(its daemons are forked, no new interpreter), it starts a daemon that "
                    "died again at the same mountpoint, and it restores the recorded mounts "
                    "when it starts. `mount` starts it unless STARGZ_TUI_SERVER=off (or `use`: "
                    "use a running one, never start it). Mounts never depend on it. "
                    "`install` writes a systemd user unit that runs it at login.",
        epilog=SERVICE_EXAMPLES, formatter_class=fmt)
    p.add_argument("action", nargs="?",
                   choices=["status", "start", "stop", "run", "install", "uninstall"],
                   default="status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_service)


__all__ = ["register", "MountError"]
