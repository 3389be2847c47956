"""``optimize``: record a workload through a lazy mount, rebuild the image
with what it read first at the head of each layer (core.optimize)."""

from __future__ import annotations

import argparse
import json
import sys

from core.units import human_size

DEFAULT_PERIOD = 10.0  # ctr-remote image optimize's --period (core.optimize.DEFAULT_PERIOD)

EXAMPLES = """\
examples:
  stargz-tui optimize oci:./layout:app oci:./layout:app-opt
        run the image's entrypoint for up to 10 s, record, convert
  stargz-tui optimize oci:./layout:app oci:./layout:app-opt --record-out app.json -- /bin/sh -c "cat /etc/os-release"
  stargz-tui optimize oci:./layout:app oci:./layout:app-opt2 --record-in app.json   no run: use a list

The command runs chrooted in the mounted image (as root; as a plain user in
a user namespace where the kernel allows it), with the image's Env and
WorkingDir. CMD replaces the image's entrypoint and cmd. The record is JSON
lines as ctr-remote writes them ({"path": ...}), usable with
`ctr-remote image convert --estargz-record-in` and `stargz-tui convert
--prioritize-file @FILE`.
"""


async def cmd_optimize(args) -> int:
    from core.optimize import optimize_image, record_workload
    from core.record import read_record

    _parse_words(args)
    say = sys.stderr if args.json else sys.stdout
    run = None
    if args.record_in:
        entries = read_record(args.record_in)
        print(f"using {len(entries)} recorded file(s) from {args.record_in}", file=say)
    else:
        res = await record_workload(args.src, args.cmd, period=args.period,
                                    record_out=args.record_out, platform=args.platform,
                                    stdout=sys.stderr)
        entries = res.entries
        print(f"{' '.join(res.argv)}: {res.describe()}; {len(entries)} file(s) recorded"
              + (f" to {res.record_file}" if res.record_file else ""), file=say)
        run = {"argv": res.argv, "status": res.status, "timedOut": res.timed_out,
               "seconds": round(res.seconds, 3), "recorded": len(entries),
               "recordFile": res.record_file}
    out = await optimize_image(args.src, args.dst, entries, platform=args.platform,
                               chunk_size=args.chunk_size)
    if args.json:
        print(json.dumps({**out.convert.to_dict(),
                          "prioritized": {str(k): v for k, v in out.prioritized.items()},
                          "kept": out.kept, "missed": out.missed, "run": run}, indent=2))
        return 0
    for c in out.convert.layers:
        if c.index in out.kept:
            print(f"layer {c.index}: kept as it is ({c.digest[:19]}...; nothing recorded)")
        else:
            n = len(out.prioritized.get(c.index, []))
            print(f"layer {c.index}: {n} file(s) before the prefetch landmark -> {c.digest} "
                  f"({human_size(c.size)})")
    for p in out.missed:
        print(f"missed: {p} (recorded but not a file in the image)")
    print(f"wrote {args.dst} ({out.convert.manifest_digest})")
    return 0


class _WordsParser(argparse.ArgumentParser):
    """Parses what follows ``optimize`` (options may come after SRC DST and
    before ``--``), with the CLI's one-line usage errors."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"stargz-tui optimize: error: {message}\n")


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--record-out", metavar="FILE", help="also keep the record in FILE")
    p.add_argument("--record-in", metavar="FILE",
                   help="skip the run: prioritise the files of this record or list")
    p.add_argument("--period", type=float, default=DEFAULT_PERIOD, metavar="S",
                   help=f"stop the command after S seconds (default {DEFAULT_PERIOD:g})")
    p.add_argument("--platform", metavar="OS/ARCH")
    p.add_argument("--chunk-size", type=int, default=None, metavar="BYTES")
    p.add_argument("--json", action="store_true")


def _parse_words(args) -> None:
    """SRC DST [options] [-- CMD ARGS...] from ``args.words`` into ``args``
    (argparse's subparsers cannot take options between positionals and
    ``--``; an intermixed parse can)."""
    p = _WordsParser(prog="stargz-tui optimize", add_help=False)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("cmd", nargs="*")
    _add_options(p)
    p.parse_intermixed_args(args.words, namespace=args)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "optimize", help="record a workload's reads and rebuild the image to start faster",
        description="Mount SRC, run CMD in it and record the files it opens, then convert "
                    "SRC to DST as eStargz with those files before each layer's prefetch "
                    "landmark (layers nothing was read from are kept byte-identical).",
        usage="stargz-tui optimize SRC DST [options] [-- CMD [ARGS...]]",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("words", metavar="SRC DST [-- CMD ARGS]", nargs=argparse.REMAINDER,
                   help="the source and destination images; after --, the command and its "
                        "arguments (default: the image's entrypoint and cmd)")
    _add_options(p)
    p.set_defaults(func=cmd_optimize)
