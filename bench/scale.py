"""B11 and B12 (issue 17): how cost grows with layers and with mounts.

* B11: one final tree (:func:`bench.gen.write_tree_part`) as images of
  1, 2, 5, 10 and 20 layers, each mounted merged (``stargz-tui mount IMAGE
  MP``: one ``core.mergeddaemon`` process per image, forked from the mount
  service): mount to first byte of a small file of the bottom layer, the
  total PSS of every daemon serving the mount (``/proc/PID/smaps_rollup``,
  pids from ``stargz-tui mounts --json``), ``find -ls`` over the merged
  tree. The figure is the 20-layer image against the 1-layer one; every size
  is a point of the "how cost grows" curve.
* B12: 32 different images of 3 layers (:func:`bench.gen.write_fleet_layer`)
  mounted one after another and kept mounted: the time of each mount, the
  total PSS after 1, 2, 4 ... 32 mounts, then one small file read from each
  mount and compared with what its top layer holds.

Daemons forked from the service share its pages (the interpreter, the
imported modules): PSS splits them among the sharers, so the service's own
PSS (with its spare daemon's, the next mount's daemon waiting) is given
beside the daemons'. Both need the CLI (``ctx.mode == "cli"``)
and the mount service the suite started; the Go peer serves one layer per
process, so there is no peer column (a note says so). Every mount is
unmounted at the end, also on error.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

from . import fsutil, gen, images

B11_LAYERS = (1, 2, 5, 10, 20)
B12_MOUNTS = 32
B12_POINTS = (1, 2, 4, 8, 16, 32)


def _exe(ctx) -> str:
    return os.path.join(os.path.dirname(sys.executable), "stargz-tui")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cli(ctx, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([_exe(ctx), *args], capture_output=True, text=True, timeout=timeout)


def mount(ctx, ref: str, mp: str, cache: str) -> float:
    """``stargz-tui mount REF MP`` (merged); returns its wall time."""
    fsutil.unmount(mp)
    os.makedirs(mp, exist_ok=True)
    t0 = time.perf_counter()
    p = _cli(ctx, "mount", ref, mp, "--cache-dir", cache)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"stargz-tui mount {ref} failed: {p.stderr.strip()}")
    return dt


def unmount(ctx, mp: str) -> None:
    with contextlib.suppress(Exception):
        _cli(ctx, "unmount", mp, timeout=120)
    fsutil.unmount(mp)


def daemon_pids(ctx) -> dict[str, list[int]]:
    """mountpoint -> pids of the daemons serving it (``mounts --json``)."""
    p = _cli(ctx, "mounts", "--json", timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"stargz-tui mounts failed: {p.stderr.strip()}")
    data = json.loads(p.stdout)
    recs = data.get("mounts", []) if isinstance(data, dict) else data
    return {r["mountpoint"]: [x for x in r.get("pids") or [] if x] for r in recs}


def pss_kb(pid: int) -> int:
    """Proportional set size of one process (kB), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def total_pss_mb(pids) -> float:
    return sum(pss_kb(p) for p in pids) / 1024


def service_pss_mb(ctx) -> float:
    """PSS of the mount service and of its spare daemon, if it has one now
    (``stargz-tui service status --json``); 0 without a service."""
    p = _cli(ctx, "service", "status", "--json", timeout=60)
    try:
        info = json.loads(p.stdout)
    except ValueError:
        return 0.0
    if not info.get("running"):
        return 0.0
    return total_pss_mb([pid for pid in (info.get("pid"), info.get("spare")) if pid])


def _push(ctx, repo: str, layers: list[dict]) -> str:
    return ctx.reg.push_image(repo, "v1", layers)


def b11_images(ctx) -> tuple[dict[int, str], int]:
    entries = 4_000 if ctx.args.quick else 20_000
    refs = {}
    for n in B11_LAYERS:
        layers = [images.build_extra(
            ctx.workdir, f"tree{entries}-{k}of{n}",
            lambda path, k=k, n=n: gen.write_tree_part(path, entries, k, n)) for k in range(n)]
        refs[n] = _push(ctx, f"bench/tree{n}", layers)
    return refs, entries


def b11(ctx, fig, median) -> dict:
    out = fig("B11", unit="s")
    if ctx.mode != "cli":
        out["notes"].append("not measured: needs `stargz-tui mount`")
        return out
    refs, entries = b11_images(ctx)
    mp = ctx.mp("b11")
    curve = []
    for n in B11_LAYERS:
        fb, mt, pss, pss_find, finds, procs, svc_pss = [], [], [], [], [], 0, []
        lines = 0
        for _ in range(ctx.runs):
            cache = ctx.fresh_dir("b11-cache")
            fsutil.drop_caches()
            t0 = time.perf_counter()
            try:
                mt.append(mount(ctx, refs[n], mp, cache))
                fsutil.first_byte(os.path.join(mp, gen.LAYERED_FILE))
                fb.append(time.perf_counter() - t0)
                pids = daemon_pids(ctx).get(os.path.realpath(mp), [])
                procs = len(pids)
                pss.append(total_pss_mb(pids))
                dt, lines = fsutil.find_ls(mp)
                finds.append(dt)
                pss_find.append(total_pss_mb(pids))
                svc_pss.append(service_pss_mb(ctx))
            finally:
                unmount(ctx, mp)
        pt = {"layers": n, "first_byte_s": median(fb), "mount_s": median(mt),
              "pss_mb": median(pss), "pss_after_find_mb": median(pss_find),
              "processes": procs, "find_ls_s": median(finds), "find_lines": lines,
              "service_pss_mb": median(svc_pss)}
        curve.append(pt)
        log(f"  B11 {n} layers: first byte {median(fb):.3f} s, PSS {median(pss):.0f} MB "
            f"({procs} processes; the service {median(svc_pss):.0f} MB), "
            f"find -ls {median(finds):.3f} s")
    one, top = curve[0], curve[-1]
    out["ours"] = {"seconds": top["first_byte_s"], "pss_mb": top["pss_mb"],
                   "pss_after_find_mb": top["pss_after_find_mb"],
                   "find_ls_seconds": top["find_ls_s"], "processes": top["processes"],
                   "layers": top["layers"], "entries": entries}
    out["reference"] = {"seconds": one["first_byte_s"], "find_ls_seconds": one["find_ls_s"],
                        "pss_mb": one["pss_mb"],
                        "what": "the same final tree as a 1-layer image, mounted the same way"}
    rf = top["first_byte_s"] / one["first_byte_s"]
    rl = top["find_ls_s"] / one["find_ls_s"]
    out["ratio"] = {"first byte": rf, "find -ls": rl,
                    "PSS of 100 MB": top["pss_after_find_mb"] / 100}
    out["target"] = "first byte <= 2x the 1-layer image; PSS <= 100 MB; find -ls <= 1.5x"
    out["met"] = rf <= 2 and rl <= 1.5 and top["pss_after_find_mb"] <= 100
    out["curve"] = {"over": "layers", "points": curve}
    out["notes"].append(
        f"{top['layers']} layers: {top['processes']} daemon process (one core.mergeddaemon per "
        f"image, forked from the mount service), {top['pss_mb']:.0f} MB PSS after the first "
        f"byte, {top['pss_after_find_mb']:.0f} MB after find -ls; the 1-layer image: "
        f"{one['pss_after_find_mb']:.0f} MB. The service it shares pages with holds "
        f"{top['service_pss_mb']:.0f} MB PSS itself (not counted: it serves no mount). "
        "The Go peer serves one layer per process: no peer column")
    return out


def b12(ctx, fig, median) -> dict:
    out = fig("B12", unit="s")
    if ctx.mode != "cli":
        out["notes"].append("not measured: needs `stargz-tui mount`")
        return out
    count = 8 if ctx.args.quick else B12_MOUNTS
    refs = []
    for i in range(count):
        layers = [images.build_extra(
            ctx.workdir, f"fleet{i:02d}-{j}",
            lambda path, i=i, j=j: gen.write_fleet_layer(path, i, j)) for j in range(3)]
        refs.append(_push(ctx, f"bench/fleet{i:02d}", layers))
    mps = [ctx.mp(f"b12-{i:02d}") for i in range(count)]
    cache = ctx.fresh_dir("b12-cache")
    times, points, reads, wrong = [], [], [], []
    mounted: list[str] = []
    try:
        fsutil.drop_caches()
        for i, (ref, mp) in enumerate(zip(refs, mps, strict=True)):
            times.append(mount(ctx, ref, mp, cache))
            mounted.append(mp)
            if i + 1 in B12_POINTS or i + 1 == count:
                pids = [p for mpids in daemon_pids(ctx).values() for p in mpids]
                total = total_pss_mb(pids)
                points.append({"mounts": i + 1, "mount_s": times[-1], "pss_mb": total,
                               "processes": len(pids),
                               "with_service_pss_mb": total + service_pss_mb(ctx)})
        for i, mp in enumerate(mps):
            t0 = time.perf_counter()
            with open(os.path.join(mp, gen.FLEET_FILE), "rb") as f:
                got = f.read()
            reads.append(time.perf_counter() - t0)
            if got != gen.fleet_conf(i):
                wrong.append(i)
        pids = [p for mpids in daemon_pids(ctx).values() for p in mpids]
        final_pss = total_pss_mb(pids)
        service_pss = service_pss_mb(ctx)
        nproc = len(pids)
    finally:
        for mp in reversed(mounted):
            unmount(ctx, mp)
    for pt in points:  # the k-th mount's own time, and the median of the ones up to it
        pt["median_mount_s"] = median(times[: pt["mounts"]])
    first = median(times[: max(1, count // 4)])
    last = median(times[-max(1, count // 4):])
    growth = last / first
    out["ours"] = {"seconds": median(times), "pss_mb": final_pss, "processes": nproc,
                   "mounts": count, "reads_correct": count - len(wrong),
                   "read_seconds": median(reads), "mount_times": times,
                   "service_pss_mb": service_pss}
    out["ratio"] = {"PSS of 400 MB": final_pss / 400, "last/first quarter mount time": growth}
    out["target"] = ("PSS <= 400 MB; every read correct; mount time flat (last quarter's median "
                     "<= 1.5x the first's)")
    out["met"] = final_pss <= 400 and not wrong and growth <= 1.5
    out["curve"] = {"over": "mounts", "points": points}
    out["notes"].append(
        f"{count} images x 3 layers: {nproc} daemon processes (one core.mergeddaemon per image, "
        f"forked from the mount service: they share its pages), {final_pss:.0f} MB PSS after "
        f"the reads ({final_pss / max(1, nproc):.1f} MB per daemon; with the service's and its "
        f"spare's own "
        f"{service_pss:.0f} MB: {final_pss + service_pss:.0f} MB); {count - len(wrong)}/{count} "
        f"reads correct; mount times {times[0]:.3f} s (first) .. median of the last quarter "
        f"{last:.3f} s")
    return out
