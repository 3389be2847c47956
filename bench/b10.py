"""B10 (issue 17): a layer of a million entries, and how its costs grow.

At each size of ``SIZES`` (``SIZES_QUICK`` with ``--quick``) a layer of
``bench.gen.write_many`` (dirs of tiny files, as B4/B5's ``many``) is built,
pushed to the suite's registry and measured:

* resolve: ``load_layer_index`` in a fresh interpreter (footer, TOC, index)
  against the reference download + inflate + ``json.loads`` of the same TOC
  (``bench.probe tocref``), and the index's retained bytes per entry
  (tracemalloc) and the resolving process's peak RSS;
* ``find -ls`` over the mounted layer, ours against the Go peer;
* at the largest size only, the app's first paint of the layer screen
  (``bench.appprobe``, as B8).

The largest size gives the three B10 rows of the table (``B10``, ``B10
find``, ``B10 paint``); every size gives one line of the curve
(:func:`curve_lines`, the "how cost grows" section of docs/benchmarks.md).
"""

from __future__ import annotations

from . import fsutil, images

SIZES = (10_000, 100_000, 300_000, 1_000_000)
SIZES_QUICK = (10_000, 30_000, 100_000)
RESOLVE_TARGET = 2.0  # x (download + inflate + json.loads)
BYTES_PER_ENTRY_TARGET = 300
PAINT_TARGET = 1.0  # s


def _layer(ctx, n: int, log) -> str:
    """Build (or reuse) and push the ``n``-entry layer; its name in ctx."""
    name = f"many{n}"
    if name not in ctx.layers:
        ly = images.build_layer(ctx.workdir, "many", "write_many", n, log=log)
        ctx.layers[name] = ly
        ctx.refs[name] = ctx.reg.push_image(f"bench/{name}", "v1", [ly])
    return name


def _resolve(ctx, name: str, probe, median) -> dict:
    ly = ctx.layers[name]
    common = [ctx.reg.url, f"bench/{name}", ly["digest"], str(ly["size"])]
    ref = [probe("tocref", *common, timeout=1800) for _ in range(ctx.runs)]
    ours = [probe("resolve", *common, ly["toc_digest"], timeout=1800) for _ in range(ctx.runs)]
    mem = probe("resolve", *common, ly["toc_digest"], "--mem", timeout=3600)
    ref_s = median([r["download"] + r["inflate"] + r["json_loads"] for r in ref])
    ours_s = median([o["seconds"] for o in ours])
    return {"entries": mem["entries"], "seconds": ours_s, "ref_seconds": ref_s,
            "ratio": ours_s / ref_s, "bytes_per_entry": mem["retained"] / mem["entries"],
            "peak_rss_mb": max(o["maxrss_kb"] for o in ours) / 1024,
            "toc_json_mb": ref[0]["toc_json_bytes"] / 1e6,
            "ref_json_loads_seconds": median([r["json_loads"] for r in ref])}


def _find(ctx, name: str, median, OurMount, peer_mount) -> dict:
    mp = ctx.mp("b10")

    def measure(mount_ctx):
        ts, lines = [], 0
        for _ in range(ctx.runs):
            with mount_ctx() as m:
                dt, lines = fsutil.find_ls(m.mp, timeout=1800)
                ts.append(dt)
        return {"seconds": median(ts), "lines": lines}

    out = {"ours": measure(lambda: OurMount(ctx, name, mp, ctx.fresh_dir("b10-cache")))}
    if ctx.peer:
        out["peer"] = measure(lambda: peer_mount(ctx, name, mp, ctx.fresh_dir("b10-peer"),
                                                 "-no-bg"))
    return out


def b10(ctx, fig, median, probe, OurMount, peer_mount, app_probe, log) -> list[dict]:
    sizes = SIZES_QUICK if ctx.args.quick else SIZES
    curve = []
    for n in sizes:
        name = _layer(ctx, n, log)
        point = {"size": n, **_resolve(ctx, name, probe, median)}
        find = _find(ctx, name, median, OurMount, peer_mount)
        point["find_seconds"] = find["ours"]["seconds"]
        point["find_lines"] = find["ours"]["lines"]
        if "peer" in find:
            point["peer_find_seconds"] = find["peer"]["seconds"]
        log(f"  B10 at {n} entries: {point}")
        curve.append(point)
    top = curve[-1]
    big = f"many{sizes[-1]}"
    res = fig("B10", unit="s", curve=curve)
    res["ours"] = {"seconds": top["seconds"], "entries": top["entries"],
                   "bytes_per_entry": top["bytes_per_entry"], "peak_rss_mb": top["peak_rss_mb"]}
    res["reference"] = {"seconds": top["ref_seconds"],
                        "what": "TOC range GET + inflate + json.loads"}
    res["ratio"] = {"time": top["ratio"], "bytes_per_entry": top["bytes_per_entry"]}
    res["target"] = (f"time <= {RESOLVE_TARGET:g}x download+inflate+json.loads; "
                     f"<= {BYTES_PER_ENTRY_TARGET} B/entry retained")
    res["met"] = top["ratio"] <= RESOLVE_TARGET and top["bytes_per_entry"] <= BYTES_PER_ENTRY_TARGET
    res["notes"].append(f"{top['entries']} entries, {top['toc_json_mb']:.0f} MB of TOC JSON; "
                        f"the resolving process peaked at {top['peak_rss_mb']:.0f} MB RSS")
    find = fig("B10 find", unit="s")
    find["ours"] = {"seconds": top["find_seconds"], "lines": top["find_lines"]}
    if "peer_find_seconds" in top:
        find["peer"] = {"seconds": top["peer_find_seconds"]}
        find["ratio"] = top["find_seconds"] / top["peer_find_seconds"]
        find["met"] = find["ratio"] <= 1.0
    else:
        find["notes"].append("no Go peer: not compared")
    find["target"] = "<= 1.0x the Go reader"
    paint = fig("B10 paint", unit="s", target=f"< {PAINT_TARGET:g} s")
    try:
        got = app_probe(big)
        paint["ours"] = got
        paint["ratio"] = got["seconds"]
        paint["met"] = got["seconds"] < PAINT_TARGET
        paint["notes"].append(f"the app loaded the image (TOC fetched and indexed) in "
                              f"{got['image_loaded_seconds']:.1f} s before the layer screen opened")
        if "idle_seconds" in got:
            paint["notes"].append(f"the app idled {got['idle_seconds']:.2f} s after the open "
                                  "(the chunk map's layer-wide work runs after the paint, "
                                  "in threads; counted at most 1 s)")
    except Exception as e:  # noqa: BLE001 - the app failing must not sink the other rows
        paint["notes"].append(f"not measured: {e}")
    return [res, find, paint]


def curve_lines(results: list[dict]) -> list[str]:
    """The B10 part of docs/benchmarks.md's "how cost grows" section."""
    got = next((r for r in results if r["id"] == "B10" and r.get("curve")), None)
    if got is None:
        return []
    lines = ["B10, one layer of n entries (resolve: footer + TOC + index in a fresh process; "
             "reference: download + inflate + json.loads of the same TOC):", "",
             "| entries | TOC JSON | resolve | reference | ratio | retained | peak RSS "
             "| find -ls ours | find -ls Go peer |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in got["curve"]:
        peer = p.get("peer_find_seconds")
        lines.append(
            f"| {p['entries']} | {p['toc_json_mb']:.0f} MB | {p['seconds']:.3f} s "
            f"| {p['ref_seconds']:.3f} s | {p['ratio']:.2f}x | {p['bytes_per_entry']:.0f} B/entry "
            f"| {p['peak_rss_mb']:.0f} MB | {p['find_seconds']:.2f} s "
            f"| {'—' if peer is None else f'{peer:.2f} s'} |")
    return lines + [""]
