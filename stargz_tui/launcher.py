"""The ``stargz-tui`` console entry (and ``python -m stargz_tui``).

It only runs :func:`stargz_tui.cli.main`: ``mount``, ``unmount``, ``mounts``
and ``service`` are clients of the mount service (:mod:`core.service`,
through its typed client) and do the same work in-process when it is not
running and cannot be started. A command line imports only its command's
module (``cli.COMMAND_OWNERS``), which keeps a mount through the service
fast without any private interpreter module.
"""

from __future__ import annotations

import sys


def main() -> int:
    from .cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
