"""B8 probe: time until the app's layer screen shows the tree of a layer.

    python -m bench.appprobe IMAGE_REF

Prints one JSON line. Filled in against ``stargz_tui.app`` once it exists.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    try:
        import stargz_tui.app  # noqa: F401
    except ImportError as e:
        print(f"stargz_tui.app is not there yet ({e})", file=sys.stderr)
        return 1
    print("app probe not written yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
