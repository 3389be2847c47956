"""B11 and B12 (issue 17): how cost grows with layers and with mounts.

* B11: one final tree (:func:`bench.gen.write_tree_part`) as images of
  1, 2, 5, 10 and 20 layers, each mounted merged (``stargz-tui mount IMAGE
  MP``): mount to first byte of a small file of the bottom layer, the total
  PSS of every daemon serving the mount (``/proc/PID/smaps_rollup``, pids
  from ``stargz-tui mounts --json``), ``find -ls`` over the merged tree. The
  figure is the 20-layer image against the 1-layer one; every size is a
  point of the "how cost grows" curve.
* B12: 32 different images of 3 layers (:func:`bench.gen.write_fleet_layer`)
  mounted one after another and kept mounted: the time of each mount, the
  total PSS after 1, 2, 4 ... 32 mounts, then one small file read from each
  mount and compared with what its top layer holds.

Both need the CLI (``ctx.mode == "cli"``) and the resident server the suite
started; the Go peer serves one layer per process, so there is no peer
column (a note says so). Every mount is unmounted at the end, also on error.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

from . import fsutil, gen, images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def one_process(ctx, ref: str, mp: str, cache: str) -> fsutil.MountProcess:
    """The image served merged by one process (``python -m core.mergeddaemon``,
    a fresh interpreter: not forked from the resident server)."""
    return fsutil.MountProcess([sys.executable, "-m", "core.mergeddaemon", ref, mp,
                                "--cache-dir", cache], mp, ready="line",
                               env={**os.environ, "PYTHONPATH": ROOT},
                               log=os.path.join(ctx.tmp, "mergeddaemon.log"))


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
        fb, mt, pss, pss_find, finds, procs = [], [], [], [], [], 0
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
            finally:
                unmount(ctx, mp)
        pt = {"layers": n, "first_byte_s": median(fb), "mount_s": median(mt),
              "pss_mb": median(pss), "pss_after_find_mb": median(pss_find),
              "processes": procs, "find_ls_s": median(finds), "find_lines": lines}
        # the same image served by one process (core.mergeddaemon)
        fb1, pss1, finds1 = [], [], []
        for _ in range(ctx.runs):
            cache = ctx.fresh_dir("b11-cache")
            fsutil.drop_caches()
            t0 = time.perf_counter()
            with one_process(ctx, refs[n], mp, cache) as m:
                fsutil.first_byte(os.path.join(mp, gen.LAYERED_FILE))
                fb1.append(time.perf_counter() - t0)
                dt, lines1 = fsutil.find_ls(mp)
                finds1.append(dt)
                pss1.append(total_pss_mb([m.proc.pid]))
            if lines1 != lines:
                raise RuntimeError(f"{n} layers: find -ls gave {lines1} lines from one process, "
                                   f"{lines} from the overlay of layer daemons")
        pt.update({"one_process_first_byte_s": median(fb1), "one_process_pss_mb": median(pss1),
                   "one_process_find_ls_s": median(finds1)})
        curve.append(pt)
        log(f"  B11 {n} layers: first byte {median(fb):.3f} s, PSS {median(pss):.0f} MB "
                f"({procs} processes), find -ls {median(finds):.3f} s; one process: first byte "
            f"{median(fb1):.3f} s, PSS {median(pss1):.0f} MB, find -ls {median(finds1):.3f} s")
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
        f"the same {top['layers']}-layer image served by one process (core.mergeddaemon, not "
        f"yet what `stargz-tui mount` starts; a fresh interpreter, so its first byte includes "
        f"Python's start): {top['one_process_pss_mb']:.0f} MB PSS after find -ls, first byte "
        f"{top['one_process_first_byte_s']:.3f} s, find -ls {top['one_process_find_ls_s']:.3f} "
        f"s ({top['one_process_find_ls_s'] / one['find_ls_s']:.2f}x the 1-layer mount)")
    out["notes"].append(
        f"{top['layers']} layers: {top['processes']} daemon processes, "
        f"{top['pss_mb']:.0f} MB PSS after the first byte, {top['pss_after_find_mb']:.0f} MB "
        f"after find -ls ({top['pss_after_find_mb'] / max(1, top['processes']):.1f} MB per "
        f"daemon); the 1-layer image: {one['pss_after_find_mb']:.0f} MB. The Go peer serves "
        "one layer per process: no peer column")
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
                points.append({"mounts": i + 1, "mount_s": times[-1],
                               "pss_mb": total_pss_mb(pids), "processes": len(pids)})
        for i, mp in enumerate(mps):
            t0 = time.perf_counter()
            with open(os.path.join(mp, gen.FLEET_FILE), "rb") as f:
                got = f.read()
            reads.append(time.perf_counter() - t0)
            if got != gen.fleet_conf(i):
                wrong.append(i)
        pids = [p for mpids in daemon_pids(ctx).values() for p in mpids]
        final_pss = total_pss_mb(pids)
        nproc = len(pids)
    finally:
        for mp in reversed(mounted):
            unmount(ctx, mp)
    one = _b12_one_process(ctx, refs, mps, cache)
    for pt in points:  # the k-th mount's own time, and the median of the ones up to it
        pt["median_mount_s"] = median(times[: pt["mounts"]])
    first = median(times[: max(1, count // 4)])
    last = median(times[-max(1, count // 4):])
    growth = last / first
    out["ours"] = {"seconds": median(times), "pss_mb": final_pss, "processes": nproc,
                   "mounts": count, "reads_correct": count - len(wrong),
                   "read_seconds": median(reads), "mount_times": times}
    out["ratio"] = {"PSS of 400 MB": final_pss / 400, "last/first quarter mount time": growth}
    out["target"] = ("PSS <= 400 MB; every read correct; mount time flat (last quarter's median "
                     "<= 1.5x the first's)")
    out["met"] = final_pss <= 400 and not wrong and growth <= 1.5
    for pt in points:
        pt["one_process_pss_mb"] = one["pss_at"].get(pt["mounts"])
    out["curve"] = {"over": "mounts", "points": points}
    out["notes"].append(
        f"the same {count} images each served by one process (core.mergeddaemon, not yet what "
        f"`stargz-tui mount` starts): {one['pss_mb']:.0f} MB PSS in {count} processes, "
        f"{count - len(one['wrong'])}/{count} reads correct")
    out["notes"].append(
        f"{count} images x 3 layers: {nproc} daemon processes, {final_pss:.0f} MB PSS after the "
        f"reads ({final_pss / max(1, nproc):.1f} MB per daemon); {count - len(wrong)}/{count} "
        f"reads correct; mount times {times[0]:.3f} s (first) .. median of the last quarter "
        f"{last:.3f} s")
    return out


def _b12_one_process(ctx, refs: list[str], mps: list[str], cache: str) -> dict:
    """B12's images each served by one ``core.mergeddaemon`` process."""
    pss_at, wrong = {}, []
    with contextlib.ExitStack() as stack:
        procs = []
        for i, (ref, mp) in enumerate(zip(refs, mps, strict=True)):
            procs.append(stack.enter_context(one_process(ctx, ref, mp, cache)).proc.pid)
            if i + 1 in B12_POINTS or i + 1 == len(refs):
                pss_at[i + 1] = total_pss_mb(procs)
        for i, mp in enumerate(mps):
            with open(os.path.join(mp, gen.FLEET_FILE), "rb") as f:
                if f.read() != gen.fleet_conf(i):
                    wrong.append(i)
        total = total_pss_mb(procs)
    return {"pss_mb": total, "pss_at": pss_at, "wrong": wrong}
