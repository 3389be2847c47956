"""``inspect``, ``ls``, ``cat``, ``verify`` and ``convert``: thin clients of
core.inspect, core.verify and core.convert (argument parsing and printing)."""

from __future__ import annotations

import argparse
import json
import sys

from core.errors import CoreError
from core.reference import parse_reference
from core.units import human_size

from .registry import add_registry_options, registry_options

# The core modules behind these commands (formats, registry client, writer)
# are imported by the command that needs them, not to build the parser: every
# `stargz-tui` start (e.g. `mount`) would pay for them otherwise.
DEFAULT_CHUNK_SIZE = 4 << 20  # core.estargz.writer.DEFAULT_CHUNK_SIZE

INSPECT_EXAMPLES = """\
examples:
  stargz-tui inspect oci:./layout:mini-esgz
  stargz-tui inspect localhost:5000/app:esgz --platform linux/arm64
  stargz-tui inspect oci:./layout:mini-esgz --json | jq '.layers[] | {digest, format, tocDigestVerified}'

--json prints one object (documented in the README under "JSON output"): reference, manifestDigest,
platform, config, diffIDs, chainID and layers[] with digest, mediaType, size,
format (estargz zstdchunked stargz gzip zstd tar), tocDigest, tocDigestAnnotated,
tocDigestVerified, diffID, uncompressedSize, entries, chunks, prefetchSize, ...
"""

LS_EXAMPLES = """\
examples:
  stargz-tui ls oci:./layout:mini-esgz                  the merged image's root
  stargz-tui ls oci:./layout:mini-esgz -lR data         recursive long listing
  stargz-tui ls oci:./layout:mini-esgz --layer 1 -l     one raw layer (whiteouts shown)
  stargz-tui ls oci:./layout:mini-esgz -R --json        every entry as JSON

--json prints a list of objects: path (relative, no leading /), type (dir reg
symlink hardlink char block fifo), size, mode (permission bits incl. setuid,
setgid, sticky), uid, gid, linkTarget (or null), mtime, xattrs (base64),
devMajor, devMinor, digest, layer.
"""

CAT_EXAMPLES = """\
examples:
  stargz-tui cat oci:./layout:mini-esgz etc/os-release
  stargz-tui cat localhost:5000/app:esgz /usr/bin/python3 > python3   fetches only its chunks
  stargz-tui cat oci:./layout:mini-esgz --layer 0 usr/lib/app/remove-me.py

Symlinks are resolved inside the image, as a process in the container sees them.
"""

VERIFY_EXAMPLES = """\
examples:
  stargz-tui verify oci:./layout:mini-esgz              TOC digests against the annotations
  stargz-tui verify oci:./layout:mini-esgz --full       also every chunk, file, blob and diffID
  stargz-tui verify localhost:5000/app:esgz --layer 0 --full

Exit status 0 when every check holds; otherwise 1, with one line per failure
on stderr.
"""

CONVERT_EXAMPLES = """\
examples:
  stargz-tui convert oci:./layout:mini-gzip oci:./out:mini-esgz
  stargz-tui convert oci:./layout:app oci:./layout:app-esgz --chunk-size 64K
  stargz-tui convert oci:./layout:app oci:./out:app --prioritize-file etc/os-release,bin/sh
  stargz-tui convert oci:./layout:app oci:./out:app-zc --format zstd:chunked

The destination layout is created when missing; an existing one gets the tag
added (replacing an older image of that tag). Prioritised files (comma
separated, or @FILE with one path a line) go to the front of each layer,
before a .prefetch.landmark.
"""


def _size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        n = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 65536, 64K, 4M)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return n


def _platform(args) -> str | None:
    return getattr(args, "platform", None)


async def _open(args):
    from core.image import open_image

    return await open_image(parse_reference(args.image), platform=_platform(args),
                            **registry_options(args))


def _add_common(p: argparse.ArgumentParser, layer: bool = True) -> None:
    p.add_argument("image", metavar="IMAGE", help="registry reference or oci:DIR[:TAG]")
    p.add_argument("--platform", metavar="OS/ARCH",
                   help="platform to pick from an index (default: this machine's)")
    if layer:
        p.add_argument("--layer", metavar="N|DIGEST",
                       help="a raw layer by index (0 = bottom) or digest prefix")


# ---------------------------------------------------------------- inspect


async def cmd_inspect(args) -> int:
    image = await _open(args)
    from core.inspect import inspect_image

    try:
        data = await inspect_image(image)
    finally:
        await image.store.aclose()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        c = data["config"]
        print(f"Reference:  {data['reference']}")
        print(f"Manifest:   {data['manifestDigest']} ({data['manifestMediaType']})")
        if data["indexDigest"]:
            print(f"Index:      {data['indexDigest']} (platforms: {', '.join(data['platforms'])})")
        print(f"Platform:   {data['platform']}")
        print(f"Config:     {data['configDigest']}")
        if c.get("created"):
            print(f"Created:    {c['created']}")
        for key, label in (("entrypoint", "Entrypoint"), ("cmd", "Cmd")):
            if c.get(key):
                print(f"{label + ':':<12}{json.dumps(c[key])}")
        if c.get("workingDir"):
            print(f"WorkingDir: {c['workingDir']}")
        for env in c.get("env") or []:
            print(f"Env:        {env}")
        print(f"Chain ID:   {data['chainID'] or '-'}")
        print(f"Layers:     {len(data['layers'])} ({human_size(data['size'])} compressed)")
        for layer in data["layers"]:
            _print_layer(layer)
    failed = [la for la in data["layers"] if la["error"]]
    for la in failed:
        print(f"stargz-tui: layer {la['index']}: {la['error']}", file=sys.stderr)
    bad = [la for la in data["layers"] if la["tocDigestVerified"] is False]
    for la in bad:
        computed = la["manifestChecksum"] if _by_checksum(la) else la["tocDigest"]
        print(f"stargz-tui: layer {la['index']}: TOC digest mismatch: {la['tocDigestAnchor']} "
              f"annotation says {la['tocDigestAnnotated']}, computed {computed}", file=sys.stderr)
    return 1 if failed or bad else 0


def _by_checksum(la: dict) -> bool:
    """The layer's TOC is anchored by a zstd:chunked manifest checksum."""
    return bool(la["tocDigestAnchor"]) and la["tocDigestAnchor"].endswith("manifest-checksum")


def _print_layer(la: dict) -> None:
    print(f"\n  [{la['index']}] {la['digest']}")
    print(f"      media type:   {la['mediaType']}")
    print(f"      format:       {la['format'] or '?'}")
    if la.get("foreign"):
        where = la["urls"][0] if la.get("urls") else "no URL given"
        print(f"      foreign:      non-distributable, not fetched ({where})")
    print(f"      size:         {human_size(la['size'])} compressed, "
          f"{human_size(la['uncompressedSize'])} uncompressed")
    if la["tocDigest"] or la["tocDigestAnnotated"]:
        state = {True: "verified", False: "MISMATCH", None: "not annotated"}[la["tocDigestVerified"]]
        print(f"      TOC digest:   {la['tocDigest'] or '-'} ({state})")
        if _by_checksum(la):
            # zstd:chunked: the anchor is the digest of the compressed TOC.
            print(f"      anchored by:  {la['tocDigestAnchor']} ({la['manifestChecksum'] or '-'})")
        if la["tocDigestVerified"] is False:
            print(f"      annotated:    {la['tocDigestAnnotated']}")
    if la["entries"] is not None:
        print(f"      entries:      {la['entries']}, chunks: {la['chunks']}")
        if la["prefetchSize"] is not None:
            print(f"      prefetch:     {human_size(la['prefetchSize'])} "
                  f"({la['prefetchChunks']} chunks)")
        elif la["noPrefetchLandmark"]:
            print("      prefetch:     none (.no.prefetch.landmark)")
    print(f"      diffID:       {la['diffID'] or '-'}")
    if la["error"]:
        print(f"      error:        {la['error']}")


# ---------------------------------------------------------------- ls
async def cmd_ls(args) -> int:
    from core.inspect import ImageTree, format_long

    image = await _open(args)
    try:
        tree = await ImageTree.open(image, args.layer)
        records = tree.list(args.path or "", recursive=args.recursive)
    finally:
        await image.store.aclose()
    if args.json:
        print(json.dumps(records, indent=1, ensure_ascii=False))
        return 0
    base = "/".join(p for p in (args.path or "").split("/") if p not in ("", "."))
    out = sys.stdout
    for rec in records:
        name = rec["path"]
        if not args.recursive and base and name.startswith(base + "/"):
            name = name[len(base) + 1:]
        elif not args.recursive and "/" in name and name != base:
            name = name.rsplit("/", 1)[1]
        out.write((format_long(rec, name) if args.long else name) + "\n")
    return 0


# ---------------------------------------------------------------- cat
async def cmd_cat(args) -> int:
    from core.inspect import ImageTree

    image = await _open(args)
    try:
        tree = await ImageTree.open(image, args.layer)
        out = sys.stdout.buffer
        async for piece in tree.iter_bytes(args.path):
            out.write(piece)
        out.flush()
    finally:
        await image.store.aclose()
    return 0


# ---------------------------------------------------------------- verify
async def cmd_verify(args) -> int:
    from core.verify import verify_image

    image = await _open(args)
    layers = [args.layer] if args.layer is not None else None
    if layers is not None:
        image.layer(args.layer)  # a bad selector is an error, not a failed check
    try:
        result = await verify_image(image, layers=layers, full=args.full)
    finally:
        await image.store.aclose()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for c in result.checks:
            if c.ok and not args.quiet:
                print(("skip  " if c.skipped else "ok    ") + c.line())
    for c in result.failures:
        print(f"stargz-tui: FAILED {c.line()}", file=sys.stderr)
    if not args.json and not args.quiet:
        n = len(result.failures)
        print(f"{'all checks hold' if not n else f'{n} check(s) failed'}"
              f" ({'full' if args.full else 'TOC digests only; --full for everything'})")
    return 0 if result.ok else 1


# ---------------------------------------------------------------- convert
def _prioritized(text: str | None) -> list[str]:
    if not text:
        return []
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                return [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except OSError as e:
            raise CoreError(f"cannot read {text[1:]}: {e.strerror}") from None
    return [p.strip() for p in text.split(",") if p.strip()]


async def cmd_convert(args) -> int:
    from core.convert import convert_image, open_writer

    dst = parse_reference(args.dst)
    prioritized = _prioritized(args.prioritize_file)
    image = await _open(args)
    writer = open_writer(dst, **registry_options(args))

    def progress(p) -> None:
        if args.quiet or not sys.stderr.isatty():
            return
        pct = 100 * p.done // max(p.total, 1)
        sys.stderr.write(f"\rlayer {p.layer}: {p.stage} {pct:3d}%   ")
        sys.stderr.flush()

    try:
        result = await convert_image(image, writer, tag=dst.tag, chunk_size=args.chunk_size,
                                     prioritized_files=prioritized, progress=progress,
                                     format=args.format)
    finally:
        await image.store.aclose()
        await writer.aclose()
    if sys.stderr.isatty() and not args.quiet:
        sys.stderr.write("\r" + " " * 40 + "\r")
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    for c in result.layers:
        print(f"layer {c.index}: {c.source_digest[:19]}... -> {c.digest} "
              f"({human_size(c.size)}, TOC {c.toc_digest[:19]}...)")
        if c.missed_prioritized:
            print(f"  prioritised files not in this layer: {', '.join(c.missed_prioritized)}")
    print(f"wrote {dst} ({result.manifest_digest})")
    return 0


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("inspect", help="show an image's manifest, config and layers",
                              description="Show an image's manifest, config and, per layer, "
                              "format, sizes, TOC digest (annotated and computed), entries, "
                              "chunks, prefetch region and diffID.",
                              epilog=INSPECT_EXAMPLES, formatter_class=fmt)
    _add_common(p, layer=False)
    p.add_argument("--json", action="store_true", help="print JSON (keys documented in the README)")
    add_registry_options(p)
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser("ls", help="list files of the merged image or of one layer",
                              description="List a directory of the merged image (whiteouts "
                              "applied) or, with --layer, of one raw layer.",
                              epilog=LS_EXAMPLES, formatter_class=fmt)
    _add_common(p)
    p.add_argument("path", nargs="?", metavar="PATH", help="directory or file (default: /)")
    p.add_argument("-l", dest="long", action="store_true", help="long listing")
    p.add_argument("-R", dest="recursive", action="store_true", help="recursive")
    p.add_argument("--json", action="store_true", help="print JSON (keys documented in the README)")
    add_registry_options(p)
    p.set_defaults(func=cmd_ls)

    p = subparsers.add_parser("cat", help="write a file's bytes to stdout",
                              description="Write one file of the image to stdout, fetching "
                              "only the chunks that hold it.",
                              epilog=CAT_EXAMPLES, formatter_class=fmt)
    _add_common(p)
    p.add_argument("path", metavar="PATH", help="file inside the image")
    add_registry_options(p)
    p.set_defaults(func=cmd_cat)

    p = subparsers.add_parser("verify", help="verify TOC, chunk, file, blob digests and diffIDs",
                              description="Verify layer TOC digests against their annotations; "
                              "with --full also every chunk digest, every file digest, each "
                              "blob digest and diffID (against the config) and the chain IDs.",
                              epilog=VERIFY_EXAMPLES, formatter_class=fmt)
    _add_common(p)
    p.add_argument("--full", action="store_true", help="read every byte and check everything")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print failures only")
    add_registry_options(p)
    p.set_defaults(func=cmd_verify)

    p = subparsers.add_parser("convert", help="write an eStargz copy of an image",
                              description="Convert every layer of SRC to eStargz and write the "
                              "image to DST (oci:DIR[:TAG]).",
                              epilog=CONVERT_EXAMPLES, formatter_class=fmt)
    p.add_argument("image", metavar="SRC", help="source image (registry reference or oci:DIR[:TAG])")
    p.add_argument("dst", metavar="DST", help="destination, oci:DIR[:TAG]")
    p.add_argument("--platform", metavar="OS/ARCH", help="platform to pick from an index")
    p.add_argument("--chunk-size", type=_size, default=DEFAULT_CHUNK_SIZE, metavar="N",
                   help="chunk size in bytes (K/M suffixes allowed; default 4M)")
    p.add_argument("--prioritize-file", metavar="LIST",
                   help="comma-separated paths (or @FILE) to put first, before a prefetch landmark")
    p.add_argument("--format", choices=("estargz", "zstd:chunked"), default="estargz",
                   help="layer format: eStargz (default) or zstd:chunked (containers/storage's "
                   "current generation; diffIDs unchanged)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    add_registry_options(p)
    p.set_defaults(func=cmd_convert)
