"""``stargz-tui tui [IMAGE|REGISTRY]``: the terminal app."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tui", help="open the terminal app (the default without a command)",
        description="Browse registries, images and layers; verify; mount and unmount.",
    )
    p.add_argument("target", nargs="?", metavar="IMAGE|REGISTRY",
                   help="open this image (ref or oci:DIR:TAG) or registry (host[:port]) directly")
    p.add_argument("--light", action="store_true", help="start with the light theme")
    p.add_argument("--dark", action="store_true", help="start with the dark theme")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..app import DARK_THEME, LIGHT_THEME, StargzApp

    theme = LIGHT_THEME if args.light else DARK_THEME if args.dark else None
    StargzApp(args.target, theme=theme).run()
    return 0
