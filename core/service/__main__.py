"""``python -m core.service run [--ready-fd N]``: the mount service in the
foreground (what ``stargz-tui service start`` and the systemd unit run)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.service",
                                 description="stargz-tui's per-user mount service.")
    ap.add_argument("action", choices=["run"])
    ap.add_argument("--ready-fd", type=int, help="write 'ok' here once serving")
    args = ap.parse_args(argv)
    from .server import run

    return run(args.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
