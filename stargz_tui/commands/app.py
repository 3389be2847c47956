"""``stargz-tui tui [IMAGE|REGISTRY]``: the terminal app.

Exit status: 0 when the user quits; 1 when the app ended on an uncaught
exception (Textual prints its traceback and sets the app's return code; we
pass that on instead of reporting success).
"""

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
    return run_app(StargzApp(args.target, theme=theme))


def run_app(app, **run_options) -> int:
    """Run ``app`` to the end; its exit status (non-zero after a crash)."""
    app.run(**run_options)
    return app.return_code or 0
