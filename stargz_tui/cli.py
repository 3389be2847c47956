"""The ``stargz-tui`` command line.

Each group of subcommands lives in its own module under ``stargz_tui.commands``
and exposes ``register(subparsers)``; every subcommand sets ``func`` to a
callable taking the parsed ``args`` and returning an exit code (an ``async``
function is run under anyio). Errors from the core (:class:`core.errors.CoreError`)
become one line on stderr and exit status 1 — never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from core.errors import CoreError

from .textsafe import safe

_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE, without importing inspect at start-up

# Modules providing subcommands, in the order they appear in --help.
COMMAND_MODULES = [
    "stargz_tui.commands.image",     # inspect, ls, cat, verify, convert
    "stargz_tui.commands.registry",  # repos, tags, login, logout
    "stargz_tui.commands.mount",     # mount, unmount, mounts, cache
    "stargz_tui.commands.optimize",  # optimize
    "stargz_tui.commands.app",       # tui
    "stargz_tui.commands.completion",  # completion
]

# The module that registers each command: a command line builds a parser with
# that module only (its start-up does not import every other command's code;
# `mount` through the service stays fast, issue 14 B1). tests/test_cli_args.py
# checks this map against what the modules register. Top-level --help and
# `completion` (which describes every command) build them all.
COMMAND_OWNERS = {
    "inspect": "stargz_tui.commands.image", "ls": "stargz_tui.commands.image",
    "cat": "stargz_tui.commands.image", "verify": "stargz_tui.commands.image",
    "convert": "stargz_tui.commands.image",
    "repos": "stargz_tui.commands.registry", "tags": "stargz_tui.commands.registry",
    "login": "stargz_tui.commands.registry", "logout": "stargz_tui.commands.registry",
    "mount": "stargz_tui.commands.mount", "unmount": "stargz_tui.commands.mount",
    "umount": "stargz_tui.commands.mount", "mounts": "stargz_tui.commands.mount",
    "cache": "stargz_tui.commands.mount", "service": "stargz_tui.commands.mount",
    "optimize": "stargz_tui.commands.optimize",
    "tui": "stargz_tui.commands.app",
}

EPILOG = """\
IMAGE is a registry reference (ubuntu, ghcr.io/org/app:tag, localhost:5000/repo@sha256:...)
or an OCI layout as skopeo spells it (oci:DIR[:TAG]).

Run without arguments to open the terminal app.
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line plus exit status 2.

    A subcommand's parser (one without subcommands of its own) takes options
    and positionals in any order (``ls IMAGE -lR data``), as argparse's
    ``parse_known_intermixed_args`` does; the top-level parser cannot (its
    subcommand is a positional that takes the rest) and hands the rest to the
    subcommand's parser through :meth:`parse_known_args`."""

    intermixed = True  # False for a parser with subcommands
    _intermixing = False

    def __init__(self, *args, **kwargs):
        # every argument added, for `stargz-tui completion` (argparse keeps
        # its own list private)
        self.arguments: list[argparse.Action] = []
        self.commands: dict[str, argparse.ArgumentParser] = {}
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.arguments.append(action)
        if action.nargs in (argparse.REMAINDER, argparse.PARSER):
            # the rest of the line is the argument (optimize's `-- CMD ...`):
            # argparse cannot intermix that, and it takes options as they come
            self.intermixed = False
        return action

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing or not self.intermixed:
            return super().parse_known_args(args, namespace)
        # parse_known_intermixed_args calls parse_known_args itself (twice):
        # those inner calls take the plain path above
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


class _TopParser(_Parser):
    intermixed = False


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` (one of :data:`COMMAND_OWNERS`), only the
    module registering it is imported."""
    parser = _TopParser(
        prog="stargz-tui",
        description="Inspect, verify and lazily mount eStargz / zstd:chunked container images.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version="stargz-tui 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    owner = COMMAND_OWNERS.get(command or "")
    for name in [owner] if owner else COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    parser.commands = dict(sub.choices)
    return parser


def run_command(func, args) -> int:
    code = getattr(func, "__code__", None)
    if code is not None and code.co_flags & _CO_COROUTINE:
        import anyio  # only async commands pay for the event loop's imports

        return anyio.run(func, args) or 0
    return func(args) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["tui"]
    parser = build_parser(argv[0])
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return run_command(func, args)
    except CoreError as e:
        print(f"stargz-tui: {safe(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stargz-tui: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `stargz-tui cat ... | head`: the reader went away; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:
        print(f"stargz-tui: {safe(e.strerror or e)}" + (f": {safe(e.filename)}" if e.filename else ""),
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
