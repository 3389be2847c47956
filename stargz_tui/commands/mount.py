"""``mount``, ``unmount``, ``mounts`` and ``cache``: thin clients of core.mount."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from core import mount as m
from core.errors import MountError
from core.units import human_size

MOUNT_EXAMPLES = """\
examples:
  stargz-tui mount localhost:5000/app:esgz /mnt/app          merged image (overlay of all layers)
  stargz-tui mount oci:./layout:mini-esgz /mnt/l0 --layer 0  one raw layer
  stargz-tui mount ghcr.io/org/app:esgz /mnt/app --wait-prefetch --cache-size 2G
  stargz-tui mount localhost:5000/app:esgz ~/mnt/app --map-owner   as a plain user: root's files are yours

The mount is served by a background daemon per layer; `stargz-tui mounts` shows
live state and `stargz-tui unmount MOUNTPOINT` stops it. MOUNTPOINT must be an
empty directory (--force mounts over a non-empty one, hiding its contents), and
only one mount of it can be under way at a time.
"""

UNMOUNT_EXAMPLES = """\
examples:
  stargz-tui unmount /mnt/app            fails (naming the processes) while files are in use
  stargz-tui unmount /mnt/app --force    force, then lazy detach; also cleans stale mounts
"""

MOUNTS_EXAMPLES = """\
examples:
  stargz-tui mounts
  stargz-tui mounts --json | jq '.[] | {mountpoint, state, bytesFetched}'

--json prints a list of objects with mountpoint, image, kind, layers, pid, pids,
state ("serving" or "stale"), bytesFetched, requests, chunksCached, chunksTotal,
prefetchDone, backgroundFetchDone, digestErrors, readErrors (and reason when stale).
"""

CACHE_EXAMPLES = """\
examples:
  stargz-tui cache             usage of the chunk cache
  stargz-tui cache --json
  stargz-tui cache prune       delete every cached chunk
"""


def _size_arg(text: str) -> int:
    from core.cache import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_mount(args) -> int:
    opts = dict(
        layer=args.layer, prefetch=not args.no_prefetch,
        background_fetch=not args.no_background_fetch, wait_prefetch=args.wait_prefetch,
        allow_other=args.allow_other, allow_unverified=args.allow_unverified,
        cache_dir=args.cache_dir, cache_size=args.cache_size, debug=args.debug,
        prefetch_size=args.prefetch_size or 0, platform=args.platform, force=args.force,
        map_owner=args.map_owner, uid_map=args.uid_map, gid_map=args.gid_map,
    )
    if args.layer is not None or m.FORK_DAEMONS:
        # one layer needs no event loop here: the daemon does all the fetching;
        # a process that forks its daemons must stay single-threaded
        rec = m.mount_blocking(args.image, args.mountpoint, **opts)
    else:
        import functools

        import anyio

        rec = anyio.run(functools.partial(m.mount_image, args.image, args.mountpoint, **opts))
    if args.allow_unverified:
        print("stargz-tui: warning: layers without a TOC digest are mounted unverified",
              file=sys.stderr)
    what = f"layer {rec['layers'][0]['index']}" if rec["kind"] == "layer" else \
        f"{len(rec['layers'])} layers ({rec['overlay']})"
    pids = ", ".join(str(e["pid"]) for e in rec["layers"])
    print(f"mounted {rec['image']} ({what}) at {rec['mountpoint']} [daemon pid {pids}]")
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
                print(f"stargz-tui: mount is no longer served: {st.get('reason', '')}",
                      file=sys.stderr)
                break
            time.sleep(1.0)
    finally:
        m.unmount(rec["mountpoint"], force=True)
    return 0


def cmd_unmount(args) -> int:
    res = m.unmount(args.mountpoint, force=args.force)
    if res["status"] == "not-mounted":
        print(f"{res['mountpoint']}: not mounted")
    else:
        print(f"unmounted {res['mountpoint']}")
    return 0


def cmd_mounts(args) -> int:
    mounts = m.list_mounts()
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
        print(f"{st['mountpoint']}  {st['state']}")
        print(f"  image   {st['image']}  ({st['kind']}, {len(st['layers'])} layer(s)"
              + (f", {st['overlay']}" if st.get("overlay") else "") + ")")
        print(f"  pids    {', '.join(str(p) for p in st['pids'])}")
        if st["state"] == "serving":
            print(f"  fetched {human_size(st['bytesFetched'])} in {st['requests']} requests; "
                  f"chunks {st['chunksCached']}/{total} cached; prefetch {pf}; "
                  f"background fetch {bg}")
            if st["digestErrors"] or st["readErrors"]:
                print(f"  errors  {st['digestErrors']} digest, {st['readErrors']} read")
        else:
            print(f"  stale:  {st.get('reason', '')} (`stargz-tui unmount --force "
                  f"{st['mountpoint']}` cleans it up)")
    return 0


def cmd_cache(args) -> int:
    if args.action == "prune":
        res = m.cache_prune(args.cache_dir)
        if args.json:
            print(json.dumps(res))
        else:
            print(f"removed {res['removedChunks']} chunks ({human_size(res['removedBytes'])}) "
                  f"from {res['dir']}")
        return 0
    u = m.cache_usage(args.cache_dir)
    if args.json:
        print(json.dumps(u))
    else:
        print(f"{u['dir']}: {u['chunks']} chunks, {human_size(u['bytes'])} "
              f"(budget {human_size(u['maxBytes'])})")
    return 0


def cmd_server(args) -> int:
    from stargz_tui import resident

    info = resident.request("status")
    if args.action == "status":
        if args.json:
            print(json.dumps({"running": bool(info), **(info or {})}))
        elif info:
            print(f"resident server running (pid {info['pid']})"
                  + ("" if info.get("current") else "; it runs older code and exits "
                     "at the next mount"))
        else:
            print("no resident server running")
        return 0
    if args.action == "stop":
        if info is None:
            print("no resident server running")
            return 0
        resident.request("stop")
        print(f"stopped the resident server (pid {info['pid']})")
        return 0
    if info and info.get("current"):
        print(f"resident server already running (pid {info['pid']})")
        return 0
    if info:
        resident.request("stop")
    res = resident.start_and_wait()
    if not res["running"]:
        raise MountError(f"the resident server did not start (log: {res['log']})")
    print(f"resident server running (pid {res['pid']})")
    return 0


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("mount", help="lazily mount an image or one layer (FUSE)",
                              description="Mount an image (merged) or one layer read-only; "
                                          "files are fetched on demand.",
                              epilog=MOUNT_EXAMPLES, formatter_class=fmt)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--layer", metavar="N|DIGEST", help="mount one raw layer (index or digest)")
    p.add_argument("--foreground", action="store_true",
                   help="stay attached; unmount on Ctrl-C / SIGTERM")
    p.add_argument("--no-prefetch", action="store_true", help="skip the prefetch region")
    p.add_argument("--no-background-fetch", action="store_true",
                   help="fetch only what is read")
    p.add_argument("--wait-prefetch", action="store_true",
                   help="return only after prefetch finished")
    p.add_argument("--prefetch-size", type=_size_arg, metavar="SIZE",
                   help="prefetch this many blob bytes when a layer has no landmark")
    p.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    p.add_argument("--allow-unverified", action="store_true",
                   help="mount layers without a TOC digest annotation (warns)")
    p.add_argument("--cache-dir", metavar="DIR", help="chunk cache directory")
    p.add_argument("--cache-size", type=_size_arg, metavar="SIZE",
                   help="chunk cache budget (e.g. 2G; default 4G)")
    p.add_argument("--platform", help="os/arch of a multi-platform image")
    p.add_argument("--map-owner", action="store_true",
                   help="show the image's root (uid/gid 0) as you and its other ids in your "
                        "/etc/subuid, /etc/subgid ranges, as rootless podman does")
    p.add_argument("--uid-map", action="append", metavar="C:H:N", default=[],
                   help="show image uids C..C+N-1 as H..H+N-1 (fuse-overlayfs syntax; "
                        "repeatable, before --map-owner's)")
    p.add_argument("--gid-map", action="append", metavar="C:H:N", default=[],
                   help="the same for gids")
    p.add_argument("--debug", action="store_true", help="trace FUSE requests in the daemon log")
    p.add_argument("--force", action="store_true",
                   help="mount onto a non-empty directory (its contents are hidden meanwhile)")
    p.set_defaults(func=cmd_mount)

    p = subparsers.add_parser("unmount", aliases=["umount"], help="unmount a stargz-tui mount",
                              epilog=UNMOUNT_EXAMPLES, formatter_class=fmt)
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--force", "-f", action="store_true",
                   help="force / lazily detach a busy mount and stop its daemons")
    p.set_defaults(func=cmd_unmount)

    p = subparsers.add_parser("mounts", help="list mounts with live fetch state",
                              epilog=MOUNTS_EXAMPLES, formatter_class=fmt)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_mounts)

    p = subparsers.add_parser("cache", help="chunk cache usage; `cache prune` empties it",
                              epilog=CACHE_EXAMPLES, formatter_class=fmt)
    p.add_argument("action", nargs="?", choices=["show", "prune"], default="show")
    p.add_argument("--json", action="store_true")
    p.add_argument("--cache-dir", metavar="DIR")
    p.set_defaults(func=cmd_cache)

    p = subparsers.add_parser(
        "server", help="the resident server that makes `mount` start fast",
        description="A resident process with the mount code already imported runs "
                    "`mount`/`unmount` for this user by forking, so a mount starts no new "
                    "Python interpreter. `mount` starts one in the background unless "
                    "STARGZ_TUI_SERVER=off (or `use`: use one, never start it); it exits "
                    "after 15 idle minutes. Mounts never depend on it.")
    p.add_argument("action", nargs="?", choices=["status", "start", "stop"], default="status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_server)


__all__ = ["register", "MountError"]
