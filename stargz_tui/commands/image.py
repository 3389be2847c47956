"""``inspect``, ``ls``, ``cat``, ``verify`` and ``convert``: thin clients of
core.inspect, core.verify and core.convert (argument parsing and printing)."""

from __future__ import annotations

import argparse
import json
import sys

from core.errors import CoreError
from core.reference import parse_reference
from core.units import human_size, plural

from ..textsafe import safe
from .registry import add_registry_options, registry_options

# The core modules behind these commands (formats, registry client, writer)
# are imported by the command that needs them, not to build the parser: every
# `stargz-tui` start (e.g. `mount`) would pay for them otherwise.
DEFAULT_CHUNK_SIZE = 4 << 20  # core.estargz.writer.DEFAULT_CHUNK_SIZE
MIN_CHUNK_SIZE = 4 << 10

INSPECT_EXAMPLES = """\
examples:
  stargz-tui inspect oci:./layout:mini-esgz
  stargz-tui inspect localhost:5000/app:esgz --platform linux/amd64
  stargz-tui inspect oci:./layout:mini-esgz --json | jq '.layers[] | {digest, format, tocDigestVerified}'
  stargz-tui inspect localhost:5000/app:esgz --raw | sha256sum   the manifest digest
  stargz-tui inspect oci:./layout:mini-esgz --config | jq .history

--json prints one object (documented in the README under "JSON output"): reference, manifestDigest,
platform, config, diffIDs, chainID and layers[] with digest, mediaType, size,
format (estargz zstdchunked stargz gzip zstd tar), tocDigest, tocDigestAnnotated,
tocDigestVerified, diffID, uncompressedSize, entries, chunks, prefetchSize, ...
and history[] (the config's history entries, unchanged).
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
  stargz-tui cat localhost:5000/app:esgz data/random.bin > random.bin   fetches only its chunks
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
  stargz-tui convert oci:./layout:app localhost:5000/app:esgz   push to a registry
  stargz-tui convert oci:./layout:app oci:./out:app --estargz-record-in record.json
  stargz-tui convert oci:./layout:app oci:./out:app-zc --format zstd:chunked

The destination layout is created when missing; an existing one gets the tag
added (replacing an older image of that tag); a registry DST gets the blobs
and the manifest pushed. Prioritised files (comma separated, or @FILE with one
path a line or JSON lines {"path": ...}) go to the front of each layer, before
a .prefetch.landmark. Chunks are at least 4K.
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


async def _inspect_bytes(args) -> bytes:
    """``--raw``: the manifest (or index) as the store served it; with
    ``--platform``, that platform's manifest. ``--config``: the config blob."""
    from core.image import open_store

    ref = parse_reference(args.image)
    if args.raw and not args.platform:
        store = open_store(ref, **registry_options(args))
        try:
            data, _media_type, _digest = await store.get_manifest(ref)
        finally:
            await store.aclose()
        return data
    image = await _open(args)
    try:
        if args.raw:
            return image.manifest_bytes
        desc = image.manifest["config"]
        return await image.store.get_blob_bytes(image.config_digest, desc.get("size"))
    finally:
        await image.store.aclose()


async def cmd_inspect(args) -> int:
    if args.raw or args.config:
        if args.raw and args.config:
            raise CoreError("--raw and --config print different documents: give one")
        data = await _inspect_bytes(args)
        sys.stdout.buffer.write(data)  # exactly as served: no newline added
        sys.stdout.buffer.flush()
        return 0
    image = await _open(args)
    from core.inspect import inspect_image

    try:
        data = await inspect_image(image)
    finally:
        await image.store.aclose()
    # the config's history entries as they are (config.history counts them)
    data["history"] = [h for h in image.config.get("history") or [] if isinstance(h, dict)]
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        c = data["config"]
        print(f"Reference:  {safe(data['reference'])}")
        print(f"Manifest:   {safe(data['manifestDigest'])} ({safe(data['manifestMediaType'])})")
        if data["indexDigest"]:
            print(f"Index:      {safe(data['indexDigest'])} "
                  f"(platforms: {safe(', '.join(data['platforms']))})")
        print(f"Platform:   {safe(data['platform'])}")
        print(f"Config:     {safe(data['configDigest'])}")
        if c.get("created"):
            print(f"Created:    {safe(c['created'])}")
        for key, label in (("entrypoint", "Entrypoint"), ("cmd", "Cmd")):
            if c.get(key):
                print(f"{label + ':':<12}{safe(json.dumps(c[key]))}")
        if c.get("workingDir"):
            print(f"WorkingDir: {safe(c['workingDir'])}")
        if c.get("user"):
            print(f"User:       {safe(c['user'])}")
        for env in c.get("env") or []:
            print(f"Env:        {safe(env)}")
        for k, v in (c.get("labels") or {}).items():
            print(f"Label:      {safe(k)}={safe(v)}")
        print(f"Chain ID:   {data['chainID'] or '-'}")
        print(f"Layers:     {len(data['layers'])} ({human_size(data['size'])} compressed)")
        for layer in data["layers"]:
            _print_layer(layer)
    failed = [la for la in data["layers"] if la["error"]]
    for la in failed:
        print(f"stargz-tui: layer {la['index']}: {safe(la['error'])}", file=sys.stderr)
    bad = [la for la in data["layers"] if la["tocDigestVerified"] is False]
    for la in bad:
        computed = la["manifestChecksum"] if _by_checksum(la) else la["tocDigest"]
        print(f"stargz-tui: layer {la['index']}: TOC digest mismatch: {la['tocDigestAnchor']} "
              f"annotation says {safe(la['tocDigestAnnotated'])}, computed {computed}",
              file=sys.stderr)
    return 1 if failed or bad else 0


def _by_checksum(la: dict) -> bool:
    """The layer's TOC is anchored by a zstd:chunked manifest checksum."""
    return bool(la["tocDigestAnchor"]) and la["tocDigestAnchor"].endswith("manifest-checksum")


def _print_layer(la: dict) -> None:
    print(f"\n  [{la['index']}] {safe(la['digest'])}")
    print(f"      media type:   {safe(la['mediaType'])}")
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
            print(f"      annotated:    {safe(la['tocDigestAnnotated'])}")
    if la["entries"] is not None:
        print(f"      entries:      {la['entries']}, chunks: {la['chunks']}")
        if la["prefetchSize"] is not None:
            print(f"      prefetch:     {human_size(la['prefetchSize'])} "
                  f"({plural(la['prefetchChunks'], 'chunk')})")
        elif la["noPrefetchLandmark"]:
            print("      prefetch:     none (.no.prefetch.landmark)")
    print(f"      diffID:       {safe(la['diffID'] or '-')}")
    if la["error"]:
        print(f"      error:        {safe(la['error'])}")


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
        if args.long:
            shown = dict(rec, linkTarget=safe(rec["linkTarget"] or ""))
            out.write(format_long(shown, safe(name)) + "\n")
        else:
            out.write(safe(name) + "\n")
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
class _Progress:
    """One self-overwriting progress line on stderr, for a terminal only: none
    with --json or --quiet, or when stderr is not a TTY (piped, a log file).
    At most ten updates a second."""

    INTERVAL = 0.1

    def __init__(self):
        self.last = 0.0
        self.width = 0

    @classmethod
    def for_args(cls, args) -> _Progress | None:
        if getattr(args, "json", False) or getattr(args, "quiet", False):
            return None
        return cls() if sys.stderr.isatty() else None

    def show(self, text: str, force: bool = False) -> None:
        import time

        now = time.monotonic()
        if not force and now - self.last < self.INTERVAL:
            return
        self.last = now
        pad = " " * max(0, self.width - len(text))
        self.width = len(text)
        sys.stderr.write("\r" + text + pad)
        sys.stderr.flush()

    def verify(self, p) -> None:
        pct = 100 * p.done // max(p.total, 1)
        what = "TOC" if p.stage == "toc" else "reading blob"
        self.show(f"verify layer {p.layer}: {what} {pct:3d}% "
                  f"({human_size(p.done)}/{human_size(p.total)})", force=p.done >= p.total)

    def clear(self) -> None:
        if self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0


async def cmd_verify(args) -> int:
    from core.verify import verify_image

    image = await _open(args)
    layers = [args.layer] if args.layer is not None else None
    if layers is not None:
        image.layer(args.layer)  # a bad selector is an error, not a failed check
    show = _Progress.for_args(args)
    try:
        result = await verify_image(image, layers=layers, full=args.full,
                                    progress=show.verify if show else None)
    finally:
        await image.store.aclose()
        if show:
            show.clear()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for c in result.checks:
            if c.ok and not args.quiet:
                print(("skip  " if c.skipped else "ok    ") + safe(c.line()))
    for c in result.failures:
        print(f"stargz-tui: FAILED {safe(c.line())}", file=sys.stderr)
    if not args.json and not args.quiet:
        n = len(result.failures)
        print(f"{'all checks hold' if not n else plural(n, 'check') + ' failed'}"
              f" ({'full' if args.full else 'TOC digests only; --full for everything'})")
    return 0 if result.ok else 1


# ---------------------------------------------------------------- convert
def _read_list(path: str) -> list[str]:
    """The paths of a list file: one path a line (``#`` comments), or JSON
    lines ``{"path": ...}`` as ``ctr-remote optimize --record-out`` writes them
    (told apart by the first non-empty line starting with ``{``)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise CoreError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not lines or not lines[0].startswith("{"):
        return [line for line in lines if not line.startswith("#")]
    out = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except ValueError:
            raise CoreError(f"{path}:{n}: not a JSON line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("path"), str):
            raise CoreError(f"{path}:{n}: a record needs a \"path\" string")
        if rec["path"] not in out:  # a record-out names a file once per access
            out.append(rec["path"])
    return out


def _prioritized(text: str | None, record_in: str | None = None) -> list[str]:
    out = []
    if text and text.startswith("@"):
        out += _read_list(text[1:])
    elif text:
        out += [p.strip() for p in text.split(",") if p.strip()]
    if record_in:
        out += [p for p in _read_list(record_in) if p not in out]
    return out


def _chunk_size(text: str) -> int:
    n = _size(text)
    if n < MIN_CHUNK_SIZE:
        # tiny chunks multiply TOC entries and gzip members: a 1 MiB layer grows
        # tens of times its size
        raise argparse.ArgumentTypeError(f"chunk size {text} is below the minimum of 4K")
    return n


async def cmd_convert(args) -> int:
    from core.convert import convert_image, open_writer

    dst = parse_reference(args.dst)
    prioritized = _prioritized(args.prioritize_file, args.record_in)
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
            print("  prioritised files not in this layer: "
                  + ", ".join(safe(p) for p in c.missed_prioritized))
    print(f"wrote {safe(dst)} ({result.manifest_digest})")
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
    p.add_argument("--raw", action="store_true",
                   help="print the manifest (or index) bytes exactly as served")
    p.add_argument("--config", action="store_true", help="print the config blob exactly as stored")
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
                              "image to DST: an OCI layout (oci:DIR[:TAG]) or a registry "
                              "reference, pushed there. ctr-remote's option names "
                              "(--estargz-chunk-size, --estargz-prioritized-files, "
                              "--estargz-record-in) are accepted.",
                              epilog=CONVERT_EXAMPLES, formatter_class=fmt)
    p.add_argument("image", metavar="SRC", help="source image (registry reference or oci:DIR[:TAG])")
    p.add_argument("dst", metavar="DST",
                   help="destination: oci:DIR[:TAG] or a registry reference (pushed)")
    p.add_argument("--platform", metavar="OS/ARCH", help="platform to pick from an index")
    p.add_argument("--chunk-size", "--estargz-chunk-size", dest="chunk_size", type=_chunk_size,
                   default=DEFAULT_CHUNK_SIZE, metavar="N",
                   help="chunk size in bytes (K/M suffixes allowed; at least 4K; default 4M)")
    p.add_argument("--prioritize-file", "--estargz-prioritized-files", dest="prioritize_file",
                   metavar="LIST",
                   help="comma-separated paths (or @FILE: one path a line, or JSON lines "
                        "{\"path\": ...}) to put first, before a prefetch landmark")
    p.add_argument("--estargz-record-in", dest="record_in", metavar="FILE",
                   help="prioritise the files of a record (JSON lines {\"path\": ...}, "
                        "as ctr-remote optimize --record-out writes)")
    p.add_argument("--format", choices=("estargz", "zstd:chunked"), default="estargz",
                   help="layer format: eStargz (default) or zstd:chunked (containers/storage's "
                   "current generation; diffIDs unchanged)")
    p.add_argument("--zstdchunked", dest="format", action="store_const", const="zstd:chunked",
                   help="ctr-remote's name for --format zstd:chunked")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    add_registry_options(p)
    p.set_defaults(func=cmd_convert)
